"""Real runs of the job (subprocesses, tiny settings) with artifacts and data in a real SeaweedFS.

Credentials reach the job only through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the endpoint
through AWS_ENDPOINT_URL_S3 (or GAN_S3_ENDPOINT_URL where a test says so).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from s3server import SeaweedS3, closed_port, use_server

from job.infra.stores import open_store
from job.run import checkpoint
from job.tools.sample import main as sample_main
from tests.helpers import REPO, job_env, run_job, write_idx

TINY = dict(GAN_DATASET="mnist", GAN_WIDTH=8, GAN_LATENT_DIM=16, GAN_BATCH_SIZE=16)


def s3_job_env(tmp, server: SeaweedS3, **settings) -> dict[str, str]:
    """job_env plus the server's keys and endpoint, as a pod would get them (no ~/.aws files)."""
    env = job_env(tmp, **{**TINY, **settings})
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_MAX_ATTEMPTS"):
        env.pop(name, None)
    env.update(server.env())
    env["AWS_CONFIG_FILE"] = str(tmp / "no-aws-config")
    env["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp / "no-aws-credentials")
    env["OMP_NUM_THREADS"] = "1"  # tiny models; the machine is shared
    return env


def bucket_objects(server: SeaweedS3, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = server.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) :]] = client.get_object(Bucket=bucket, Key=obj["Key"])[
                "Body"
            ].read()
    return out


def new_bucket(server: SeaweedS3) -> str:
    return server.create_bucket(f"job-{uuid.uuid4().hex[:12]}")


