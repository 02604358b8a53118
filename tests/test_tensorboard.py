"""GAN_TENSORBOARD: real runs, their event files read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from job.infra.local_store import LocalStore
from job.infra.tensorboard_log import FLUSH_SECONDS, TensorBoardLog, chunk_step
from job.infra.writer import BackgroundWriter
from tests.helpers import REPO, job_env, run_job, write_extractor, write_idx

TINY = dict(GAN_DATASET="mnist", GAN_TENSORBOARD="true", GAN_LOG_EVERY=3, GAN_SAMPLE_EVERY=6)


def accumulate(logdir: str | Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def check_run(acc: EventAccumulator, records: list[dict], evals: list[dict]) -> None:
    """train/* and eval/* hold every row at its step, with metrics.jsonl's and eval.jsonl's values."""
    for tag, history in (("train/d_loss", records), ("train/images_per_s", records),
                         ("eval/fid", evals), ("eval/kid", evals)):  # fmt: skip
        if not history:
            continue
        name = tag.split("/")[1]
        found = acc.Scalars(tag)
        assert [e.step for e in found] == [r["step"] for r in history], tag
        assert [e.value for e in found] == pytest.approx([r[name] for r in history], rel=1e-6)


def test_a_conditional_run_shows_its_scalars_and_every_grid_with_its_class_columns(tmp_path):
    write_idx(tmp_path / "data" / "mnist")
    extractor = write_extractor(tmp_path / "features.pt")
    env = job_env(tmp_path, **TINY, GAN_MAX_STEPS=12, GAN_CONDITIONAL="true", GAN_RUN_ID="tb",
                  GAN_FID_FEATURES=extractor, GAN_FID_EVERY=6, GAN_FID_NUM_SAMPLES=64)  # fmt: skip
    proc = run_job(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tb"
    acc = accumulate(run / "tensorboard")
    evals = rows(run / "eval.jsonl")
    check_run(acc, rows(run / "metrics.jsonl"), evals)
    assert steps(acc, "eval/best_value") == [6, 12] and len(evals) == 2
    tags = acc.Tags()["images"]
    assert sorted(tags) == sorted(
        ["samples/grid", *(f"samples_per_class/class_{k}" for k in range(10))]
    )
    grids = acc.Images("samples/grid")
    assert [g.step for g in grids] == [6, 12]
    for g in grids:
        png = (run / "samples" / f"step-{g.step:08d}.png").read_bytes()
        assert g.encoded_image_string == png
        assert Image.open(io.BytesIO(g.encoded_image_string)).size == (g.width, g.height)
    grid = Image.open(io.BytesIO(grids[-1].encoded_image_string)).convert("L")
    row = acc.Images("samples_per_class/class_3")[-1]
    image = Image.open(io.BytesIO(row.encoded_image_string)).convert("L")
    cells = (grid.height - 2) // 30  # the grid's column 3, as a row: the same 28 x 28 images
    assert image.size == (cells * 30 + 2, 32) and (row.width, row.height) == image.size
    for i in range(cells):
        in_grid = grid.crop((3 * 30 + 2, i * 30 + 2, 3 * 30 + 30, i * 30 + 30))
        assert image.crop((i * 30 + 2, 2, i * 30 + 30, 30)).tobytes() == in_grid.tobytes()


def test_records_wait_for_a_grid_an_evaluation_a_checkpoint_or_flush_seconds(tmp_path):
    """Chunks: the records so far once FLUSH_SECONDS passed, an evaluation (with the records
    before it), a grid alone, a checkpoint's sync; names sort in the order they were written."""
    store, now = LocalStore(tmp_path), [0.0]
    with BackgroundWriter(store) as writer:
        tb = TensorBoardLog(store, writer, step=lambda: 0, clock=lambda: now[0])

        def chunks() -> list[str]:
            writer.flush()
            return [k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in store.list()]

        tb.train({"step": 1, "d_loss": 0.5, "time": 100.0})
        tb.train({"step": 2, "d_loss": 0.4, "time": 101.0})
        assert chunks() == []
        now[0] = FLUSH_SECONDS
        tb.train({"step": 3, "d_loss": 0.3, "time": 102.0})
        assert chunks() == ["0000000001.log"]
        tb.train({"step": 4, "d_loss": 0.2, "time": 103.0})
        png = io.BytesIO()
        Image.new("RGB", (10, 8), "red").save(png, "PNG")
        tb.images(4, {"samples/grid": png.getvalue()})
        tb.evaluation({"step": 4, "fid": 12.5, "extractor": "inception"})
        tb.train({"step": 5, "d_loss": 0.1, "time": 104.0})
        tb.sync()
        assert chunks() == ["0000000001.log", "0000000004.log", "0000000004.samples",
                            "0000000004.scores", "0000000005.log"]  # fmt: skip
    acc = accumulate(tmp_path / "tensorboard")
    assert steps(acc, "train/d_loss") == [1, 2, 3, 4, 5]
    assert [e.wall_time for e in acc.Scalars("train/d_loss")] == [100, 101, 102, 103, 104]
    assert [(e.step, e.value) for e in acc.Scalars("eval/fid")] == [(4, 12.5)]
    (grid,) = acc.Images("samples/grid")
    assert (grid.step, grid.width, grid.height) == (4, 10, 8)
    assert grid.encoded_image_string == png.getvalue()


def chunks_past(folder: Path, step: int) -> list[str]:
    names = [f"tensorboard/{p.name}" for p in folder.glob("events.out.tfevents.*")]
    return [n for n in names if (s := chunk_step(n)) is not None and s > step]


def newest_checkpoint(run: Path) -> int:
    return max(int(p.parent.name.split("-")[1]) for p in run.glob("checkpoints/*/COMPLETE.json"))


