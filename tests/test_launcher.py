"""The container's exit status and its grace period, with real torchrun, signals and stores.

torchrun exits 1 whatever its workers returned and kills them 30 s after SIGTERM; gan-job's
launcher (job/infra/launcher.py) reports the first failing worker's status and gives workers
GAN_GRACE_SECONDS. GAN_DEVICE=cuda without a usable GPU stops before any work (exit 9).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from s3server import SeaweedS3, free_ports

from job.infra.distributed import CudaFacts, cuda_problem, has_kernels_for
from job.infra.launcher import WorkerStatus, job_status
from tests.helpers import REPO, job_env, run_job, write_idx

TWO = dict(GAN_NPROC_PER_NODE=2, GAN_DEVICE="cpu")


# ---------------------------------------------------------------- the exit status, as a rule


def status(rank, code, t, restart=0):
    return WorkerStatus(rank=rank, restart=restart, code=code, time=t)


def test_the_first_failure_wins_over_the_failures_it_caused():
    # rank 1 lost its data; rank 0's collective then broke (10) and rank 2 crashed on it (1)
    statuses = [status(0, 10, 2.0), status(1, 3, 1.0), status(2, 1, 1.5)]
    assert job_status(1, statuses, signalled=False)[0] == 3
    assert job_status(0, statuses, signalled=False)[0] == 0  # torchrun says all is well


def test_a_stop_is_75_only_when_every_worker_stored_its_checkpoint():
    assert job_status(1, [status(0, 75, 1), status(1, 75, 1)], signalled=True)[0] == 75
    assert job_status(1, [status(0, 75, 1), status(1, None, 1)], signalled=True)[0] == 10
    assert job_status(1, [status(0, 10, 1), status(1, 10, 1)], signalled=True)[0] == 10
    assert job_status(1, [], signalled=True)[0] == 10  # stopped before the workers started


def test_workers_killed_because_another_node_failed_are_retryable_not_1():
    code, why = job_status(1, [status(8, None, 1), status(9, 10, 2)], signalled=False)
    assert code == 10 and "[8]" in why


def test_only_torchruns_latest_attempt_counts():
    statuses = [status(0, 3, 1.0, restart=0), status(0, 10, 5.0, restart=1)]
    assert job_status(1, statuses, signalled=False)[0] == 10


def test_torchrun_failing_on_its_own_keeps_its_status():
    assert job_status(2, [], signalled=False)[0] == 2  # e.g. a bad torchrun option


# ---------------------------------------------------------------- the device check, as a rule

GPU = CudaFacts(
    torch_cuda="13.0", driver_cuda=13000, available=True, device_count=2, local_rank=1,
    capability=(9, 0), arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"),
    visible_devices="0,1",
)  # fmt: skip


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(torch_cuda=None), "built without CUDA"),
        (dict(driver_cuda=None, available=False, device_count=0), "no NVIDIA driver"),
        (dict(driver_cuda=12040, available=False, device_count=0),
         "driver supports CUDA 12.4, torch is built for CUDA 13.0"),
        (dict(available=False, device_count=0, visible_devices=""),
         "is_available() is false: the driver (CUDA 13.0) sees no usable GPU (CUDA_VISIBLE_DEVICES=)"),
        (dict(local_rank=2), "local rank 2 has no GPU of its own: 2 visible"),
        (dict(capability=(6, 1)), "compute capability 6.1; this torch has kernels for sm_75"),
    ],
)  # fmt: skip
def test_cuda_problems_are_named(change, expected):
    assert expected in cuda_problem(CudaFacts(**{**GPU.__dict__, **change}))


def test_a_usable_gpu_has_no_problem():
    assert cuda_problem(GPU) is None
    assert cuda_problem(CudaFacts(**{**GPU.__dict__, "driver_cuda": 13020})) is None


def test_kernels_run_on_later_minors_of_their_major_and_ptx_on_anything_later():
    assert has_kernels_for((8, 9), ("sm_80", "sm_86"))
    assert not has_kernels_for((8, 0), ("sm_86",))
    assert not has_kernels_for((10, 0), ("sm_90", "sm_90a"))
    assert has_kernels_for((9, 0), ("sm_90a",)) and not has_kernels_for((9, 1), ("sm_90a",))
    assert has_kernels_for((12, 0), ("sm_90", "compute_90"))


# ---------------------------------------------------------------- real jobs


def start_job(env, *args) -> subprocess.Popen:
    env = dict(env, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "job", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip


def read_until(job: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    lines, deadline = [], time.monotonic() + timeout
    for line in job.stdout:
        lines.append(line)
        if marker in line:
            return "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
    raise AssertionError(f"job ended before {marker!r}:\n" + "".join(lines))


def stop(job: subprocess.Popen, seen: str, timeout: float = 60) -> tuple[int, str, float]:
    """SIGTERM the job: (exit status, whole output, seconds it took to exit); killed and an
    AssertionError when it runs on for timeout seconds."""
    t0 = time.monotonic()
    job.send_signal(signal.SIGTERM)
    try:
        rest, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        rest, _ = job.communicate()
        raise AssertionError(f"still running {timeout} s after SIGTERM:\n{seen}{rest}") from None
    return job.returncode, seen + rest, time.monotonic() - t0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
@pytest.mark.parametrize("nproc", [1, 2])
def test_cuda_without_a_gpu_exits_9_before_loading_data(tmp_path, nproc):
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cuda", GAN_NPROC_PER_NODE=nproc)
    result = run_job(env, timeout=120)  # no dataset either: it must not get that far (3)
    assert result.returncode == 9, result.stdout + result.stderr
    assert "GAN_DEVICE=cuda: no NVIDIA driver: libcuda.so.1 cannot be loaded" in result.stdout
    assert "GAN_DATASET" not in result.stdout


def test_two_processes_exit_with_the_workers_status_not_torchruns(tmp_path):
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist", **TWO), timeout=120)  # no data
    assert result.returncode == 3, result.stdout + result.stderr
    assert "GAN_DATASET=mnist: no data found" in result.stdout
    assert "exit 3: rank" in result.stdout and "failed first" in result.stdout


def test_a_nonfinite_loss_on_one_of_two_processes_exits_7(tmp_path):
    write_idx(tmp_path / "data", n=256)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_NONFINITE="fail", GAN_MAX_STEPS=20, **TWO)
    env.update(PYTHONPATH=f"{REPO / 'tests/poison'}:{REPO}", POISON_STEP="2", POISON_RANK="1")
    result = run_job(env, timeout=120)
    assert result.returncode == 7, result.stdout + result.stderr
    assert "non-finite loss by step 5" in result.stdout and "GAN_NONFINITE=fail" in result.stdout
    for rank in (0, 1):  # the start-up log names each rank's device and the world size
        assert f"[rank {rank}] INFO rank {rank} of world size 2 on cpu (" in result.stdout


def test_on_two_nodes_the_failing_node_exits_with_its_status_and_the_other_10(tmp_path):
    """Two gan-job launchers meeting at a c10d rendezvous, as two pods would; one node lacks
    the dataset, the other loses its peer and must not report a bug (1)."""
    write_idx(tmp_path / "with-data" / "data", n=256)
    port = free_ports(1)[0]
    jobs = []
    for rank, node in enumerate(("no-data", "with-data")):
        env = job_env(tmp_path / node, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_RUN_ID="mn",
                      GAN_NNODES=2, GAN_NODE_RANK=rank, GAN_NPROC_PER_NODE=1,
                      GAN_RDZV_ENDPOINT=f"127.0.0.1:{port}",
                      GAN_ARTIFACT_URI=tmp_path / "runs")  # fmt: skip  # per node: the data only
        jobs.append(start_job(env))
    outputs = [job.communicate(timeout=120)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [3, 10], outputs
    assert "GAN_DATASET=mnist: no data found" in outputs[0]
    assert "WARNING exit 10: " in outputs[1]  # its worker lost its peer, or was stopped
    assert "unexpected failure" not in outputs[1]


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of the torchrun worker of this rank under the launcher's torchrun."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    for torchrun in children.get(launcher, []):
        for pid in children.get(torchrun, []):
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in environ:
                return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher}")


def test_a_stuck_worker_is_killed_after_the_grace_period_not_torchruns_30_s(tmp_path):
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=100000, GAN_LOG_EVERY=10,
                  GAN_GRACE_SECONDS=2, **TWO)  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "step 10/")
    os.kill(worker_pid(job.pid, 1), signal.SIGSTOP)  # rank 0 now waits on it in a collective
    code, output, seconds = stop(job, seen)
    assert code == 10, output
    assert "were killed after the grace period" in output
    assert seconds < 2 + 5 + 10  # GAN_GRACE_SECONDS + SHUTDOWN_MARGIN + exiting; torchrun: 30+


# ---------------------------------------------------------------- with a store that hangs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SeaweedFS S3 server of this module's own: the tests freeze it."""
    server = SeaweedS3(tmp_path_factory.mktemp("weed"))
    server.start()
    yield server
    server.proc.kill()  # its data is of no further use; a clean stop takes seconds
    server.proc.wait()


