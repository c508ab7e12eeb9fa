"""Helpers for the generators of events that the core's runs yield (progress…, finished)."""

from __future__ import annotations

from collections.abc import Generator, Iterable
from typing import Any

__all__ = ["final_result", "forward_until_finished"]


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