def test_a_resume_after_a_kill_continues_the_timeline_without_a_step_twice(tmp_path):
    """Killed past its checkpoint (events the resume does not restore), then resumed and
    stopped before the step the killed run reached: the resumed run deleted those events, so
    every step is in the timeline once, in order, and none is past the end."""
    write_idx(tmp_path / "data" / "mnist")
    env = job_env(tmp_path, **{**TINY, "GAN_SAMPLE_EVERY": 1, "GAN_LOG_EVERY": 1},
                  GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=10, GAN_RUN_ID="tb",
                  GAN_RUN_LEASE_SECONDS=2)  # fmt: skip
    run, log = tmp_path / "runs" / "tb", open(tmp_path / "first.log", "w")
    job = subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints").exists() or not chunks_past(run / "tensorboard", 12):
            assert job.poll() is None and time.monotonic() < deadline, "no step past 12"
            time.sleep(0.05)
    finally:
        os.kill(job.pid, signal.SIGKILL)
        job.wait()
    restored = newest_checkpoint(run)
    end = restored + 2
    assert chunks_past(run / "tensorboard", end), f"nothing past step {end}: proves nothing"
    resumed_at = time.time()
    proc = run_job({**env, "GAN_MAX_STEPS": str(end)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from step {restored}" in proc.stdout
    acc = accumulate(run / "tensorboard")
    check_run(acc, rows(run / "metrics.jsonl"), [])
    found = acc.Scalars("train/d_loss")
    assert [e.step for e in found] == list(range(1, end + 1))
    assert all(e.wall_time >= resumed_at for e in found if e.step > restored)
    assert [g.step for g in acc.Images("samples/grid")] == list(range(1, end + 1))
    assert acc.Tags()["images"] == ["samples/grid"]  # unconditioned: no class columns


def test_a_run_in_s3_is_read_by_tensorboard_from_the_bucket(tmp_path, s3_env):
    """TensorBoard's own S3 reader (boto3), with the endpoint and keys the job reads too."""
    from tests.test_s3_job import new_bucket, s3_job_env

    write_idx(tmp_path / "data" / "mnist")
    bucket = new_bucket(s3_env)
    env = s3_job_env(tmp_path, s3_env, **TINY, GAN_MAX_STEPS=6, GAN_RUN_ID="tb",
                     GAN_ARTIFACT_URI=f"s3://{bucket}/runs")  # fmt: skip
    proc = run_job(env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "S3_ENDPOINT" not in os.environ  # AWS_ENDPOINT_URL_S3 (s3_env) is enough
    acc = accumulate(f"s3://{bucket}/runs/tb/tensorboard")
    records = [json.loads(line) for line in s3_env.client().get_object(
        Bucket=bucket, Key="runs/tb/metrics.jsonl")["Body"].read().splitlines()]  # fmt: skip
    check_run(acc, records, [])
    assert steps(acc, "train/d_loss") == [3, 6]
    grid = acc.Images("samples/grid")[0]
    assert grid.step == 6
    assert Image.open(io.BytesIO(grid.encoded_image_string)).size == (grid.width, grid.height)


def test_tensorboard_on_without_the_package_exits_2_naming_the_extra(tmp_path):
    shim = tmp_path / "shim" / "tensorboard"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    write_idx(tmp_path / "data" / "mnist")
    env = job_env(tmp_path, **TINY, GAN_MAX_STEPS=3)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim.parent), env.get("PYTHONPATH")]))
    proc = run_job(env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "GAN_TENSORBOARD=true needs" in proc.stdout
    assert "pip install 'gan-job[tensorboard]'" in proc.stdout


def test_the_image_lock_holds_the_tensorboard_extra():
    """The image installs requirements.lock alone: the extra's pins must be in it."""
    import tomllib

    from tests.test_container import locked, normalized

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    lock = locked()
    for pin in extras["tensorboard"]:
        name, _, version = pin.partition("==")
        assert lock.get(normalized(name), ("missing",))[0] == version, pin
    assert "tensorboard-data-server" in lock and "protobuf" in lock  # and what it needs
