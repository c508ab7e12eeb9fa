"""What the subcommands share.

Exit codes, argument types, the shared option groups (operator, device, output, ``--json``),
built from the specs of :mod:`napari_wpp.core.config`, the error contract, progress bars and
reading inputs. Outputs are written by the jobs (:mod:`napari_wpp.jobs`) through
:mod:`napari_wpp.io`'s atomic writers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

from napari_wpp.core.config import (
    FALLBACK_ITERATIONS,
    OperatorSpec,
    choices_of,
    default_of,
    help_of,
    help_text,
    spec_from,
)
from napari_wpp.core.errors import InputError, QuestionableInputWarning
from napari_wpp.io import one_line
from napari_wpp.jobs.notices import JobWarning

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "PROG",
    "Parser",
    "ProgressBar",
    "add_device_flag",
    "add_json_flag",
    "add_operator_flags",
    "abort_now",
    "add_output_flag",
    "add_patch_distance_flags",
    "add_spec_option",
    "check_array_output",
    "check_device",
    "check_output",
    "crop_type",
    "describe_reconstruction",
    "drive",
    "emit",
    "end_progress_line",
    "fail",
    "iterations_type",
    "jsonable",
    "kernel_type",
    "lambda_type",
    "minutes_type",
    "noise_type",
    "number_type",
    "one_line",
    "operator_from_args",
    "operator_spec_from_args",
    "positive_types",
    "questionable_input_warnings",
    "read_input",
    "scale_type",
    "seed_type",
    "shape_text",
    "warn",
    "sigma_type",
    "write_tiff",
]

PROG = "napari-wpp"
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one ``error: ...`` line (exit code 2)."""

    def error(self, message: str) -> NoReturn:  # noqa: D102 (argparse API)
        sys.stderr.write(f"error: {one_line(message)} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_BAD_INPUT)


def parsed(kind: type, text: str, message: str) -> Any:
    """``kind(text)``, or an argparse error with ``message`` when ``text`` is no ``kind``."""
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(message) from None


def scale_type(text: str) -> int:
    value = parsed(float, text, f"scale must be an integer ≥ 2, got {text!r}: use e.g. --scale 4")
    if not value.is_integer() or value < 2:
        raise argparse.ArgumentTypeError(
            f"scale must be an integer ≥ 2, got {text}: use e.g. --scale 2, 3, 4, 6 or 8"
        )
    return int(value)


def number_type(kind: type, minimum: float, inclusive: bool, hint: str) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and enforces a lower bound."""
    bound = f"≥ {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> Any:
        expected = "an integer" if kind is int else "a number"
        value = parsed(kind, text, f"expected {expected} {bound}, got {text!r}: {hint}")
        ok = value >= minimum if inclusive else value > minimum
        if not ok or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}: {hint}")
        return value

    parse.__name__ = kind.__name__
    return parse


sigma_type = number_type(float, 0.0, False, "the blur width σ in HR pixels, e.g. --sigma 2")


lambda_type = number_type(float, 0.0, True, "e.g. --lambda 0.02")
noise_type = number_type(float, 0.0, True, "the noise std on the [0, 1] scale, e.g. --noise 0.01")


minutes_type = number_type(float, 0.0, False, "e.g. --minutes 2")


iterations_type = number_type(int, 1, True, f"e.g. --iterations {FALLBACK_ITERATIONS}")


kernel_type = number_type(
    int, 1, True, f"e.g. --kernel-size {default_of(OperatorSpec, 'kernel_size')}"
)


crop_type = number_type(int, 0, True, "the border to ignore in pixels, e.g. --crop 40")


_parse_seed = number_type(int, 0, True, "e.g. --seed 0")
SEED_LIMIT = 2**64


def seed_type(text: str) -> int:
    """A seed ≥ 0; one of 2**64 or more is reduced modulo 2**64, with a warning."""
    value = _parse_seed(text)
    if value >= SEED_LIMIT:
        reduced = value % SEED_LIMIT
        warn(
            f"--seed {text} is 2**64 or more; torch and numpy take seeds below 2**64, so "
            f"{reduced} is used: give a smaller seed to choose it yourself"
        )
        return reduced
    return value


seed_type.__name__ = "int"


positive_types = {
    name: number_type(int, 1, True, f"e.g. {name} {value}")
    for name, value in (
        ("--batch-size", 8),
        ("--crop-size", 25),
        ("--reference-patches", 5000),
        ("--psi-passes", 2),
        ("--tile", 256),
        ("--samples", 8),
    )
}


def add_operator_flags(parser: argparse.ArgumentParser) -> None:
    """The forward operator group, from :class:`~napari_wpp.core.config.OperatorSpec`."""
    group = parser.add_argument_group(
        "forward operator", "either --operator OP.json or --scale (with --sigma)"
    )
    group.add_argument("--operator", metavar="OP.json", help=help_of(OperatorSpec, "path"))
    group.add_argument("--scale", type=scale_type, metavar="Q", help=help_of(OperatorSpec, "scale"))
    group.add_argument(
        "--sigma", type=sigma_type, metavar="S", help=help_text(OperatorSpec, "sigma")
    )
    add_spec_option(group, OperatorSpec, "kernel_size", type=kernel_type, metavar="K")
    for name in ("anchor", "padding"):
        add_spec_option(group, OperatorSpec, name, choices=choices_of(OperatorSpec, name))


def add_device_flag(parser: Any, spec: type) -> None:
    """``--device`` with the default and help of ``spec.device``."""
    add_spec_option(parser, spec, "device")


def add_spec_option(
    parser: Any, spec: type, name: str, flag: str | None = None, **options: Any
) -> None:
    """The option of the field ``spec.<name>`` (``--<name>``, or ``flag``) with the field's
    default and help line (``options``: further ``add_argument`` keywords, e.g. ``type``)."""
    options.setdefault("help", help_text(spec, name))
    parser.add_argument(
        flag or "--" + name.replace("_", "-"), dest=name, default=default_of(spec, name), **options
    )


projections_type = number_type(int, 0, True, "e.g. --projections 64")


def add_patch_distance_flags(parser: Any, spec: type, spec_defaults: bool = True) -> None:
    """``--patch-distance`` and ``--projections`` of ``spec``'s fields (``spec_defaults``
    False: both default to ``None``, for options that only override what a run keeps)."""
    for name, options in (
        ("patch_distance", {"choices": choices_of(spec, "patch_distance"), "metavar": "D"}),
        ("projections", {"type": projections_type, "metavar": "K"}),
    ):
        if spec_defaults:
            add_spec_option(parser, spec, name, **options)
        else:
            flag = "--" + name.replace("_", "-")
            parser.add_argument(flag, dest=name, help=help_text(spec, name), **options)


def add_output_flag(parser: Any, metavar: str = "OUT.tif", help: str = "output TIFF") -> None:
    """The required ``--out``."""
    parser.add_argument("--out", required=True, metavar=metavar, help=help)


def add_json_flag(parser: Any) -> None:
    """``--json``: the result as one JSON object on stdout."""
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def warn(message: str) -> None:
    """One ``warning: …`` line on stderr (the run goes on)."""
    end_progress_line()
    sys.stderr.write(f"warning: {one_line(message)}\n")
    sys.stderr.flush()


@contextmanager
def questionable_input_warnings() -> Iterator[None]:
    """Show each :class:`QuestionableInputWarning` as one ``warning: …`` line meanwhile."""
    shown: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("always", QuestionableInputWarning)
        previous = warnings.showwarning

        def show(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
            if not issubclass(category, QuestionableInputWarning):
                previous(message, category, *args, **kwargs)
            elif str(message) not in shown:
                shown.add(str(message))
                warn(str(message))

        warnings.showwarning = show
        yield


def fail(message: str) -> None:
    end_progress_line()
    sys.stderr.write(f"error: {one_line(message)}\n")
    sys.stderr.flush()


def jsonable(value: Any) -> Any:
    """Plain JSON types; non-finite floats become ``None`` (strict JSON has no inf/nan)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    """Print the result: ``payload`` as one JSON object with ``--json``, else ``text``."""
    end_progress_line()
    if getattr(args, "json", False):
        sys.stdout.write(json.dumps(jsonable(payload)) + "\n")
    else:
        sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


