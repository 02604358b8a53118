"""A rank that makes no progress ends itself with 10; transport failures between ranks are lost
peers (10, never 1); a launcher asked to stop ends within its own deadline. Real threads, real
gloo process groups, real jobs under torchrun on CPU; SIGSTOP makes a process silent."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from s3server import free_ports

from job.infra import watchdog
from job.infra.distributed import peer_lost
from job.infra.launcher import WorkerStatus, workers_failed
from job.infra.stores import open_store
from job.run.runlock import LOCK_KEY, RunLock
from tests.helpers import REPO, job_env, write_extractor, write_idx, write_image_folder
from tests.test_launcher import read_until, start_job, worker_pid

TWO = dict(GAN_NPROC_PER_NODE=2, GAN_DEVICE="cpu")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ignore(dog: watchdog.Watchdog) -> None:
    pass


# ---------------------------------------------------------------- the watchdog, in process


def test_no_beat_within_the_timeout_calls_on_stall_naming_the_phase():
    stalled: list[str] = []
    fired = threading.Event()

    def record(dog: watchdog.Watchdog) -> None:
        stalled.append(dog.describe())
        fired.set()

    dog = watchdog.Watchdog(0.3, record)
    dog.beat("FID evaluation")
    t0 = time.monotonic()
    dog.start()
    assert fired.wait(5)
    assert 0.3 <= time.monotonic() - t0 < 2.5
    assert "'FID evaluation'" in stalled[0] and "no progress for 0.3 s" in stalled[0]


def test_beats_keep_the_watchdog_quiet():
    fired = threading.Event()
    dog = watchdog.Watchdog(0.4, lambda d: fired.set())
    dog.start()
    for _ in range(12):
        dog.beat("training")
        time.sleep(0.1)
    dog.stop()
    assert not fired.is_set()


def test_a_bounded_wait_moves_the_deadline_and_beats_inside_it_do_not_shorten_it():
    clock = FakeClock()
    dog = watchdog.Watchdog(10, ignore, clock=clock)
    with dog.waiting("waiting for the uploads", 100):
        clock.now = 60
        dog.beat("storing artifacts")
        clock.now = 105
        assert not dog.stalled()
        clock.now = 111
        assert dog.stalled()
    clock.now = 115
    assert not dog.stalled()  # the wait ended: progress
    clock.now = 126
    assert dog.stalled()


def test_an_unbounded_wait_never_stalls_until_it_ends():
    clock = FakeClock()
    dog = watchdog.Watchdog(10, ignore, clock=clock)
    with dog.waiting("loading the data", None):
        clock.now = 1e6
        assert not dog.stalled()
    clock.now += 11
    assert dog.stalled()


def test_beats_before_the_watchdog_is_started_do_nothing():
    watchdog.stop()
    watchdog.beat("training")
    with watchdog.waiting("loading the data", None):
        pass
    assert not watchdog.stalled()


STALLED_PROCESS = """
import time
from job.infra import watchdog
watchdog.start(0.5)
watchdog.beat("FID evaluation")
time.sleep(30)
"""


def test_a_stalled_process_logs_its_phase_and_stacks_records_10_and_exits_10(tmp_path):
    env = dict(os.environ, GANJOB_STATUS_DIR=str(tmp_path), RANK="0", PYTHONPATH=str(REPO))
    t0 = time.monotonic()
    result = subprocess.run([sys.executable, "-c", STALLED_PROCESS], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    assert result.returncode == 10, result.stdout + result.stderr
    assert time.monotonic() - t0 < 10
    assert "stalled: no progress for 0.5 s" in result.stderr + result.stdout
    assert "'FID evaluation'" in result.stderr + result.stdout
    assert "time.sleep(30)" in result.stderr or 'File "<string>"' in result.stderr  # the stacks
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["code"] == 10


def test_a_stalled_process_no_longer_renews_the_run_lock(tmp_path):
    store = open_store(str(tmp_path / "runs"), None).child("r")
    renewals = {}
    for stalled in (False, True):
        if stalled:
            watchdog.start(0.1, on_stall=ignore)
        lock = RunLock(store, lease_seconds=0.4, settle_seconds=0.0)
        try:
            lock.acquire()
            time.sleep(1.5)
            renewals[stalled] = json.loads(store.get_bytes(LOCK_KEY))["renewals"]
        finally:
            watchdog.stop()
            lock.release()
    assert renewals[False] >= 3
    assert renewals[True] == 1  # written once by acquire(), never renewed


# ---------------------------------------------------------------- transport failures: lost peers

TWO_RANKS = """
import os, sys, time, torch
import torch.distributed as dist
from job.infra import distributed
world = distributed.setup("cpu", timeout_seconds=2)
t = torch.ones(2)
dist.all_reduce(t)
if world.rank == 1:
    if sys.argv[1] == "vanish":
        os._exit(0)
    time.sleep(20)  # silent: alive and connected, never answering
    os._exit(0)
t0 = time.monotonic()
try:
    dist.all_reduce(t)
except Exception as exc:
    print("ERROR", type(exc).__name__, distributed.peer_lost(exc), round(time.monotonic() - t0))
    print(exc)