@contextmanager
def frozen(server: SeaweedS3):
    """The server stopped in its tracks (SIGSTOP): requests hang until it is thawed."""
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)


def s3_env(tmp, server: SeaweedS3, **settings) -> tuple[dict[str, str], str]:
    bucket = server.create_bucket(f"launch-{uuid.uuid4().hex[:10]}")
    env = job_env(tmp, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="r", **settings)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS"):
        env.pop(name, None)
    env.update(server.env(), AWS_CONFIG_FILE=str(tmp / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"))  # fmt: skip
    return env, bucket


def stop_step(output: str) -> int:
    return int(output.split("stopping at step ")[1].split(":")[0])


def complete(server: SeaweedS3, bucket: str, step: int) -> bool:
    key = f"runs/r/checkpoints/step-{step:08d}/COMPLETE.json"
    listed = server.client().list_objects_v2(Bucket=bucket, Prefix=key)
    return listed.get("KeyCount", 0) == 1


@pytest.mark.parametrize(
    "nproc, grace, store_back_after, expected", [(1, 3, None, 10), (2, 3, None, 10), (2, 30, 4, 75)]
)
def test_sigterm_exits_75_only_if_the_checkpoint_is_stored_within_the_grace_period(
    tmp_path, store, nproc, grace, store_back_after, expected
):
    write_idx(tmp_path / "data", n=512)
    env, bucket = s3_env(tmp_path, store, GAN_DATASET="mnist", GAN_MAX_STEPS=100000,
                         GAN_LOG_EVERY=10, GAN_CHECKPOINT_EVERY=100000, GAN_SAMPLE_EVERY=100000,
                         GAN_GRACE_SECONDS=grace, GAN_NPROC_PER_NODE=nproc,
                         GAN_DEVICE="cpu")  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "step 10/")
    with frozen(store):
        t0 = time.monotonic()
        job.send_signal(signal.SIGTERM)
        if store_back_after:
            time.sleep(store_back_after)
        else:
            job.wait(timeout=60)
    rest, _ = job.communicate(timeout=60)
    output, seconds = seen + rest, time.monotonic() - t0
    assert job.returncode == expected, output
    step = stop_step(output)
    assert complete(store, bucket, step) == (expected == 75)
    if expected == 75:
        assert f"checkpoint of step {step} stored: exit 75" in output and seconds > store_back_after
    else:
        assert f"checkpoint of step {step} not stored within GAN_GRACE_SECONDS=3 or" in output
        assert seconds < 3 + 15  # it does not wait for the store (frozen for good)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_while_loading_data_exits_10_saying_so(tmp_path, store, nproc):
    env, _ = s3_env(tmp_path, store, GAN_DATASET="s3://nowhere/data", GAN_NPROC_PER_NODE=nproc,
                    GAN_DEVICE="cpu")  # fmt: skip
    with frozen(store):  # the download of the dataset hangs
        job = start_job(env)
        seen = read_until(job, "of world size")
        time.sleep(1)
        code, output, _ = stop(job, seen)
    assert code == 10, output
    assert "stopped by SIGTERM during start-up, before training: nothing new to save" in output
    assert "unexpected failure" not in output


def write_slow_extractor(path: Path) -> Path:
    """A TorchScript extractor (N x 1 x H x W -> N x 128) that takes about 10 ms an image on
    one CPU thread: real-image statistics of thousands of images take tens of seconds."""
    nn = torch.nn
    convs = [nn.Conv2d(1, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1)]
    convs.append(nn.Conv2d(128, 128, 3, padding=1))
    torch.jit.script(nn.Sequential(*convs, nn.AdaptiveAvgPool2d(1), nn.Flatten())).save(str(path))
    return path


def test_sigterm_while_computing_real_fid_statistics_exits_10_at_once(tmp_path):
    write_idx(tmp_path / "data", n=3000)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_FID_NUM_SAMPLES=10000,
                  GAN_FID_FEATURES=write_slow_extractor(tmp_path / "slow.pt"),
                  GAN_GRACE_SECONDS=15)  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "computing real-image statistics")
    code, output, _ = stop(job, seen, timeout=10)  # the statistics alone take 30 s
    assert code == 10, output
    assert "stopped by SIGTERM during start-up, before training: nothing new to save" in output