_open_bar: ProgressBar | None = None


def end_progress_line() -> None:
    if _open_bar is not None:
        _open_bar.close()


class ProgressBar:
    """A text progress bar on stderr.

    On a terminal it redraws one line (``\\r``); otherwise it prints a line at every tenth of
    the work and at most every ``interval_s`` seconds in between.
    """

    def __init__(
        self, label: str, width: int = 24, interval_s: float = 60.0, silent: bool = False
    ) -> None:
        self.label = label
        self.silent = silent
        self.width = width
        self.interval_s = interval_s
        self.stream = sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.start = time.perf_counter()
        self._last_draw = -math.inf
        self._last_tenth = -1
        self._drawn = False
        self._width_drawn = 0
        global _open_bar
        _open_bar = self

    def update(self, fraction: float, detail: str = "") -> None:
        """Show ``fraction`` (0..1) of the work done and a short ``detail``."""
        if self.silent:  # a data-parallel rank other than 0
            return
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.perf_counter()
        elapsed = now - self.start
        if self.tty:
            if now - self._last_draw < 0.1 and fraction < 1.0:
                return
            filled = int(round(fraction * self.width))
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"{self.label} [{bar}] {100 * fraction:3.0f}% {detail} {elapsed:.0f}s"
            line = line[:160]
            self.stream.write("\r" + line.ljust(self._width_drawn))
            self._width_drawn = len(line)
            self._drawn = True
        else:
            tenth = int(fraction * 10)
            if tenth <= self._last_tenth and now - self._last_draw < self.interval_s:
                return
            self._last_tenth = max(tenth, self._last_tenth)
            self.stream.write(f"{self.label}: {100 * fraction:3.0f}% {detail} {elapsed:.0f}s\n")
        self._last_draw = now
        self.stream.flush()

    def close(self) -> None:
        """End the bar (a newline on a terminal)."""
        global _open_bar
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        self._drawn = False
        if _open_bar is self:
            _open_bar = None


