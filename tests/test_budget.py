"""Budget in-process: each stop reason, the learning-rate factor, a run restarted after its
budget was spent, and the rule for rollbacks."""

from __future__ import annotations

import signal
import time
from types import SimpleNamespace

import pytest
import torch

from job.infra.distributed import World
from job.infra.errors import NonFiniteLossError, RunLockedError
from job.run.budget import Budget

ONE_PROCESS = World(0, 1, 0, torch.device("cpu"))


def budget(lost: bool = False, **values) -> Budget:
    lock = SimpleNamespace(lost=lost, lease=30.0, store=SimpleNamespace(uri="file:///runs/r"))
    settings = dict(max_steps=100, max_minutes=0.0, lr_decay="none", lr_decay_start=0.5,
                    grace_seconds=15, nonfinite="rollback", max_rollbacks=2)  # fmt: skip
    return Budget(world=ONE_PROCESS, lock=lock, **(settings | values))


@pytest.fixture
def signal_handlers():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_the_step_budget_stops_the_run():
    b = budget()
    b.state.step = 99
    assert b.stop_reason() is None
    b.state.step = 100
    assert b.stop_reason() == "max_steps"


def test_a_stop_signal_after_start_stops_at_the_next_check_and_later_signals_change_nothing(
    signal_handlers,
):
    b = budget()
    b.start()
    signal.raise_signal(signal.SIGTERM)
    first = b.stop.received
    signal.raise_signal(signal.SIGINT)
    assert b.stop_reason() == "signal"
    assert b.stop.signal == signal.SIGTERM and b.stop.received == first
    assert 0 < b.stop.time_left() <= 15


def test_the_time_budget_stops_the_run_and_counts_down():
    b = budget(max_minutes=0.001)  # 60 ms
    b.start()
    assert 0 < b.time_left() <= 0.06
    time.sleep(0.1)
    assert b.stop_reason() == "max_minutes"
    assert b.state.time_progress == 1.0
    assert budget().time_left() == float("inf")


def test_a_lock_taken_over_by_another_job_stops_the_run_naming_the_lease():
    with pytest.raises(RunLockedError, match="GAN_RUN_LEASE_SECONDS=30"):
        budget(lost=True).stop_reason()


def test_learning_rates_halve_per_rollback_and_follow_the_decay():
    b = budget(lr_decay="linear", lr_decay_start=0.5)
    assert b.lr_factor() == 1.0
    b.state.step = 75  # halfway through the decay
    assert b.lr_factor() == pytest.approx(0.5)
    b.state.rollbacks = 2
    assert b.lr_factor() == pytest.approx(0.5 * 0.25)


def test_a_preempted_run_goes_on_along_its_time_budget_and_a_finished_one_gets_a_new_one():
    preempted = budget(max_minutes=10.0, lr_decay="linear", lr_decay_start=0.0)
    preempted.load_state_dict({"step": 10, "images_seen": 160, "rollbacks": 0,
                               "time_progress": 0.6})  # fmt: skip
    preempted.start()
    preempted.stop_reason()
    assert preempted.state.time_progress == pytest.approx(0.6, abs=1e-3)
    assert preempted.lr_factor() == pytest.approx(0.4, abs=1e-3)

    finished = budget(max_minutes=10.0, lr_decay="linear", lr_decay_start=0.0)
    finished.load_state_dict({"step": 10, "images_seen": 160, "rollbacks": 0,
                              "time_progress": 1.0})  # fmt: skip
    finished.start()
    finished.stop_reason()
    assert finished.state.time_progress < 1e-3  # its rates come back and decay again
    assert finished.lr_factor() == pytest.approx(0.9, abs=1e-3)  # step 10 of 100


def test_rollbacks_are_allowed_until_used_up_and_never_with_policy_fail():
    b = budget(max_rollbacks=1)
    b.state.step = 7
    assert b.check_rollback() == "non-finite loss by step 7"
    b.rolled_back(0)
    with pytest.raises(NonFiniteLossError, match="after 1 rollbacks"):
        b.check_rollback()
    with pytest.raises(NonFiniteLossError, match="GAN_NONFINITE=fail"):
        budget(nonfinite="fail").check_rollback()
