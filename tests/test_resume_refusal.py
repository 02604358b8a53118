"""A run that has artifacts is never started over: transient faults at resume that make the
run's checkpoints look damaged or absent end the job with exit 5, the run left as it was.

The faults are real: a SeaweedFS server behind a proxy (tests/tcpproxy.py) that answers some
requests itself, as a misconfigured gateway or a store that lies would."""

from __future__ import annotations

import json

import pytest
import torch
from tcpproxy import TcpProxy, http_response

from job.infra.distributed import World
from job.infra.errors import EXIT_CHECKPOINT, CheckpointError
from job.infra.jsonl_log import JsonlLog
from job.infra.local_store import LocalStore
from job.infra.metrics import Metrics
from job.infra.writer import BackgroundWriter
from job.run.checkpoint import Checkpointer, complete_steps, step_dir
from job.run.resume import Past, resume_choice
from tests.helpers import run_job, write_idx
from tests.test_s3_job import bucket_objects, new_bucket, s3_job_env

HTML = b"<html><body><h1>Welcome</h1>Please sign in to continue.</body></html>"
EMPTY_LISTING = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult '
    b'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>%s</Name><Prefix></Prefix>'
    b"<KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>false</IsTruncated>"
    b"</ListBucketResult>"
)
RUN = dict(GAN_CHECKPOINT_EVERY=10, GAN_LOG_EVERY=5, GAN_SAMPLE_EVERY=10, GAN_KEEP_CHECKPOINTS=3)


# ---------------------------------------------------------------- in-process: the rule


ONE_PROCESS = World(0, 1, 0, torch.device("cpu"))
META = {"settings": {"dataset": "mnist"}, "arch": {"model": "mlp"}, "run_id": "r"}


class Value:
    def __init__(self):
        self.value, self.fresh = 0, False

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]

    def start_fresh(self) -> None:
        self.fresh = True


def checkpointer(store, writer, resume="auto") -> tuple[Checkpointer, Value, JsonlLog]:
    value, history = Value(), JsonlLog("metrics.jsonl", writer, store)
    c = Checkpointer(store=store, writer=writer, world=ONE_PROCESS, meta=META,
                     components={"run": value, "records": history}, compatible_settings=(),
                     every=10, keep=3, metrics=Metrics(False), resume=resume)  # fmt: skip
    return c, value, history


def a_run(store: LocalStore, steps: int) -> None:
    """A run of `steps` steps: a metrics row every 5 steps, a checkpoint every 10."""
    with BackgroundWriter(store) as writer:
        c, value, history = checkpointer(store, writer)
        assert c.restore() is None
        for step in range(5, steps + 1, 5):
            value.value = step
            history.append({"step": step})
            c.maybe_save(step)
            writer.flush(10)


def test_no_usable_checkpoint_over_a_runs_history_is_refused_not_started_over(tmp_path):
    run = LocalStore(tmp_path / "run")
    a_run(run, 30)
    assert complete_steps(run) == [10, 20, 30]
    # every checkpoint fails its checksum (a gateway's page instead of state.pt)
    for step in (10, 20, 30):
        (run.root / step_dir(step) / "state.pt").write_bytes(HTML)
    files = {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()}
    for resume in ("auto", str(tmp_path / "elsewhere")):
        with BackgroundWriter(run) as writer:
            c, value, _ = checkpointer(run, writer, resume)
            with pytest.raises(CheckpointError) as refused:
                c.restore()
        message = str(refused.value)
        assert f"run r: none of the 3 complete checkpoints in {run.uri} can be used" in message
        assert message.count("checksum mismatch") == 3 and "step-00000030/state.pt" in message
        assert "fix it and retry" in message and "GAN_RESUME=never" in message
        assert not value.fresh
    assert {p: p.read_bytes() for p in run.root.rglob("*") if p.is_file()} == files

    # a store whose listing of checkpoints/ is empty, though the history reaches step 30
    lying = LocalStore(tmp_path / "lying")
    a_run(lying, 30)
    lying.list_sizes = lambda prefix="": {}  # what a listing that lies shows
    with BackgroundWriter(lying) as writer:
        c, value, _ = checkpointer(lying, writer)
        with pytest.raises(CheckpointError, match="lists no complete checkpoint") as refused:
            c.restore()
    assert "metrics.jsonl reaches step 30" in str(refused.value) and not value.fresh

    # a run stopped before its first checkpoint starts over, as it always did
    early = LocalStore(tmp_path / "early")
    a_run(early, 5)
    assert complete_steps(early) == []
    with BackgroundWriter(early) as writer:
        c, value, history = checkpointer(early, writer)
        assert c.restore() is None and value.fresh and history.rows == []


def test_resume_choice_refuses_only_where_the_run_has_a_past_and_no_usable_checkpoint():
    choose = lambda resume="auto", own=None, **past: resume_choice(  # noqa: E731
        resume, own, [], "r", "s3://b/runs/r", Past(**past), every=10
    )
    assert choose() == "fresh"  # a new run
    assert choose(own=20, failed={30: "checksum mismatch"}) == "own"  # an older one is usable
    assert choose(history=(5, 10)) == "fresh"  # stopped while its first checkpoint was stored
    assert choose(history=(105, 110), resume="/seed") == "seed"  # a seeded run, likewise
    with pytest.raises(CheckpointError, match="none of the 1 complete checkpoints"):
        choose(failed={10: "s3://b/runs/r/checkpoints/step-00000010/state.pt: checksum mismatch"})
    with pytest.raises(CheckpointError, match="lists no complete checkpoint"):
        choose(history=(5, 15))
    with pytest.raises(CheckpointError, match="lists no complete checkpoint"):
        choose(history=(105, 115), resume="/seed")
    with pytest.raises(CheckpointError, match="final/generator.pt"):
        choose(history=(5, 7), finished=True)  # a run that ended before its first interval