def check_output(
    path_text: str, what: str = "output", suffixes: tuple[str, ...] = (".tif", ".tiff")
) -> Path:
    """Validate an output file path (folder exists, file type) before any work is done."""
    path = Path(path_text).expanduser()
    if suffixes and path.suffix.lower() not in suffixes:
        raise InputError(
            f"{what} {path_text!r} must end in {' or '.join(suffixes)}: e.g. "
            f"{path.with_suffix(suffixes[0]).name}"
        )
    if path.is_dir():
        raise InputError(f"{what} {path_text!r} is a folder: give a file name, e.g. {path}/out.tif")
    check_output_folder(path, what)
    return path


def check_output_folder(path: Path, what: str = "output") -> None:
    """The folder of an output path exists and is writable (before any work is done)."""
    parent = path.parent
    if not parent.is_dir():
        raise InputError(
            f"{what} folder {str(parent)!r} does not exist: create it first or choose another path"
        )
    if not os.access(parent, os.W_OK):
        raise InputError(f"{what} folder {str(parent)!r} is not writable: choose another path")


def check_array_output(path_text: str) -> tuple[Path, bool]:
    """An output image path (``.tif``/``.tiff``) or zarr array, and whether it is a zarr array
    (checked before any work)."""
    path = Path(path_text).expanduser()
    if path.suffix.lower() != ".zarr":
        return check_output(path_text, suffixes=(".tif", ".tiff", ".zarr")), False
    check_output_folder(path)
    from napari_wpp.jobs.zarr_layout import replaceable_zarr

    if path.exists() and not replaceable_zarr(path):
        raise InputError(
            f"output {path_text!r} exists and is not a zarr array: choose another path"
        )
    return path, True


def read_input(path_text: str, what: str, ndims: Iterable[int] = (2, 3)) -> Any:
    """Read and check an image: it exists, is readable, has a supported shape, is finite."""
    import numpy as np

    from napari_wpp.io import read_image

    ndims = tuple(ndims)
    path = Path(path_text).expanduser()
    if not path.exists():
        raise InputError(f"{what} {path_text!r} does not exist: check the path")
    if path.is_dir():
        raise InputError(f"{what} {path_text!r} is a folder: give an image file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} {path_text!r} is not readable: check its permissions")
    try:
        data = read_image(path)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, KeyError, IndexError, EOFError) as exc:
        raise InputError(
            f"cannot read {what} {path_text!r} ({type(exc).__name__}: {one_line(str(exc))[:120]})"
            ": give a TIFF or PNG image"
        ) from exc
    array = np.asarray(data.array)
    if array.dtype.kind not in "uif":
        raise InputError(
            f"{what} {path_text!r} has dtype {array.dtype}: give a grayscale integer or float image"
        )
    if array.ndim not in ndims:
        colour = array.ndim == 3 and array.shape[-1] in (3, 4) and 3 not in ndims
        wanted = " or ".join(f"{n}D" for n in ndims)
        raise InputError(
            f"{what} {path_text!r} has shape {array.shape} ({array.ndim}D) but {wanted} is needed"
            + (
                ": convert colour images to grayscale"
                if colour
                else ": give a single-channel image"
            )
        )
    if min(array.shape) < 1:
        raise InputError(f"{what} {path_text!r} is empty (shape {array.shape}): give an image")
    return data  # NaN/Inf pixels are refused by read_image


def operator_spec_from_args(args: argparse.Namespace) -> OperatorSpec:
    """The :class:`OperatorSpec` of ``--operator`` or ``--scale/--sigma/...``."""
    if args.operator is not None:
        if args.scale is not None or args.sigma is not None:
            raise InputError("give either --operator OP.json or --scale/--sigma, not both")
        return OperatorSpec(path=args.operator)
    if args.scale is None:
        raise InputError("no forward operator: give --operator OP.json or --scale Q [--sigma S]")
    return spec_from(args, OperatorSpec, path=None)


