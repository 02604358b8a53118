"""One job per run id: a second live job is refused, a killed job's lock lapses, a fresh start
never mixes with an older run. Real job processes on a local folder and on SeaweedFS."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest

from job.errors import EXIT_RUN_LOCKED, EXIT_SETTINGS, RunLockedError
from job.runlock import LOCK_KEY, RunLock
from job.storage import open_store
from tests.helpers import REPO, job_env, run_job, write_idx
from tests.test_s3_job import new_bucket, s3_job_env

LEASE = "4"


def start(env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "job"], env=dict(env, PYTHONUNBUFFERED="1"),
                            cwd=REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip


def wait_for(job: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    return "".join(lines)


def long_env(tmp_path, s3=None, **settings) -> dict[str, str]:
    common = dict(GAN_DATASET="mnist", GAN_RUN_ID="shared", GAN_MAX_STEPS=100000,
                  GAN_LOG_EVERY=1, GAN_CHECKPOINT_EVERY=5, GAN_RUN_LEASE_SECONDS=LEASE,
                  **settings)  # fmt: skip
    write_idx(tmp_path / "data", n=64)
    if s3 is not None:
        return s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{new_bucket(s3)}/runs", **common)
    return job_env(tmp_path, **common)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_job_on_a_live_run_id_is_refused_with_exit_11(tmp_path, where, request):
    env = long_env(tmp_path, request.getfixturevalue("s3_env") if where == "s3" else None)
    first = start(env)
    try:
        wait_for(first, "step 1/")
        second = run_job(dict(env, GAN_SEED="7"))
        assert second.returncode == EXIT_RUN_LOCKED, second.stdout + second.stderr
        assert "another job is running with this GAN_RUN_ID" in second.stdout
        assert first.poll() is None  # the first job is untouched and goes on
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=60)
    store = open_store(env["GAN_ARTIFACT_URI"], env.get("AWS_ENDPOINT_URL")).child("shared")
    config = json.loads(store.get_bytes("config.json"))
    assert config["settings"]["seed"] != 7  # the refused job wrote nothing
    assert not store.exists(LOCK_KEY)  # a job that stops frees the run id


def test_a_killed_jobs_lock_lapses_and_a_rerun_resumes(tmp_path):
    env = long_env(tmp_path)
    first = start(env)
    wait_for(first, "checkpoint at step 5 stored")
    first.kill()  # SIGKILL: no chance to release the lock
    first.communicate(timeout=30)
    assert (tmp_path / "runs/shared" / LOCK_KEY).exists()
    t0 = time.monotonic()
    rerun = run_job(dict(env, GAN_MAX_STEPS="8"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "taking it over" in rerun.stdout and "resumed from step" in rerun.stdout
    assert time.monotonic() - t0 >= float(LEASE)  # it waited for the lease to lapse


def test_two_jobs_taking_a_free_lock_at_once_leave_exactly_one_holder(tmp_path):
    store = open_store(str(tmp_path / "run"))
    outcomes: dict[int, str] = {}

    def take(i: int) -> None:
        try:
            RunLock(store, lease_seconds=4, settle_seconds=0.5).acquire()
            outcomes[i] = "holder"
        except RunLockedError:
            outcomes[i] = "refused"

    threads = [threading.Thread(target=take, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["holder", "refused"]


def test_fresh_start_over_an_existing_run_is_refused_and_leaves_it_intact(tmp_path):
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_RUN_ID="r", GAN_MAX_STEPS=10,
                  GAN_CHECKPOINT_EVERY=5, GAN_KEEP_CHECKPOINTS=2)  # fmt: skip
    assert run_job(env).returncode == 0
    run = tmp_path / "runs/r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    fresh = run_job(dict(env, GAN_RESUME="never", GAN_MAX_STEPS="20", GAN_SEED="3"))
    assert fresh.returncode == EXIT_SETTINGS, fresh.stdout + fresh.stderr
    assert "GAN_RESUME=never, but run r already has" in fresh.stdout
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before

    elsewhere = run_job(dict(env, GAN_RESUME="never", GAN_RUN_ID="r2"))
    assert elsewhere.returncode == 0  # a new run id starts fresh as asked