os._exit(0)
"""


def two_ranks(fault: str) -> str:
    """Rank 0's report of its collective against a rank 1 that vanishes or goes silent."""
    port = free_ports(1)[0]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONPATH=str(REPO),
                   OMP_NUM_THREADS="1")  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", TWO_RANKS, fault], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))  # fmt: skip
    try:
        return procs[0].communicate(timeout=60)[0]
    finally:
        for p in procs:
            p.kill()
            p.wait()


def test_a_silent_peer_times_out_after_the_process_groups_timeout_as_a_lost_peer():
    output = two_ranks("silent")
    assert "ERROR RuntimeError True 2" in output, output  # timeout_seconds=2, not 30 minutes
    assert "Timed out waiting 2000ms" in output


def test_a_vanished_peer_is_a_lost_peer():
    output = two_ranks("vanish")
    assert "ERROR RuntimeError True" in output, output
    assert "Connection closed by peer" in output or "Connection reset by peer" in output


@pytest.mark.parametrize(
    "message",
    [
        # gloo's tcp pair when the kernel gives up retransmitting (a cut link, a host gone)
        "[gloo/transport/tcp/pair.cc:598] Read error [10.0.0.2]:47180: Connection timed out",
        "[gloo/transport/tcp/pair.cc:598] Read error [10.0.0.2]:47180: Connection reset by peer",
        "[gloo/transport/tcp/pair.cc:1016] Connect timeout [none]",
        "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 600000ms for recv operation",
        "NCCL communicator was aborted on rank 1.",
        "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=52, OpType=ALLREDUCE)",
        "NCCL error in: ProcessGroupNCCL.cpp:1965, remote process exited or there was a network "
        "error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error",
        "[c10d] Socket Timeout",
    ],
)
def test_transport_failures_between_ranks_are_lost_peers(message):
    assert peer_lost(RuntimeError(message))


def test_other_runtime_errors_are_not_lost_peers():
    assert not peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x8 and 9x2)"))
    assert not peer_lost(ValueError("Connection timed out"))


# ---------------------------------------------------------------- real jobs under torchrun


def training_job(tmp_path: Path, **settings) -> tuple[subprocess.Popen, str]:
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=100000, GAN_LOG_EVERY=10, **TWO,
                  **settings)  # fmt: skip
    job = start_job(env)
    return job, read_until(job, "step 10/")


def finish(job: subprocess.Popen, seen: str, timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        rest, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*descendants(job.pid), job.pid]:
            kill_if_alive(pid)
        rest, _ = job.communicate()
        raise AssertionError(f"still running after {timeout} s:\n{seen}{rest}") from None
    return job.returncode, seen + rest, time.monotonic() - t0