def popen_job(env: dict[str, str], log_path, *args: str) -> subprocess.Popen:
    with open(log_path, "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "job", *args],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def complete_steps(objects: dict[str, bytes]) -> list[int]:
    return sorted(
        int(k.split("/")[1][5:])
        for k in objects
        if k.startswith("checkpoints/") and k.endswith("/" + checkpoint.MARKER)
    )


# ---------------------------------------------------------------- a run shared by some tests


@pytest.fixture(scope="module")
def trained(s3, tmp_path_factory):
    """The same 10-step run twice, at once: into S3 and into a local folder (the layout twin)."""
    tmp = tmp_path_factory.mktemp("s3job")
    write_idx(tmp / "data", n=128)
    bucket = new_bucket(s3)
    common = dict(GAN_MAX_STEPS=10, GAN_CHECKPOINT_EVERY=5, GAN_SAMPLE_EVERY=5, GAN_RUN_ID="r1")
    s3_env = s3_job_env(tmp, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", **common)
    local_env = s3_job_env(tmp, s3, GAN_ARTIFACT_URI=str(tmp / "local"), **common)
    procs = [popen_job(e, tmp / f"{n}.log") for n, e in (("s3", s3_env), ("local", local_env))]
    codes = [p.wait(timeout=120) for p in procs]
    logs = {n: (tmp / f"{n}.log").read_text() for n in ("s3", "local")}
    assert codes == [0, 0], logs
    return {
        "tmp": tmp,
        "bucket": bucket,
        "env": s3_env,
        "log": logs["s3"],
        "uri": f"s3://{bucket}/runs/r1",
    }


def test_run_stores_every_artifact_in_s3_like_the_local_store(s3, trained):
    objects = bucket_objects(s3, trained["bucket"], "runs/r1/")
    local_root = trained["tmp"] / "local" / "r1"
    local = sorted(
        p.relative_to(local_root).as_posix() for p in local_root.rglob("*") if p.is_file()
    )
    assert sorted(objects) == local
    assert {
        "config.json",
        "metrics.jsonl",
        "final/generator.pt",
        "samples/step-00000005.png",
        "samples/step-00000010.png",
        "checkpoints/step-00000005/state.pt",
        "checkpoints/step-00000005/COMPLETE.json",
        "checkpoints/step-00000010/state.pt",
        "checkpoints/step-00000010/COMPLETE.json",
    } <= set(objects)
    assert not any(".gan-job-probe" in k for k in bucket_objects(s3, trained["bucket"]))
    config = json.loads(objects["config.json"])
    assert config["settings"]["artifact_uri"] == f"s3://{trained['bucket']}/runs"
    assert [json.loads(line)["step"] for line in objects["metrics.jsonl"].splitlines()] == [5, 10]
    assert objects["samples/step-00000010.png"].startswith(b"\x89PNG")
    marker = json.loads(objects["checkpoints/step-00000010/COMPLETE.json"])
    assert marker["parts"]["state.pt"]["size"] == len(objects["checkpoints/step-00000010/state.pt"])
    everything = trained["log"].encode() + b"".join(objects.values())
    assert s3.secret_key.encode() not in everything


def test_resume_from_s3_after_a_stop_skips_an_incomplete_checkpoint(s3, trained):
    # the shared run stopped at step 10 (its max): a copy of it is this test's run
    bucket, client = trained["bucket"], s3.client()
    for key in bucket_objects(s3, bucket, "runs/r1/"):
        client.copy_object(Bucket=bucket, Key=f"runs/r2/{key}",
                           CopySource={"Bucket": bucket, "Key": f"runs/r1/{key}"})  # fmt: skip
    env = dict(trained["env"], GAN_RUN_ID="r2", GAN_MAX_STEPS="15")
    second = run_job(env)
    assert second.returncode == 0, output(second)
    assert "resumed from step 10" in second.stdout
    objects = bucket_objects(s3, bucket, "runs/r2/")
    assert complete_steps(objects) == [5, 10, 15]

    # a checkpoint without its marker (as after a stop mid-upload) is not used
    client.delete_object(Bucket=bucket, Key="runs/r2/checkpoints/step-00000015/COMPLETE.json")
    env["GAN_MAX_STEPS"] = "20"
    third = run_job(env)
    assert third.returncode == 0, output(third)
    assert "resumed from step 10" in third.stdout
    objects = bucket_objects(s3, bucket, "runs/r2/")
    assert complete_steps(objects) == [10, 15, 20]  # rewritten; GAN_KEEP_CHECKPOINTS=3
    steps = [json.loads(line)["step"] for line in objects["metrics.jsonl"].splitlines()]
    assert steps == [5, 10, 15, 20]
    for result in (second, third):
        assert s3.secret_key not in output(result)


def test_store_failures_exit_4_before_training(s3, s3_bucket, tmp_path):
    write_idx(tmp_path / "data", n=64)
    wrong_secret = "wrong-secret-Qx73PzL0"
    bad_key = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{s3_bucket}/runs")
    bad_key["AWS_SECRET_ACCESS_KEY"] = wrong_secret
    no_bucket = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI="s3://no-such-bucket-4711/runs")
    # GAN_S3_ENDPOINT_URL wins over AWS_ENDPOINT_URL_S3 (which names the live server)
    closed = closed_port()
    unreachable = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{s3_bucket}/runs",
                             GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{closed}")  # fmt: skip
    cases = {"bad_key": bad_key, "no_bucket": no_bucket, "unreachable": unreachable}
    start = time.monotonic()
    procs = {name: popen_job(env, tmp_path / f"{name}.log") for name, env in cases.items()}
    codes = {name: p.wait(timeout=60) for name, p in procs.items()}
    elapsed = time.monotonic() - start
    logs = {name: (tmp_path / f"{name}.log").read_text() for name in cases}
    assert codes == {name: 4 for name in cases}, logs
    assert elapsed < 60, logs  # seconds for three jobs at once, torch imports included

    assert f"s3://{s3_bucket}/runs" in logs["bad_key"] and "access denied" in logs["bad_key"]
    assert "no such bucket 'no-such-bucket-4711'" in logs["no_bucket"]
    assert f"cannot reach endpoint http://127.0.0.1:{closed}" in logs["unreachable"]
    for log in logs.values():
        assert wrong_secret not in log and s3.secret_key not in log
        assert "step " not in log and "Traceback" not in log
    assert bucket_objects(s3, s3_bucket) == {}


def test_dataset_from_s3_is_downloaded_once(s3, tmp_path):
    bucket = new_bucket(s3)
    idx = write_idx(tmp_path / "upload", n=96, gz=False)
    client = s3.client()
    for path in idx.iterdir():
        client.upload_file(str(path), bucket, f"datasets/digits/{path.name}")
    env = s3_job_env(tmp_path, s3, GAN_DATASET=f"s3://{bucket}/datasets/digits", GAN_IMAGE_SIZE=28,
                     GAN_ARTIFACT_URI=str(tmp_path / "runs"), GAN_MAX_STEPS=4)  # fmt: skip
    first = run_job(env)
    assert first.returncode == 0, output(first)
    assert "downloaded 2 objects" in first.stdout
    cache = tmp_path / "data" / "s3" / bucket / "datasets" / "digits"
    marker = cache / ".download-complete"
    assert marker.read_text() == f"s3://{bucket}/datasets/digits"
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix != ".lock"}
    config = json.loads((tmp_path / "runs" / "digits-dcgan" / "config.json").read_text())
    assert config["arch"]["image_size"] == 28 and config["arch"]["channels"] == 1

    # gone from the bucket: the second run can only be reading its local copy
    for path in idx.iterdir():
        client.delete_object(Bucket=bucket, Key=f"datasets/digits/{path.name}")
    env["GAN_MAX_STEPS"] = "8"
    second = run_job(env)
    assert second.returncode == 0, output(second)
    assert "resumed from step 4" in second.stdout and "downloaded" not in second.stdout
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir() if p.suffix != ".lock"} == mtimes