def signal_until_exit(job: subprocess.Popen, every: float = 0.02) -> int:
    """SIGTERM the job every so many seconds until it exits: how many were sent."""
    sent = 0
    while job.poll() is None:
        job.send_signal(signal.SIGTERM)
        sent += 1
        time.sleep(every)
    return sent


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_again_while_stopping_is_ignored_and_the_job_still_exits_75(tmp_path, nproc):
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_NPROC_PER_NODE=nproc,
                  GAN_MAX_STEPS=100000, GAN_LOG_EVERY=10, GAN_CHECKPOINT_EVERY=100000,
                  GAN_SAMPLE_EVERY=100000)  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "step 10/")
    job.send_signal(signal.SIGTERM)
    seen += read_until(job, "stopping at step")
    sent = signal_until_exit(job)  # while it stores the checkpoint, and until the process is gone
    output = seen + job.stdout.read()
    assert job.returncode == 75, output
    assert sent > 1 and output.count("SIGTERM again: ignored, the ") == 1, output


def test_sigterm_again_during_start_up_is_ignored_and_the_job_still_exits_10(tmp_path):
    write_idx(tmp_path / "data", n=3000)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_FID_NUM_SAMPLES=10000,
                  GAN_FID_FEATURES=write_slow_extractor(tmp_path / "slow.pt"))  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "computing real-image statistics")
    sent = signal_until_exit(job)  # the first stops it; the others come while it cleans up, exits
    output = seen + job.stdout.read()
    assert job.returncode == 10, output
    assert "stopped by SIGTERM during start-up" in output and "Traceback" not in output
    # logged once at most: the job may be gone before a second signal is handled (the first
    # ones coalesce while torch computes, and the exit after Stopped takes milliseconds)
    assert sent > 1 and output.count("SIGTERM again: ignored, the job") <= 1, output


