"""The helpers for the core's generators of events (napari_wpp.core.events)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from napari_wpp.core.events import final_result, forward_until_finished


@dataclass
class _Progress:
    done: int


@dataclass
class _Finished:
    result: Any


def test_forward_until_finished_passes_the_others_on_and_returns_the_last() -> None:
    events = [_Progress(1), _Progress(2), _Finished("image")]
    passed = []

    def job():
        finished = yield from forward_until_finished(iter(events), _Finished, "the run")
        passed.append(finished)

    assert list(job()) == [_Progress(1), _Progress(2)]
    assert passed == [_Finished("image")]


def test_forward_until_finished_names_a_run_without_a_result() -> None:
    with pytest.raises(RuntimeError, match="sampling ended without a result"):
        list(forward_until_finished(iter([_Progress(1)]), _Finished, "sampling"))


def test_final_result_runs_to_the_end() -> None:
    assert final_result(iter([_Progress(1), _Finished(7)]), _Finished) == 7
    with pytest.raises(RuntimeError, match="without a _Finished result"):
        final_result(iter([_Progress(1)]), _Finished)