def descendants(pid: int) -> list[int]:
    """Every process under pid (torchrun and its workers, in sessions of their own)."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [d for c in found for d in (c, *descendants(c))]


def test_a_rank_whose_peer_is_silent_exits_10_within_the_stall_timeout(tmp_path):
    job, seen = training_job(tmp_path, GAN_STALL_TIMEOUT_SECONDS=5, GAN_GRACE_SECONDS=2)
    stopped = worker_pid(job.pid, 1)
    try:
        os.kill(stopped, signal.SIGSTOP)
        at = time.time()
        code, output, seconds = finish(job, seen, timeout=90)
    finally:
        kill_if_alive(stopped)
    assert code == 10, output
    (line,) = [x for x in output.splitlines() if "[rank 0] ERROR" in x]
    assert "stalled: no progress for 5 s" in line or "Timed out waiting 5000ms" in line, line
    assert logged_at(line) - at < 5 + 3  # GAN_STALL_TIMEOUT_SECONDS + slack, not 30 minutes
    assert "unexpected failure" not in output
    assert seconds < 5 + 30 + 10  # + torchrun's own 30 s to stop the silent rank + exiting


def test_a_process_whose_data_loader_hangs_exits_10_naming_the_phase_and_stacks(tmp_path):
    write_image_folder(tmp_path / "images", per_class=400)  # 50 batches an epoch: one loader
    env = job_env(tmp_path, GAN_DATASET=f"folder:{tmp_path / 'images'}", GAN_MAX_STEPS=100000,
                  GAN_LOG_EVERY=10, GAN_NUM_WORKERS=1, GAN_IMAGE_SIZE=32,
                  GAN_STALL_TIMEOUT_SECONDS=5, GAN_DEVICE="cpu")  # fmt: skip
    log = tmp_path / "job.log"
    with log.open("w") as out:  # the stopped loaders keep a pipe open: a file ends with the job
        job = subprocess.Popen([sys.executable, "-m", "job"], env=dict(env, PYTHONUNBUFFERED="1"),
                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    loaders: list[int] = []
    try:
        wait_for(lambda: "step 10/" in log.read_text() and descendants(job.pid), job)
        loaders = descendants(job.pid)
        for pid in loaders:
            os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        code = job.wait(timeout=60)
        seconds = time.monotonic() - t0
    finally:
        for pid in [*loaders, job.pid]:
            kill_if_alive(pid)
    output = log.read_text()
    assert code == 10, output
    assert "ERROR stalled: no progress for 5 s (GAN_STALL_TIMEOUT_SECONDS): in 'training'" in output
    assert "Thread 0x" in output and "in next" in output  # every stack: the wait for a batch
    assert seconds < 5 + 5


def wait_for(condition, job: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert job.poll() is None and time.monotonic() < deadline, "job ended or too slow"
        time.sleep(0.2)


def logged_at(line: str) -> float:
    """The wall-clock time of a log line of today (HH:MM:SS at its start)."""
    h, m, sec = (int(x) for x in line[:8].split(":"))
    midnight = time.mktime(time.localtime()[:3] + (0, 0, 0, 0, 0, -1))
    return midnight + h * 3600 + m * 60 + sec


def test_ranks_waiting_for_rank_0s_real_fid_statistics_go_on_with_it(tmp_path):
    """Rank 0 alone computes the real-image reference, here 10 batches of 1 s against a 5 s
    stall timeout: every rank beats per batch, in step with rank 0, so none ends itself."""
    write_idx(tmp_path / "data", n=1000)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=4, GAN_STALL_TIMEOUT_SECONDS=5,
                  GAN_FID_FEATURES=write_extractor(tmp_path / "features.pt"),
                  GAN_FID_NUM_SAMPLES=1000, GAN_RUN_ID="ref", **TWO)  # fmt: skip
    env.update(PYTHONPATH=f"{REPO / 'tests/poison'}:{REPO}", SLOW_REFERENCE_SECONDS="1")
    result = subprocess.run([sys.executable, "-m", "job"], env=env, cwd=REPO, text=True,
                            capture_output=True, timeout=180)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "computing real-image statistics and features (1000 images" in output
    assert "stalled" not in output
    (row,) = [json.loads(x) for x in (tmp_path / "runs/ref/eval.jsonl").read_text().splitlines()]
    assert row["step"] == 4 and row["fid"] > 0


def slow_step_job(tmp_path, pass_seconds: float) -> subprocess.CompletedProcess:
    """A job of 2 steps whose every pass through D (3 a step) takes pass_seconds longer."""
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=2, GAN_STALL_TIMEOUT_SECONDS=8,
                  GAN_DEVICE="cpu", GAN_RUN_ID="slow")  # fmt: skip
    env.update(PYTHONPATH=f"{REPO / 'tests/slowstep'}:{REPO}", SLOW_PASS_SECONDS=str(pass_seconds))
    return subprocess.run([sys.executable, "-m", "job"], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=300)  # fmt: skip


def test_a_step_longer_than_the_stall_timeout_is_not_a_stall_while_each_pass_is_shorter(tmp_path):
    """Steps of 3 passes of 3 s against an 8 s stall timeout: each pass beats (once every step
    longer than the stall timeout ended a healthy run with 10)."""
    result = slow_step_job(tmp_path, 3)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "stalled" not in result.stdout + result.stderr


def test_a_step_that_hangs_is_a_stall_naming_its_step_and_pass(tmp_path):
    """Once the first step's stall named the phase before it ('loading the data: done')."""
    result = slow_step_job(tmp_path, 60)
    output = result.stdout + result.stderr
    assert result.returncode == 10, output
    assert "in 'training step 1: D's update, micro-batch 1 of 1'" in output


def test_sigterm_ends_a_hung_node_within_the_grace_period_with_10(tmp_path):
    """The agent itself hangs (stopped), its workers with it: the launcher's own deadline."""
    job, seen = training_job(tmp_path, GAN_GRACE_SECONDS=2)
    torchrun = int(Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()[0])
    stopped = [worker_pid(job.pid, 0), worker_pid(job.pid, 1), torchrun]
    try:
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        job.send_signal(signal.SIGTERM)
        code, output, seconds = finish(job, seen, timeout=60)
    finally:
        for pid in stopped:
            kill_if_alive(pid)
    assert code == 10, output
    assert "torchrun still running 10 s after the signal" in output
    assert 10 <= seconds < 2 + 5 + 3 + 5  # GAN_GRACE_SECONDS + SHUTDOWN + KILL margins + exiting


def test_torchrun_is_waited_for_until_every_worker_ended_and_one_did_not_finish():
    def ended(*codes):
        return [WorkerStatus(rank=r, restart=0, code=c, time=r) for r, c in enumerate(codes)]

    assert workers_failed(ended(10, 10)) and workers_failed(ended(0, 4))
    assert not workers_failed(ended(10, None))  # torchrun is still stopping rank 1
    assert not workers_failed(ended(0, 0))  # finished: torchrun waits for the other nodes
    assert not workers_failed([])


def kill_if_alive(pid: int) -> None:
    """SIGCONT then SIGKILL a process this test stopped, if it is still there."""
    for sig in (signal.SIGCONT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return


def test_the_stall_timeout_sits_between_a_pause_and_the_stall_alert():
    from job.settings import Settings

    alerts = (REPO / "monitoring" / "alerts.yaml").read_text()
    default = Settings.model_fields["stall_timeout_seconds"].default
    assert 'changes(gan_step{instance!=""}[15m]) == 0' in alerts
    assert 300 <= default < 15 * 60