def training_job(tmp_path: Path, nproc: int, **settings) -> subprocess.Popen:
    """A job that trains until it is stopped, logging every 10 steps."""
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_NPROC_PER_NODE=nproc,
                  GAN_MAX_STEPS=100000, GAN_LOG_EVERY=10, GAN_CHECKPOINT_EVERY=100000,
                  GAN_SAMPLE_EVERY=100000, **settings)  # fmt: skip
    return start_job(env)


@pytest.mark.parametrize("nproc", [1, 2])
def test_sighup_stops_like_sigterm_with_a_checkpoint_and_75(tmp_path, nproc):
    """A terminal or SSH session that drops: once ignored (a run went on for 200 s)."""
    job = training_job(tmp_path, nproc)
    seen = read_until(job, "step 10/")
    job.send_signal(signal.SIGHUP)
    try:
        rest, _ = job.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        job.kill()
        raise AssertionError(
            f"still running 60 s after SIGHUP:\n{seen}{job.stdout.read()}"
        ) from None
    output = seen + rest
    assert job.returncode == 75, output
    assert "stopping at step" in output and "signal" in output
    assert "stored: exit 75, a retry resumes here" in output


def test_sighup_during_start_up_exits_10_saying_so(tmp_path):
    write_idx(tmp_path / "data", n=3000)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_FID_NUM_SAMPLES=10000,
                  GAN_FID_FEATURES=write_slow_extractor(tmp_path / "slow.pt"))  # fmt: skip
    job = start_job(env)
    seen = read_until(job, "computing real-image statistics")
    job.send_signal(signal.SIGHUP)
    rest, _ = job.communicate(timeout=30)
    assert job.returncode == 10, seen + rest
    assert "stopped by SIGHUP during start-up, before training" in rest


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigquit_writes_every_threads_stack_and_the_run_goes_on(tmp_path, nproc):
    """What an operator wants from a job that looks stuck; under gan-job's launcher the
    workers get it (torchrun would take it as a death signal)."""
    job = training_job(tmp_path, nproc)
    seen = read_until(job, "step 10/")
    job.send_signal(signal.SIGQUIT)
    seen += read_until(job, "step 40/")  # still training
    stacks = seen.count("most recent call first")
    assert stacks >= 2 * nproc, seen  # the main thread and the run lock's (on rank 0) at least
    assert 'job/run/train.py", line' in seen and "Current thread" in seen, seen
    code, output, _ = stop(job, seen)
    assert code == 75, output
    if nproc > 1:
        assert "SIGQUIT: passed on to the workers" in output


def test_the_first_failure_stays_first_across_a_wall_clock_jump_back(tmp_path, monkeypatch):
    """Workers order their failures by a clock that a jump of the wall clock (NTP, a VM
    resumed) does not move: rank 0 fails, the clock goes back a day, rank 1 fails after it."""
    from job.infra.launcher import STATUS_DIR_ENV, read_statuses, record_status

    monkeypatch.setenv(STATUS_DIR_ENV, str(tmp_path))
    wall = iter([time.time(), time.time() - 86400])
    monkeypatch.setattr(time, "time", lambda: next(wall))
    for rank, code in ((0, 3), (1, 7)):
        monkeypatch.setenv("RANK", str(rank))
        record_status(code)
        time.sleep(0.01)
    assert job_status(1, read_statuses(tmp_path), signalled=False)[0] == 3