def test_outage_mid_run_is_retried_and_every_artifact_lands(tmp_path, monkeypatch):
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        bucket = new_bucket(server)
        write_idx(tmp_path / "data", n=256)
        max_steps = 200
        env = s3_job_env(tmp_path, server, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="o",
                         GAN_MAX_STEPS=max_steps, GAN_CHECKPOINT_EVERY=10, GAN_SAMPLE_EVERY=50,
                         GAN_LOG_EVERY=10)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "2"  # botocore's own retries short: the job's outer retry shows
        log_path = tmp_path / "job.log"
        proc = popen_job(env, log_path)
        deadline = time.monotonic() + 60
        while "checkpoint at step 30 " not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        before = log_path.read_text()
        server.stop()
        assert proc.poll() is None, "the job finished before the outage"
        assert "stopping at step" not in before
        down_at = time.monotonic()
        while "storage write failed" not in log_path.read_text():
            assert time.monotonic() - down_at < 15, log_path.read_text()
            time.sleep(0.1)
        time.sleep(max(0.0, 3 - (time.monotonic() - down_at)))
        assert proc.poll() is None  # waiting on its uploads, or still training
        server.start()

        assert proc.wait(timeout=90) == 0, log_path.read_text()
        log = log_path.read_text()
        assert "storage write failed" in log and "retrying in" in log
        after_outage = log[log.index("storage write failed") :]
        assert f"step {max_steps}/{max_steps}" in after_outage
        assert server.secret_key not in log

        objects = bucket_objects(server, bucket, "runs/o/")
        samples = {f"samples/step-{s:08d}.png" for s in range(50, max_steps + 1, 50)}
        assert {"config.json", "metrics.jsonl", "final/generator.pt", *samples} <= set(objects)
        # GAN_KEEP_CHECKPOINTS=3, older ones pruned; those due while two waited were skipped
        kept = complete_steps(objects)
        assert len(kept) == 3 and kept[-1] == max_steps
        ckpts = {k.split("/")[1] for k in objects if k.startswith("checkpoints/")}
        assert ckpts == {f"step-{s:08d}" for s in kept}
        steps = [json.loads(line)["step"] for line in objects["metrics.jsonl"].splitlines()]
        assert steps == list(range(10, max_steps + 1, 10))

        use_server(monkeypatch, server, tmp_path)
        step, state = checkpoint.load_latest(open_store(f"s3://{bucket}/runs/o"))
        assert step == max_steps and state["run"]["step"] == max_steps
    finally:
        server.stop()


def test_resume_from_an_s3_checkpoint_uri_and_sample_from_s3(s3, trained, tmp_path, monkeypatch):
    env = dict(trained["env"])
    env.update(GAN_RUN_ID="from-uri", GAN_MAX_STEPS="13",
               GAN_RESUME=f"{trained['uri']}/checkpoints/step-00000005")  # fmt: skip
    resumed = run_job(env)
    assert resumed.returncode == 0, output(resumed)
    assert "resumed from step 5" in resumed.stdout
    objects = bucket_objects(s3, trained["bucket"], "runs/from-uri/")
    assert "checkpoints/step-00000013/COMPLETE.json" in objects
    assert complete_steps(objects) == [10, 13]

    out = tmp_path / "x.npy"
    result = run_job(env, "sample", "--checkpoint", trained["uri"], "--num", "4", "--out", str(out))
    assert result.returncode == 0, output(result)
    images = np.load(out)
    assert images.shape == (4, 28, 28) and images.dtype == np.uint8
    assert s3.secret_key not in output(resumed) + output(result)

    # in this process: the export, with the endpoint given only as GAN_S3_ENDPOINT_URL
    use_server(monkeypatch, s3, tmp_path)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("GAN_S3_ENDPOINT_URL", s3.endpoint_url)
    export = f"{trained['uri']}/final/generator.pt"
    assert (
        sample_main(["--checkpoint", export, "--num", "4", "--out", str(tmp_path / "y.npy")]) == 0
    )
    assert np.array_equal(np.load(tmp_path / "y.npy"), images)  # newest checkpoint's EMA G
