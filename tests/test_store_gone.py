"""A store that stops taking writes, for good, mid-run and at a stop signal: the job must neither
train on for its whole budget with nothing stored nor outlast its grace period waiting on it.
Real jobs against a real SeaweedFS behind a TCP proxy that holds connections or answers 503."""

from __future__ import annotations

import signal
import time

import pytest
from tcpproxy import TcpProxy

from job.infra import errors
from tests.helpers import write_idx
from tests.test_faults import job_running, last_line, wait_for_line
from tests.test_s3_job import bucket_objects, complete_steps, new_bucket, s3_job_env

BUDGET = 1_000_000  # steps: days of a run, were the job to train on with nothing stored


@pytest.mark.parametrize("fault", ["hold", "refuse"])
def test_a_store_gone_for_good_mid_run_stops_with_4_and_the_rerun_resumes(s3, tmp_path, fault):
    """No write stored for GAN_UPLOAD_TIMEOUT_MINUTES (6 s) while writes wait: exit 4 naming
    the store, long before the budget's end; once the store is back the rerun resumes from the
    newest checkpoint stored."""
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    with TcpProxy(s3.ports["s3"]) as proxy:
        endpoint = f"http://127.0.0.1:{proxy.port}"
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="gone",
                         GAN_S3_ENDPOINT_URL=endpoint, GAN_MAX_STEPS=BUDGET,
                         GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10,
                         GAN_UPLOAD_TIMEOUT_MINUTES=0.1)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 20 stored", proc, timeout=120)
            proxy.mode = fault
            proxy.cut()
            gone = time.monotonic()
            code = proc.wait(timeout=120)  # for ever before: it trained on to GAN_MAX_STEPS
        seconds = time.monotonic() - gone
        log = log_path.read_text()
        assert code == errors.EXIT_STORAGE, log
        message = last_line(log)
        assert f"s3://{bucket}/runs/gone: no write stored for " in message, log
        assert "GAN_UPLOAD_TIMEOUT_MINUTES=0.1" in message and "not stored: " in message
        assert "checkpoints/step-" in message and "A retry resumes from the newest" in message
        assert seconds < 60, log  # 6 s without a write, the run lock's release, the exit
        assert "Traceback" not in log and s3.secret_key not in log

        proxy.mode = "pass"
        stored = complete_steps(bucket_objects(s3, bucket, "runs/gone/"))
        assert stored and stored[-1] >= 20
        env["GAN_MAX_STEPS"] = str(stored[-1] + 10)
        with job_running(env, log_path) as proc:
            assert proc.wait(timeout=180) == 0, log_path.read_text()
        assert f"resumed from step {stored[-1]}" in log_path.read_text()


@pytest.mark.parametrize("when", ["mid-run", "after the last step"])
def test_sigterm_while_the_store_answers_503_exits_10_within_the_grace_period(s3, tmp_path, when):
    """Every request answered 503 SlowDown, and a Pushgateway that never answers, then
    SIGTERM: every wait after the signal (the uploads, the export, the run lock's release, the
    push) ends within GAN_GRACE_SECONDS (10 s), so a pod's SIGKILL never comes first; the
    checkpoint of the stop step is not stored: 10, naming it."""
    write_idx(tmp_path / "data", n=256)
    bucket = new_bucket(s3)
    max_steps = BUDGET if when == "mid-run" else 300
    with TcpProxy(s3.ports["s3"]) as proxy, TcpProxy(s3.ports["s3"], mode="hold") as gateway:
        env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="term",
                         GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}",
                         GAN_PUSHGATEWAY_URL=f"http://127.0.0.1:{gateway.port}",
                         GAN_MAX_STEPS=max_steps, GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=10,
                         GAN_GRACE_SECONDS=10, GAN_UPLOAD_TIMEOUT_MINUTES=30)  # fmt: skip
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "checkpoint at step 20 stored", proc, timeout=120)
            proxy.reject = lambda line: True
            if when == "mid-run":
                wait_for_line(log_path, "storage write failed", proc)
            else:
                wait_for_line(log_path, f"stopping at step {max_steps}: max_steps", proc)
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = proc.wait(timeout=200)
        seconds = time.monotonic() - signalled
    log = log_path.read_text()
    assert seconds < 20, f"{seconds:.0f} s after SIGTERM:\n{log}"
    assert code == errors.EXIT_STOPPED_UNSAVED, log
    assert "not stored within GAN_GRACE_SECONDS=10" in log and "COMPLETE.json" in log, log
    assert "Traceback" not in log
