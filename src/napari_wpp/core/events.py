"""Helpers for the generators of events that the core's runs yield (progress…, finished)."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, ParamSpec

__all__ = ["RunFinished", "final_result", "forward_until_finished", "run_to_end"]

P = ParamSpec("P")


@dataclass(frozen=True, eq=False)
class RunFinished:
    """End of a run (always its last event); each kind of run says what its ``result`` is.

    Attributes
    ----------
    result
        What the run made, or ``None`` when it was stopped early (a partial result is never
        returned) or wrote its output into targets.
    elapsed_s
        Seconds the run took.
    stopped_early
        ``True`` when the ``stop`` event ended the run before its end.
    """

    result: Any
    elapsed_s: float
    stopped_early: bool


def forward_until_finished(
    events: Iterable[Any], finished_type: type, what: str
) -> Generator[Any, None, Any]:
    """Yield every event of ``events`` but the ``finished_type`` one, and return that one.

    Use as ``finished = yield from forward_until_finished(events, Finished, "sampling")``.

    Raises
    ------
    RuntimeError
        ``events`` ended without a ``finished_type`` event (``"<what> ended without a
        result"``).
    """
    finished = None
    for event in events:
        if isinstance(event, finished_type):
            finished = event
        else:
            yield event
    if finished is None:
        raise RuntimeError(f"{what} ended without a result")
    return finished


def final_result(events: Iterable[Any], finished_type: type) -> Any:
    """Run ``events`` to the end and return the ``result`` of its ``finished_type`` event."""
    finished = None
    for event in events:
        if isinstance(event, finished_type):
            finished = event
    if finished is None or finished.result is None:
        raise RuntimeError(f"the run ended without a {finished_type.__name__} result")
    return finished.result


def run_to_end(
    generator: Callable[P, Iterable[Any]], finished_type: type, name: str
) -> Callable[P, Any]:
    """A function ``name`` that runs ``generator`` to the end and returns its result.

    It takes the generator's parameters (``stop`` is best left unset: a stopped run has no
    result) and returns the ``result`` of its ``finished_type`` event (:func:`final_result`).
    """

    @functools.wraps(generator)
    def run(*args: P.args, **kwargs: P.kwargs) -> Any:
        return final_result(generator(*args, **kwargs), finished_type)

    run.__name__ = run.__qualname__ = name
    run.__signature__ = inspect.signature(generator).replace(  # type: ignore[attr-defined]
        return_annotation=inspect.Signature.empty
    )
    run.__doc__ = (
        f"Run :func:`{generator.__name__}` to the end and return its result (same parameters)."
    )
    return run
