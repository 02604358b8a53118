"""Learning-rate decay over the run's budget (GAN_LR_DECAY), in steps or minutes."""

import pytest
import torch

from job.run import schedule
from tests.helpers import job_env, run_job, write_idx


def test_linear_and_cosine_decay_reach_zero_at_the_end_and_start_late_when_asked():
    assert schedule.lr_factor("none", 0.0, 0.9) == 1.0
    assert schedule.lr_factor("linear", 0.0, 0.25) == pytest.approx(0.75)
    assert schedule.lr_factor("cosine", 0.0, 0.5) == pytest.approx(0.5)
    assert schedule.lr_factor("linear", 0.5, 0.4) == 1.0
    assert schedule.lr_factor("linear", 0.5, 0.75) == pytest.approx(0.5)
    for kind in ("linear", "cosine"):
        assert schedule.lr_factor(kind, 0.3, 1.0) == pytest.approx(0.0, abs=1e-12)


def test_progress_is_the_further_of_steps_and_time_and_a_resume_spreads_the_rest():
    assert schedule.progress(250, 1000, 0.1) == 0.25
    assert schedule.progress(250, 1000, 0.6) == 0.6
    assert schedule.progress(5000, 1000, 0.0) == 1.0
    # 40% done before a preemption: the new process spreads the other 60% over its budget
    assert schedule.time_progress(0.4, 30.0, max_minutes=1.0) == pytest.approx(0.7)
    assert schedule.time_progress(0.4, 90.0, max_minutes=1.0) == 1.0
    assert schedule.time_progress(0.4, 1e6, max_minutes=0.0) == 0.4  # no time budget


def _final_state(tmp_path, run_id: str) -> dict:
    (ckpt,) = sorted((tmp_path / "runs" / run_id / "checkpoints").glob("step-*"))[-1:]
    return torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)


def _lr(state: dict) -> float:
    return state["nets"]["opt_g"]["param_groups"][0]["lr"]


def test_decay_over_a_time_budget_ends_near_zero_and_records_its_progress(tmp_path):
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", n=128)
    env = job_env(
        tmp_path, RUN_ID="timed", MAX_STEPS=10**6, MAX_MINUTES=0.05, LR_DECAY="linear",
        LR_G=1e-3, LR_D=1e-3, LOG_EVERY=1000, SAMPLE_EVERY=10**6, CHECKPOINT_EVERY=10**6,
    )  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stderr[-3000:]
    state = _final_state(tmp_path, "timed")
    assert state["run"]["time_progress"] > 0.98
    assert state["run"]["step"] > 10
    assert _lr(state) < 0.03 * 1e-3  # from 1e-3 down to (nearly) 0 as the 3 s ran out

    constant = job_env(tmp_path, RUN_ID="constant", MAX_STEPS=20, LR_DECAY="none", LR_G=1e-3)
    assert run_job(constant).returncode == 0
    assert _lr(_final_state(tmp_path, "constant")) == pytest.approx(1e-3)


def test_a_run_started_again_after_its_time_budget_decays_again_instead_of_staying_at_zero(
    tmp_path,
):
    write_idx(tmp_path / "data" / "FashionMNIST" / "raw", n=128)
    env = job_env(
        tmp_path, RUN_ID="again", MAX_STEPS=10**6, MAX_MINUTES=0.04, LR_DECAY="linear",
        LR_G=1e-3, LR_D=1e-3, LOG_EVERY=1000, SAMPLE_EVERY=10**6, CHECKPOINT_EVERY=10**6,
    )  # fmt: skip
    assert run_job(env).returncode == 0
    first = _final_state(tmp_path, "again")
    assert first["run"]["time_progress"] > 0.98
    result = run_job(env)  # make run, twice: resumes for another budget
    assert result.returncode == 0, result.stderr[-3000:]
    second = _final_state(tmp_path, "again")
    assert second["run"]["step"] > first["run"]["step"] + 10
    moved = max(
        (second["nets"]["g"][k].float() - v.float()).abs().max().item()
        for k, v in first["nets"]["g"].items()
        if v.is_floating_point() and "running" not in k
    )
    assert moved > 1e-4  # G trained again: its learning rates were not left at 0
