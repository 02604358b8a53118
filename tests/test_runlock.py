"""One job per run id: a second live job is refused (whatever its own lease), a killed job's lock
lapses, a job stopped while it takes the lock frees it, a fresh start never mixes with an older
run. Real job processes on a local folder and on SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from tcpproxy import TcpProxy

from job.infra.errors import EXIT_RUN_LOCKED, EXIT_SETTINGS, EXIT_STOPPED_UNSAVED, RunLockedError
from job.infra.stores import open_store
from job.run.runlock import LOCK_KEY, RELEASE_SECONDS, RunLock
from tests.helpers import REPO, job_env, run_job, write_idx
from tests.test_launcher import worker_pid
from tests.test_s3_job import new_bucket, popen_job, s3_job_env

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


def wait_until_locked(locked: Callable[[], bool], job: subprocess.Popen) -> None:
    """Return as soon as the job has written its lock: it then settles for 1 s."""
    deadline = time.monotonic() + 120
    while not locked():
        assert job.poll() is None, "the job exited before it took the lock"
        assert time.monotonic() < deadline, "no lock after 120 s"
        time.sleep(0.002)


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


def test_a_lease_longer_than_the_stall_timeout_is_waited_out_not_a_stall(tmp_path):
    """The wait for a killed job's lease is bounded by the lease: a declared wait, not a stall
    (once every restart after a kill exited 10 from the watchdog while it waited)."""
    env = dict(long_env(tmp_path, GAN_STALL_TIMEOUT_SECONDS=8), GAN_RUN_LEASE_SECONDS="20")
    first = start(env)
    wait_for(first, "checkpoint at step 5 stored")
    first.kill()
    first.communicate(timeout=30)
    t0 = time.monotonic()
    rerun = run_job(dict(env, GAN_MAX_STEPS="8"))
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "taking it over" in rerun.stdout and "resumed from step" in rerun.stdout
    assert time.monotonic() - t0 >= 20


def plant_dead_holder(tmp_path, lease_seconds: float) -> None:
    """The lock of a job killed a moment ago whose lease is lease_seconds."""
    lock = tmp_path / "runs/shared" / LOCK_KEY
    lock.parent.mkdir(parents=True)
    lock.write_text(
        json.dumps({"owner": "gone:1:x", "renewals": 3, "lease_seconds": lease_seconds})
    )


def test_ranks_1_and_up_wait_out_a_killed_jobs_lease_longer_than_the_stall_timeout(tmp_path):
    """Under torchrun, ranks 1+ wait for rank 0 while it waits out a dead holder's lease (14 s,
    over the 8 s stall timeout): on the rendezvous store, for as long as rank 0's declared wait
    (once rank 1's collective timed out meanwhile: exit 10)."""
    env = long_env(tmp_path, GAN_STALL_TIMEOUT_SECONDS=8, GAN_NPROC_PER_NODE=2, GAN_DEVICE="cpu")
    plant_dead_holder(tmp_path, 14)
    t0 = time.monotonic()
    job = run_job(dict(env, GAN_MAX_STEPS="3"), timeout=180)
    output = job.stdout + job.stderr
    assert job.returncode == 0, output
    assert "waiting up to 14 s (the holder's GAN_RUN_LEASE_SECONDS" in output
    assert "[rank 1] INFO waiting up to 14 s for rank 0" in output
    assert "taking it over" in output and "stalled" not in output
    assert time.monotonic() - t0 >= 14
    assert json.loads((tmp_path / "runs/shared/config.json").read_text())


def test_ranks_1_and_up_waiting_for_a_silent_rank_0_stop_after_its_wait_naming_it(tmp_path):
    """Ranks 1+ wait only as long as rank 0's declared wait (12 s) and the stall timeout (5 s)
    after it: a rank 0 gone silent (SIGSTOP) meanwhile ends them with 10, the wait named."""
    env = long_env(tmp_path, GAN_STALL_TIMEOUT_SECONDS=5, GAN_NPROC_PER_NODE=2, GAN_DEVICE="cpu")
    plant_dead_holder(tmp_path, 12)
    job = start(env)
    seen = wait_for(job, "[rank 1] INFO waiting up to 12 s for rank 0")
    rank_0 = worker_pid(job.pid, 0)
    os.kill(rank_0, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        seen += wait_for(job, "stalled:", timeout=60)
        waited = time.monotonic() - stopped
    finally:
        os.kill(rank_0, signal.SIGKILL)
    output = seen + job.communicate(timeout=60)[0]
    assert job.returncode == EXIT_STOPPED_UNSAVED, output
    assert (
        "[rank 1] ERROR stalled: no progress for 5 s (GAN_STALL_TIMEOUT_SECONDS): in 'waiting "
        "for rank 0, which waits up to 12 s for the run lock of gone:1:x'"
    ) in output
    assert 12 < waited < 12 + 5 + 4


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


def test_a_job_with_a_shorter_lease_honours_the_holders_and_does_not_steal_its_lock(tmp_path):
    # the holder renews every 10 s, 1 s after its lock: a 2 s waiter that starts after the
    # lock mostly sees none; the holder trains 30 s, longer than the waiter's start and wait
    env = dict(long_env(tmp_path), GAN_LOG_EVERY="50", GAN_CHECKPOINT_EVERY="100",
               GAN_MAX_MINUTES="0.5")  # fmt: skip
    lock = tmp_path / "runs/shared" / LOCK_KEY
    holder = popen_job(dict(env, GAN_RUN_LEASE_SECONDS="40"), tmp_path / "holder.log")
    try:
        wait_until_locked(lock.exists, holder)
        started = time.monotonic()
        intruder = run_job(dict(env, GAN_RUN_LEASE_SECONDS="2", GAN_SEED="7"), timeout=120)
        waited = time.monotonic() - started
        assert intruder.returncode == EXIT_RUN_LOCKED, intruder.stdout + intruder.stderr
        assert "waiting up to 40 s (the holder's GAN_RUN_LEASE_SECONDS" in intruder.stdout
        assert "is alive (it renews its lock)" in intruder.stdout
        assert "lapses after GAN_RUN_LEASE_SECONDS=40" in intruder.stdout
        assert "taking it over" not in intruder.stdout
        assert waited < 40  # refused at the renewal, not after a whole lease
        assert holder.poll() is None
        assert json.loads(lock.read_text())["owner"].split(":")[-2] == str(holder.pid)
        assert holder.wait(timeout=120) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    log = (tmp_path / "holder.log").read_text()
    assert "took over this run's lock" not in log and "max_minutes" in log
    config = json.loads((tmp_path / "runs/shared/config.json").read_text())
    assert config["settings"]["seed"] != 7  # the refused job wrote nothing
    assert not lock.exists()


def test_sigterm_while_the_lock_settles_removes_it_so_a_rerun_starts_at_once(tmp_path):
    env = dict(long_env(tmp_path), GAN_RUN_LEASE_SECONDS="60")
    lock = tmp_path / "runs/shared" / LOCK_KEY
    job = popen_job(env, tmp_path / "job.log")
    try:
        wait_until_locked(lock.exists, job)
        job.send_signal(signal.SIGTERM)
        assert job.wait(timeout=60) == EXIT_STOPPED_UNSAVED
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    assert "stopped by SIGTERM during start-up" in (tmp_path / "job.log").read_text()
    assert not lock.exists()
    rerun = run_job(dict(env, GAN_MAX_STEPS="2"), timeout=60)  # a left lock: 60 s of waiting
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "run lock held by" not in rerun.stdout


def test_sigterm_while_the_lock_settles_on_a_hanging_store_exits_within_the_release_wait(
    tmp_path, s3_env
):
    with TcpProxy(s3_env.ports["s3"]) as proxy:
        env = dict(long_env(tmp_path, s3_env), GAN_RUN_LEASE_SECONDS="60",
                   GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}")  # fmt: skip
        store = open_store(env["GAN_ARTIFACT_URI"], s3_env.endpoint_url).child("shared")
        job = popen_job(env, tmp_path / "job.log")
        try:
            wait_until_locked(lambda: store.exists(LOCK_KEY), job)
            proxy.mode = "hold"  # the job's requests are accepted and never answered
            proxy.cut()
            signalled = time.monotonic()
            job.send_signal(signal.SIGTERM)
            assert job.wait(timeout=60) == EXIT_STOPPED_UNSAVED
            assert time.monotonic() - signalled < RELEASE_SECONDS + 10
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    log = (tmp_path / "job.log").read_text()
    assert f"could not remove the run lock in {RELEASE_SECONDS:g} s" in log
    assert "stopped by SIGTERM during start-up" in log


def test_wall_clock_jumps_of_days_change_no_wait_of_the_lock(tmp_path, monkeypatch):
    """A silent holder's lock is taken over one lease later, however the wall clock jumps
    meanwhile (days forward, then back): the lock measures time on the monotonic clock and
    never sleeps a negative length. (libfaketime cannot show it: under it Python's own
    time.sleep fails with EINVAL once the monotonic clock is left real.)"""
    store = open_store(str(tmp_path / "run"))
    store.put_bytes(
        LOCK_KEY, json.dumps({"owner": "gone:1:x", "renewals": 1, "lease_seconds": 2}).encode()
    )
    jumps = iter(lambda: time.monotonic() % 2, None)  # alternately days ahead and days behind
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + (3 if next(jumps) < 1 else -3) * 86400)
    lock = RunLock(store, lease_seconds=2, settle_seconds=0.1)
    t0 = time.monotonic()
    lock.acquire()
    try:
        assert 2 <= time.monotonic() - t0 < 10
        assert json.loads(store.get_bytes(LOCK_KEY))["owner"] == lock.owner
        time.sleep(1.5)  # two renewals (a quarter lease each) under the jumping clock
        assert json.loads(store.get_bytes(LOCK_KEY))["renewals"] >= 3 and not lock.lost
    finally:
        lock.release()