# ---------------------------------------------------------------- real runs through a proxy


@pytest.fixture(scope="module")
def trained(s3, tmp_path_factory):
    """A 20-step run in S3 (checkpoints at 10 and 20, metrics rows every 5 steps)."""
    tmp = tmp_path_factory.mktemp("refusal")
    write_idx(tmp / "data", n=128)
    bucket = new_bucket(s3)
    env = s3_job_env(tmp, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", GAN_RUN_ID="base",
                     GAN_MAX_STEPS=20, **RUN)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    return {"tmp": tmp, "bucket": bucket}


def copy_of_the_run(s3, trained, run_id: str) -> dict[str, bytes]:
    bucket, client = trained["bucket"], s3.client()
    for key in bucket_objects(s3, bucket, "runs/base/"):
        client.copy_object(Bucket=bucket, Key=f"runs/{run_id}/{key}",
                           CopySource={"Bucket": bucket, "Key": f"runs/base/{key}"})  # fmt: skip
    objects = bucket_objects(s3, bucket, f"runs/{run_id}/")
    assert {f"checkpoints/step-000000{s}/COMPLETE.json" for s in (10, 20)} <= set(objects)
    return objects


def restart_through(proxy: TcpProxy, s3, trained, run_id: str, *args: str):
    env = s3_job_env(trained["tmp"], s3, GAN_ARTIFACT_URI=f"s3://{trained['bucket']}/runs",
                     GAN_RUN_ID=run_id, GAN_MAX_STEPS=25,
                     GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", **RUN)  # fmt: skip
    return run_job(env, *args)


def refused_and_kept(result, s3, trained, run_id: str, before: dict[str, bytes]) -> str:
    """The last line of a job that must have refused to start, leaving the run as it was."""
    log = result.stdout + result.stderr
    assert result.returncode == EXIT_CHECKPOINT, log
    assert "fresh start" not in log and "Traceback" not in log
    assert bucket_objects(s3, trained["bucket"], f"runs/{run_id}/") == before
    last = result.stdout.strip().splitlines()[-1]
    assert f"run {run_id}" in last and f"s3://{trained['bucket']}/runs/{run_id}" in last
    assert "GAN_RESUME=never" in last and "GAN_RUN_ID" in last
    return last


def resumes_once_the_proxy_passes(proxy: TcpProxy, s3, trained, run_id: str) -> None:
    proxy.respond = None
    result = restart_through(proxy, s3, trained, run_id)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step 20" in result.stdout
    objects = bucket_objects(s3, trained["bucket"], f"runs/{run_id}/")
    rows = [json.loads(line)["step"] for line in objects["metrics.jsonl"].splitlines()]
    assert rows == [5, 10, 15, 20, 25]


def test_a_gateway_answering_state_pt_with_a_page_is_refused_with_exit_5(s3, trained):
    """GETs of state.pt answered 200 OK with an HTML page: every checkpoint fails its checksum.
    Once a fresh start over them (exit 0; retention then deleted the run's checkpoints)."""
    before = copy_of_the_run(s3, trained, "page")
    with TcpProxy(s3.ports["s3"]) as proxy:
        proxy.respond = lambda line: (
            http_response(200, HTML) if line.startswith(b"GET ") and b"state.pt" in line else None
        )
        last = refused_and_kept(restart_through(proxy, s3, trained, "page"), s3, trained,
                                "page", before)  # fmt: skip
        assert proxy.responded >= 2
        assert "none of the 2 complete checkpoints" in last
        assert last.count("checksum mismatch") == 2 and "step-00000020/state.pt" in last
        resumes_once_the_proxy_passes(proxy, s3, trained, "page")


def test_a_store_listing_no_checkpoints_under_a_runs_history_is_refused_with_exit_5(s3, trained):
    """The listing of checkpoints/ answered with no keys: once a fresh start that rewrote
    metrics.jsonl and wrote over the run's checkpoints."""
    before = copy_of_the_run(s3, trained, "unlisted")
    bucket = trained["bucket"].encode()
    with TcpProxy(s3.ports["s3"]) as proxy:
        proxy.respond = lambda line: (
            http_response(200, EMPTY_LISTING % bucket, "application/xml")
            if line.startswith(b"GET ") and b"list-type=2" in line and b"checkpoints" in line
            else None
        )
        last = refused_and_kept(restart_through(proxy, s3, trained, "unlisted"), s3, trained,
                                "unlisted", before)  # fmt: skip
        assert proxy.responded >= 1
        assert "lists no complete checkpoint" in last and "reaches step 20" in last
        dry = restart_through(proxy, s3, trained, "unlisted", "--dry-run")  # the same rule
        assert dry.returncode == EXIT_CHECKPOINT and "lists no complete checkpoint" in dry.stdout
        resumes_once_the_proxy_passes(proxy, s3, trained, "unlisted")