def operator_from_args(args: argparse.Namespace) -> Any:
    """The forward operator from ``--operator`` or ``--scale/--sigma/...``."""
    from napari_wpp.jobs.operator import build_operator

    return build_operator(operator_spec_from_args(args))


def write_tiff(path: Path, array: Any, pixel_size: Any = None, unit: Any = None) -> None:
    """Write a TIFF atomically; a failure is a one-line ``InputError``."""
    from napari_wpp.io import explained_write_errors, write_image

    with explained_write_errors(path):
        write_image(path, array, pixel_size=pixel_size, unit=unit)


def shape_text(shape: Sequence[int]) -> str:
    return "×".join(str(int(s)) for s in shape)


def drive(
    events: Callable[[threading.Event], Iterable[Any]],
    bar: ProgressBar,
    describe: Callable[[Any], tuple[float, str] | None] | None = None,
    finished: type | tuple[type, ...] | None = None,
    stopping: str = "stopping after this iteration",
) -> Any:
    """Run a generator of core events in a worker thread, showing progress.

    Parameters
    ----------
    events
        Called with the stop event in the worker thread; returns the events.
    bar
        Progress bar fed with ``describe(event)``.
    describe
        ``(fraction, detail)`` of a progress event, ``None`` for other events (default: the
        reconstruction's events).
    finished
        Type(s) of the final event (default ``ReconstructionFinished``).
    stopping
        What the first Ctrl-C message says happens next.

    Ctrl-C or SIGTERM asks the generator to stop (it still yields its final event); a second
    one exits with 130 at once (:func:`abort_now`). Returns the final event.
    """
    if describe is None or finished is None:
        from napari_wpp.core.reconstruct import ReconstructionFinished

        describe = describe or describe_reconstruction
        finished = finished or ReconstructionFinished

    stop = threading.Event()
    inbox: queue.Queue = queue.Queue()
    done = object()

    def work() -> None:
        try:
            for event in events(stop):
                inbox.put(event)
        except BaseException as exc:  # noqa: BLE001 -- handed to the main thread
            inbox.put(exc)
        finally:
            inbox.put(done)

    # Ctrl-C (SIGINT) and SIGTERM (what batch schedulers send) set `stop` through a handler,
    # so they never land as a KeyboardInterrupt in the middle of the loop below; the loop
    # reports it at its next turn and the run ends as asked (a model file is still written).
    # A second signal exits at once with 130: the worker thread may be inside torch, whose
    # threads abort the process ("terminate called ...") if the interpreter shuts down
    # around them, so the exit skips the shutdown.
    requested = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if requested.is_set():
            abort_now()
        requested.set()
        stop.set()

    handled = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    if handled:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    worker = threading.Thread(target=work, name="napari-wpp-worker", daemon=True)
    worker.start()
    final = None
    announced = False
    try:
        while True:
            try:
                event = inbox.get(timeout=0.25)
            except queue.Empty:
                event = None
            except KeyboardInterrupt:  # without the handler (not the main thread)
                if stop.is_set():
                    raise
                requested.set()
                stop.set()
                event = None
            if requested.is_set() and not announced:
                announced = True
                bar.close()
                sys.stderr.write(f"{stopping} (Ctrl-C again to abort)...\n")
                sys.stderr.flush()
            if event is None:
                continue
            if event is done:
                break
            if isinstance(event, BaseException):
                raise event
            if isinstance(event, finished):
                final = event
                continue
            if isinstance(event, JobWarning):
                warn(event.message)
                continue
            progress = describe(event)
            if progress is not None:
                bar.update(*progress)
        worker.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    bar.close()
    if final is None:
        raise RuntimeError("the run ended without a result")
    return final


def abort_now() -> NoReturn:
    """Exit with 130 at once (a second Ctrl-C): one ``error:`` line, no interpreter shutdown.

    Outputs not yet written stay unwritten (atomic writes leave no half file in their place).
    """
    try:
        end_progress_line()
        sys.stdout.flush()
        sys.stderr.write("error: interrupted (asked twice): nothing more was saved\n")
        sys.stderr.flush()
    finally:
        os._exit(EXIT_INTERRUPTED)


def check_device(name: str) -> str:
    from napari_wpp.core.devices import resolve_device

    return str(resolve_device(name))


def describe_reconstruction(event: Any) -> tuple[float, str] | None:
    """Progress fraction and detail of a reconstruction event (``None``: not a progress one)."""
    from napari_wpp.core.reconstruct import ReconstructionProgress

    if isinstance(event, ReconstructionProgress):
        return (
            event.fraction,
            f"it {event.iteration} data {event.data_term:.2e} wpp {event.wpp_term:.2e}",
        )
    return None
