"""A planted .pt file never runs its code (issue 42, item 9): every way gan-job loads a generator
export or a checkpoint refuses a pickle that names a Python callable, with exit 5 naming the
file, and the callable never runs. The planted pickle would create a file when unpickled."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import torch

from job.infra import errors
from tests.helpers import job_env, run_job, write_idx


class Planted:
    """Unpickled by a full unpickler, this calls open(marker, "w"): the file appears."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def planted_bytes(marker: Path, **around: object) -> bytes:
    buf = io.BytesIO()
    torch.save({**around, "generator": Planted(marker)}, buf)
    return buf.getvalue()


def planted_export(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(planted_bytes(marker, step=10))
    return path


def assert_refused(result, label: str, marker: Path) -> None:
    out = result.stdout + result.stderr
    assert result.returncode == errors.EXIT_CHECKPOINT, out
    assert not marker.exists(), "the planted pickle ran"
    assert "Traceback" not in out
    assert f"{label}: refused: loading it would import the Python object io.open" in out


def test_the_planted_pickle_runs_under_a_full_unpickler(tmp_path):
    """The test's own check: without weights_only the file does run code."""
    marker = tmp_path / "ran"
    torch.load(io.BytesIO(planted_bytes(marker)), weights_only=False)
    assert marker.exists()


def test_sample_and_export_refuse_a_planted_export(tmp_path):
    marker, planted = tmp_path / "ran", planted_export(tmp_path / "planted.pt", tmp_path / "ran")
    env = job_env(tmp_path)
    sample = run_job(env, "sample", "--checkpoint", str(planted), "--num", "4",
                     "--out", str(tmp_path / "grid.png"))  # fmt: skip
    assert_refused(sample, f"--checkpoint {planted}", marker)
    export = run_job(env, "export", str(planted), "--out", str(tmp_path / "g.pt"))
    assert_refused(export, str(planted), marker)
    assert not (tmp_path / "g.pt").exists()


def test_evaluate_which_best_refuses_a_planted_best_generator(tmp_path):
    run, marker = tmp_path / "runs" / "r", tmp_path / "ran"
    planted = planted_export(run / "best" / "generator.pt", marker)
    (run / "config.json").write_text(json.dumps({"settings": {"dataset": "mnist"}}))
    result = run_job(job_env(tmp_path), "evaluate", str(run), "--which", "best", "--num", "10")
    assert_refused(result, f"--checkpoint {planted}", marker)


def test_sample_from_s3_refuses_a_planted_export(tmp_path, s3, s3_bucket):
    marker = tmp_path / "ran"
    key = "runs/r/final/generator.pt"
    s3.client().put_object(Bucket=s3_bucket, Key=key, Body=planted_bytes(marker, step=10))
    uri = f"s3://{s3_bucket}/{key}"
    env = {**job_env(tmp_path), **s3.env()}
    result = run_job(env, "sample", "--checkpoint", uri, "--num", "4",
                     "--out", str(tmp_path / "grid.png"))  # fmt: skip
    assert_refused(result, f"--checkpoint {uri}", marker)


def test_resume_from_a_forged_s3_checkpoint_refuses_it_and_trains_nothing(tmp_path, s3, s3_bucket):
    """COMPLETE.json from the same store proves nothing: its checksums match the planted file."""
    marker = tmp_path / "ran"
    state = planted_bytes(marker, format=2, meta={})
    complete = {
        "step": 10,
        "created": 0.0,
        "parts": {"state.pt": {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()}},
    }
    client, base = s3.client(), "runs/forged/checkpoints/step-00000010/"
    client.put_object(Bucket=s3_bucket, Key=base + "state.pt", Body=state)
    client.put_object(Bucket=s3_bucket, Key=base + "COMPLETE.json", Body=json.dumps(complete))
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_RESUME=f"s3://{s3_bucket}/{base}", GAN_MAX_STEPS=4)
    result = run_job({**env, **s3.env()})
    out = result.stdout + result.stderr
    assert result.returncode == errors.EXIT_CHECKPOINT, out
    assert not marker.exists(), "the planted pickle ran"
    assert f"s3://{s3_bucket}/{base}state.pt: refused: loading it would import" in out
    assert not (tmp_path / "runs" / "fashion-mnist-dcgan" / "checkpoints").exists()
