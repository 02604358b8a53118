"""Storage and disk faults injected for real: SeaweedFS stopped for good, a TCP proxy that
refuses, holds or slows S3 connections, a tmpfs too small for what is written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from s3server import SeaweedS3, use_server
from tcpproxy import TcpProxy

from job.gan.models import Arch, build_generator
from job.infra import errors
from job.infra.errors import StorageError
from job.infra.s3_store import make_s3_client
from job.infra.stores import open_store
from job.run import checkpoint
from tests.helpers import REPO, job_env, run_job, write_idx
from tests.test_s3_job import bucket_objects, complete_steps, new_bucket, popen_job, s3_job_env

UPLOAD_TIMEOUT_MINUTES = 0.1  # 6 s of retrying at the end


def wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while text not in (out := log.read_text()):
        assert proc.poll() is None, f"the job exited before {text!r}:\n{out}"
        assert time.monotonic() < deadline, f"no {text!r} after {timeout} s:\n{out}"
        time.sleep(0.05)
    return out


@contextmanager
def job_running(env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """The job in a subprocess, killed if still running when the block ends (a failed test)."""
    proc = popen_job(env, log)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# ---------------------------------------------------------------- S3 down, refusing, slow


def test_store_down_for_good_mid_run_exits_4_naming_what_was_not_stored(tmp_path, monkeypatch):
    """The store gone 80 steps before the end: training goes on (a few seconds, well within the
    15 s the job waits for a write to be stored), then the uploads wait 15 s and the job exits.
    A store gone long before the end: tests/test_store_gone.py."""
    minutes = 0.25
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        bucket = new_bucket(server)
        write_idx(tmp_path / "data", n=256)
        env = s3_job_env(tmp_path, server, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="down",
                         GAN_MAX_STEPS=100, GAN_CHECKPOINT_EVERY=10, GAN_SAMPLE_EVERY=20,
                         GAN_LOG_EVERY=10, GAN_UPLOAD_TIMEOUT_MINUTES=minutes)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"  # botocore's own retries short: the job's outer retry shows
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 20 stored", proc)
            server.stop()
            down = time.monotonic()
            code = proc.wait(timeout=90)  # for ever, before training stopped waiting on uploads
        log = log_path.read_text()
        assert code == errors.EXIT_STORAGE, log
        assert time.monotonic() - down < 60, log  # training, then 15 s of retrying
        assert "stopping at step 100: max_steps" in log  # training went on during the outage
        assert "skipped: earlier ones are still waiting to be stored" in log
        message = last_line(log)
        assert f"not stored after GAN_UPLOAD_TIMEOUT_MINUTES={minutes}" in message
        for key in ("checkpoints/step-00000100/COMPLETE.json", "final/generator.pt"):
            assert key in message
        assert "Traceback" not in log and server.secret_key not in log

        server.start()  # nothing stored before the outage was lost
        use_server(monkeypatch, server, tmp_path)
        store = open_store(f"s3://{bucket}/runs/down")
        deadline = time.monotonic() + 20
        while (found := checkpoint.load_latest(store)) is None:  # volumes take a while to serve
            assert time.monotonic() < deadline, "no complete checkpoint after the restart"
            time.sleep(0.5)
        step, state = found
        assert 20 <= step < 100 and state["run"]["step"] == step
        assert store.exists("config.json")
    finally:
        server.stop()


def test_sigterm_during_an_outage_stops_the_job_within_the_upload_timeout(s3, tmp_path):
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    with TcpProxy(s3.ports["s3"]) as proxy:
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="term",
                         GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                         GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10,
                         GAN_UPLOAD_TIMEOUT_MINUTES=UPLOAD_TIMEOUT_MINUTES)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 20 stored", proc)
            proxy.mode = "refuse"
            proxy.cut()
            wait_for_line(log_path, "storage write failed", proc)
            time.sleep(2)  # dozens of steps: the upload queue is full
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = proc.wait(timeout=60)  # for ever, before training stopped waiting on uploads
    log = log_path.read_text()
    assert time.monotonic() - signalled < 30, log  # the step, 6 s of retrying, the exit
    assert "skipped: earlier ones are still waiting" in log  # training went on
    assert code == errors.EXIT_STOPPED_UNSAVED, log  # no complete checkpoint of the stop step
    stop = int(log.split("stopping at step ")[1].split(":")[0])
    not_stored = log.split(f"checkpoint of step {stop} not stored within ")[1].split("\n")[0]
    assert ": signal" in log and f"checkpoints/step-{stop:08d}/COMPLETE.json" in not_stored
    assert "Traceback" not in log


def test_slow_store_mid_run_skips_checkpoints_and_stores_everything_at_the_end(s3, tmp_path):
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    with TcpProxy(s3.ports["s3"], delay=0.2) as proxy:
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="slow",
                         GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                         GAN_MAX_STEPS=60, GAN_CHECKPOINT_EVERY=5, GAN_SAMPLE_EVERY=30,
                         GAN_LOG_EVERY=10)  # fmt: skip
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 5 stored", proc)
            proxy.mode = "slow"  # every chunk of every request and answer waits 0.2 s
            assert proc.wait(timeout=120) == 0, log_path.read_text()
    log = log_path.read_text()
    assert "skipped: earlier ones are still waiting" in log  # training did not wait
    objects = bucket_objects(s3, bucket, "runs/slow/")
    assert complete_steps(objects)[-1] == 60 and len(complete_steps(objects)) == 3
    assert {"final/generator.pt", "config.json", "report.png"} <= set(objects)
    assert {"samples/step-00000030.png", "samples/step-00000060.png"} <= set(objects)
    rows = objects["metrics.jsonl"].decode().splitlines()
    assert len(rows) == 6  # every row, once


def test_unresponsive_store_at_start_exits_4_in_seconds(s3, tmp_path):
    write_idx(tmp_path / "data", n=64)
    with TcpProxy(s3.ports["s3"], mode="hold") as proxy:  # connections accepted, never answered
        endpoint = f"http://127.0.0.1:{proxy.port}"
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI="s3://bucket/runs",
                         GAN_S3_ENDPOINT_URL=endpoint)  # fmt: skip
        start = time.monotonic()
        result = run_job(env, timeout=120)
    assert result.returncode == errors.EXIT_STORAGE, result.stdout + result.stderr
    assert f"endpoint {endpoint} did not answer in time" in last_line(result.stdout)
    # two 5 s attempts (it was 3 x 10 s): counted, not timed, as a loaded machine slows the
    # start-up; the time bound only says the job did not wait out a default 60 s read timeout
    assert proxy.accepted == 2
    assert time.monotonic() - start < 50


def test_store_check_has_a_deadline_for_a_crawling_endpoint(s3_env, s3_bucket):
    with TcpProxy(s3_env.ports["s3"], mode="slow", delay=1.0) as proxy:  # below read timeouts
        store = open_store(f"s3://{s3_bucket}/run", endpoint_url=f"http://127.0.0.1:{proxy.port}")
        start = time.monotonic()
        with pytest.raises(StorageError, match="is too slow: its check .* took over 3 s"):
            store.check(timeout=3)
        assert time.monotonic() - start < 5


def test_store_check_of_a_silent_endpoint_takes_two_short_attempts(s3_env, s3_bucket):
    with TcpProxy(s3_env.ports["s3"], mode="hold") as proxy:
        store = open_store(f"s3://{s3_bucket}/run", endpoint_url=f"http://127.0.0.1:{proxy.port}")
        start = time.monotonic()
        with pytest.raises(StorageError, match="did not answer in time"):
            store.check()
        assert time.monotonic() - start < 15 and proxy.accepted == 2


def test_aws_max_attempts_counts_attempts_not_retries(s3_env, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    with TcpProxy(s3_env.ports["s3"], mode="hold") as proxy:
        client = make_s3_client(f"http://127.0.0.1:{proxy.port}", read_timeout=0.5)
        with pytest.raises(Exception, match="Read timeout"):
            client.list_objects_v2(Bucket="bucket")
    assert proxy.accepted == 2


# ---------------------------------------------------------------- full disk


def test_sample_onto_a_full_disk_exits_8_leaving_no_file(tmp_path):
    arch = Arch(model="mlp", channels=1, image_size=28, latent_dim=16, width=8, num_classes=0)
    export = tmp_path / "generator.pt"
    torch.save({"arch": arch.to_dict(), "g_ema": build_generator(arch).state_dict()}, export)
    disk = tmp_path / "small-disk"
    disk.mkdir()
    out = disk / "images.npy"
    # 5000 images of 28 x 28 bytes (3.9 MB) onto a 1 MiB tmpfs, in the command's own namespace
    script = (
        f'mount -t tmpfs -o size=1m tmpfs "{disk}" || exit 99; "{sys.executable}" -m job sample '
        f'--checkpoint "{export}" --num 5000 --out "{out}"; code=$?; ls -A "{disk}"; exit $code'
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=job_env(tmp_path),
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == errors.EXIT_DISK_FULL, result.stdout + result.stderr
    message = result.stdout.strip().splitlines()[-1]
    assert f"--out {out}: 3.9 MB of images, 1.0 MB free" in message, result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_rollback_while_the_store_is_gone_exits_4_instead_of_hanging(tmp_path, nproc):
    """A non-finite loss needs the checkpoints queued before it stored before rolling back; with
    the store gone for good the job gives up after GAN_UPLOAD_TIMEOUT_MINUTES (exit 4, retried)
    instead of waiting forever, and the retry resumes once the store is back. With two ranks,
    both give up together: rank 1 waits for rank 0's uploads and fails with the same reason."""
    with SeaweedS3(tmp_path / "weed") as server:
        bucket = new_bucket(server)
        write_idx(tmp_path / "data", n=256)
        env = s3_job_env(tmp_path, server, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="r",
                         GAN_MAX_STEPS=1_000_000, GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10,
                         GAN_UPLOAD_TIMEOUT_MINUTES=UPLOAD_TIMEOUT_MINUTES,
                         GAN_RUN_LEASE_SECONDS=2, GAN_NPROC_PER_NODE=nproc)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"
        poison = tmp_path / "poison-now"
        env.update(PYTHONPATH=f"{REPO / 'tests/poison'}:{REPO}", POISON_FILE=str(poison))
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 10 stored", proc, timeout=150)
            server.stop()
            wait_for_line(log_path, "storage write failed", proc)  # a checkpoint waits
            poison.touch()
            code = proc.wait(timeout=90)
        log = log_path.read_text()
        assert code == 4, log
        assert "rolling back needs the checkpoints queued before it" in log
        assert f"after {UPLOAD_TIMEOUT_MINUTES * 60:g} s (GAN_UPLOAD_TIMEOUT_MINUTES" in log
        assert server.secret_key not in log
        if nproc == 2:
            assert "[rank 1] ERROR rolling back needs the checkpoints queued before it" in log
            return

        server.start()
        poison.unlink()
        env["GAN_MAX_STEPS"] = "60"
        again = run_job(env, timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "resumed from step" in again.stdout


# ---------------------------------------------------------------- a store that fails reads at resume


def test_checkpoints_the_store_cannot_serve_at_resume_exit_4_and_the_run_is_kept(s3, tmp_path):
    """503 SlowDown to every GET of state.pt: the checkpoints are intact, only unreadable now.
    The job must neither skip them as damaged nor start over on top of them."""
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    settings = dict(GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="flaky",
                    GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10,
                    GAN_UPLOAD_TIMEOUT_MINUTES=UPLOAD_TIMEOUT_MINUTES)  # fmt: skip
    assert run_job(s3_job_env(tmp_path, s3, GAN_MAX_STEPS=30, **settings)).returncode == 0
    before = bucket_objects(s3, bucket, "runs/flaky/")
    with TcpProxy(s3.ports["s3"]) as proxy:
        proxy.reject = lambda line: line.startswith(b"GET ") and b"state.pt" in line
        env = s3_job_env(tmp_path, s3, GAN_MAX_STEPS=60,
                         GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", **settings)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "2"
        result = run_job(env, timeout=120)
        assert proxy.rejected > 2  # botocore's attempts, then the job's own retries
    log = result.stdout + result.stderr
    assert result.returncode == errors.EXIT_STORAGE, log
    assert "checkpoints/step-00000030/state.pt: could not be read" in last_line(result.stdout)
    assert "fresh start" not in log and "skipping checkpoint" not in log
    after = bucket_objects(s3, bucket, "runs/flaky/")
    assert complete_steps(after) == complete_steps(before) == [10, 20, 30]
    assert after["metrics.jsonl"] == before["metrics.jsonl"]

    with TcpProxy(s3.ports["s3"]) as proxy:  # a store that fails a few reads, then serves
        proxy.reject = lambda line: b"state.pt" in line and proxy.rejected < 3
        env["GAN_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy.port}"
        env["AWS_MAX_ATTEMPTS"] = "1"
        result = run_job(env, timeout=120)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "cannot read" in log and "resumed from step 30" in log
    assert complete_steps(bucket_objects(s3, bucket, "runs/flaky/")) == [40, 50, 60]


def test_reads_at_resume_give_up_before_the_watchdog_ends_a_group_of_two(s3, tmp_path):
    """Two ranks resume while the store fails every read of state.pt, with GAN_UPLOAD_TIMEOUT_
    MINUTES longer than the stall timeout: the reads are retried for at most half the stall
    timeout, so the job exits 4 naming the part (retried, the run kept), not 10 from a watchdog
    that saw no progress in a read retried for a minute."""
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    settings = dict(GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="two",
                    GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10, GAN_UPLOAD_TIMEOUT_MINUTES=1)  # fmt: skip
    assert run_job(s3_job_env(tmp_path, s3, GAN_MAX_STEPS=10, **settings)).returncode == 0
    with TcpProxy(s3.ports["s3"]) as proxy:
        proxy.reject = lambda line: line.startswith(b"GET ") and b"state.pt" in line
        env = s3_job_env(tmp_path, s3, GAN_MAX_STEPS=20, GAN_NPROC_PER_NODE=2,
                         GAN_STALL_TIMEOUT_SECONDS=8,
                         GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", **settings)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"
        t0 = time.monotonic()
        result = run_job(env, timeout=120)
        seconds = time.monotonic() - t0
    log = result.stdout + result.stderr
    assert result.returncode == errors.EXIT_STORAGE, log
    assert "step-00000010/state.pt: could not be read for 4 s" in log
    assert "stalled" not in log
    assert seconds < 60, log
    assert complete_steps(bucket_objects(s3, bucket, "runs/two/")) == [10]
