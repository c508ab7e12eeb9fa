"""Command line interface: ``napari-wpp <subcommand> ...``.

One module per subcommand: its docstring gives the command's name and ``--help`` texts,
``add_arguments`` its options and ``run`` runs it; what they share (exit codes, argument types,
the option groups, the error contract, progress, reading) is in :mod:`napari_wpp.cli._common`.
Every subcommand validates its input before doing any work, prints results on stdout (one JSON
object with ``--json``), progress on stderr, and exits with

* 0 on success,
* 2 on bad input (one ``error: ...`` line on stderr that names the fix),
* 1 on an unexpected failure (one ``error: ...`` line; ``--debug`` shows the traceback),
* 130 when interrupted before anything could be saved.

Heavy modules (torch, the core, file formats) are imported inside the subcommands so that
``napari-wpp --help`` answers at once.
"""

from __future__ import annotations

import argparse
import errno
import os
from collections.abc import Sequence
from types import ModuleType

from napari_wpp import __version__
from napari_wpp.cli import (
    degrade,
    demo,
    estimate_operator,
    evaluate,
    predict,
    reconstruct,
    suitability,
    train,
    transport,
)
from napari_wpp.cli._common import (
    EXIT_BAD_INPUT,
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    PROG,
    Parser,
    ProgressBar,
    fail,
    one_line,
    questionable_input_warnings,
)
from napari_wpp.cli.evaluate import normalise_for_evaluation
from napari_wpp.core.errors import DivergenceError, InputError

__all__ = [
    "build_parser",
    "main",
    "normalise_for_evaluation",
    "ProgressBar",
]

#: What an allocation failure's line suggests (the sizes that drive memory use).
OUT_OF_MEMORY_FIX = (
    "use a smaller image, --scale, --kernel-size, --batch-size, --reference-patches or --tile, "
    "or a larger machine"
)

#: The subcommands, in the order of ``napari-wpp --help``.
SUBCOMMANDS = (
    degrade,
    estimate_operator,
    suitability,
    reconstruct,
    train,
    predict,
    transport,
    evaluate,
    demo,
)


def build_parser() -> argparse.ArgumentParser:
    """The ``napari-wpp`` argument parser with all subcommands."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the full traceback of unexpected errors",
    )
    parser = Parser(
        prog=PROG,
        description="Superresolution of material scans with Wasserstein Patch Priors.",
        epilog=f"Run '{PROG} <command> --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the full traceback of unexpected errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
    sub.required = True
    for command in SUBCOMMANDS:
        name, summary, description = command_texts(command)
        p = sub.add_parser(name, parents=[common], help=summary, description=description)
        command.add_arguments(p, common)
        if hasattr(command, "run"):  # commands with actions (transport) set their own
            p.set_defaults(handler=command.run)
    return parser


def command_texts(command: ModuleType) -> tuple[str, str, str | None]:
    r"""Name, ``--help`` summary and description of a subcommand, from its module's docstring.

    The first paragraph is ``\`\`napari-wpp NAME\`\`: summary.``; the others are the
    description (argparse wraps it again).
    """
    first, _, rest = (command.__doc__ or "").strip().partition("\n\n")
    heading, _, summary = " ".join(first.split()).partition(": ")
    name = heading.strip("`").split()[-1]
    return name, summary.rstrip("."), " ".join(rest.split()) or None


def _name_too_long(exc: OSError) -> str:
    """The line for a path whose file name is longer than the file system allows."""
    path = str(exc.filename or "")
    longest = max((part for part in path.split(os.sep)), key=len, default="")
    shown = longest if len(longest) <= 40 else f"{longest[:20]}…{longest[-12:]}"
    return (
        f"file name {shown!r} is too long ({len(longest.encode())} bytes): "
        "use a name of at most 255 bytes"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return int(exc.code) if isinstance(exc.code, int) else EXIT_BAD_INPUT
    debug = bool(getattr(args, "debug", False))
    try:
        with questionable_input_warnings():
            return int(args.handler(args) or EXIT_OK)
    except InputError as exc:
        if debug:
            raise
        fail(str(exc))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if debug:
            raise
        fail("interrupted")
        return EXIT_INTERRUPTED
    except DivergenceError as exc:
        if debug:
            raise
        fail(str(exc))
        return EXIT_FAILURE
    except Exception as exc:  # noqa: BLE001 -- last resort: one line, never a traceback
        if debug:
            raise
        from napari_wpp.core.allocation import is_allocation_failure, out_of_memory_message

        if is_allocation_failure(exc):
            fail(out_of_memory_message(exc, OUT_OF_MEMORY_FIX))
            return EXIT_FAILURE
        if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:
            fail(_name_too_long(exc))
            return EXIT_BAD_INPUT
        fail(
            f"unexpected {type(exc).__name__}: {one_line(str(exc)) or 'no message'} "
            f"(rerun with --debug for the traceback and report it)"
        )
        return EXIT_FAILURE
