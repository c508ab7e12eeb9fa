"""Step/time budgets and the cosine step decay shared by reconstruction and training."""

from __future__ import annotations

import pytest

from napari_wpp.core.budget import Budget


def test_step_budget_and_decay() -> None:
    budget = Budget(steps=10, minutes=None, default_steps=99)
    assert not budget.exhausted(9) and budget.exhausted(10)
    assert budget.fraction(5) == pytest.approx(0.5)
    assert budget.cosine_decay(0, 0.1) == pytest.approx(1.0)
    assert budget.cosine_decay(5, 0.1) == pytest.approx(0.55)
    assert budget.cosine_decay(10, 0.1) == pytest.approx(0.1)


def test_default_steps_when_no_budget_is_given() -> None:
    budget = Budget(steps=None, minutes=None, default_steps=3)
    assert budget.max_steps == 3 and budget.max_seconds is None
    assert budget.exhausted(3)


def test_earlier_time_counts_against_a_time_budget() -> None:
    resumed = Budget(steps=None, minutes=1.0, default_steps=3, elapsed_before=61.0)
    assert resumed.exhausted(0)
    assert resumed.fraction(0) == 1.0
    fresh = Budget(steps=None, minutes=1.0, default_steps=3)
    assert not fresh.exhausted(0)
    assert fresh.fraction(0) < 0.1


def test_stopper_follows_the_stop_event_and_the_time_budget() -> None:
    import threading

    stop = threading.Event()
    open_ended = Budget(steps=5, minutes=None, default_steps=10)
    should_stop = open_ended.stopper(stop)
    assert not should_stop()
    stop.set()
    assert should_stop()
    assert not open_ended.stopper()()  # no event, no time budget: never
    spent = Budget(steps=None, minutes=1.0, default_steps=10, elapsed_before=61.0)
    assert spent.stopper()() and spent.out_of_time()
