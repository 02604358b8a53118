"""Hostile inputs, fourth round (issue 42): NaN evaluations, a dry run over an s3:// dataset, a
generator export given as GAN_RESUME, a job started under nohup, and names that would be
Markdown in a model card. Each with real processes where the fault is a process's."""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from job.gan.models import build_generator
from job.infra.local_store import LocalStore
from job.infra.writer import BackgroundWriter
from job.tools.export import card_markdown, load_lines
from tests.helpers import (
    REPO,
    TinyFeatures,
    job_env,
    run_job,
    write_extractor,
    write_idx,
    write_image_folder,
)
from tests.test_best import ARCH, best_of, evals, export
from tests.test_launcher import read_until, worker_pid
from tests.test_s3_job import new_bucket, s3_job_env

# ---------------------------------------------------------------- NaN evaluations


class OverflowOnCalls(torch.nn.Module):
    """TinyFeatures, times 1e20 on the calls numbered in huge_calls (from 1): KID's cubic kernel
    overflows float32 there, and KID is NaN (FID, in float64, is finite and huge). The
    extractor's load probes it once, the real reference is one call for up to 100 images, then
    each evaluation of up to 100 samples is one call."""

    def __init__(self, huge_calls: list[int]):
        super().__init__()
        self.inner, self.calls, self.huge_calls = TinyFeatures(1), 0, huge_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.inner(x)
        if self.calls in self.huge_calls:
            out = out * 1e20
        return out


def test_a_nan_score_is_neither_the_best_nor_a_step_toward_a_plateau_nor_a_target(tmp_path):
    store, g = LocalStore(tmp_path), build_generator(ARCH)
    nan = float("nan")
    with BackgroundWriter(store) as writer:
        best = best_of(store, writer, patience=2, target_kid=0.1)
        fields, reasons = [], []
        for step, kid in ((10, nan), (20, 0.5), (30, nan), (40, nan), (50, 0.6)):
            fields.append(best.judge(step, {"fid": 1.0, "kid": kid}, g))
            reasons.append(best.stop_reason())
    assert fields[0] == {}  # no best yet
    assert [f["best_step"] for f in fields[1:]] == [20, 20, 20, 20]
    assert reasons == [None, None, None, None, None]  # one evaluation without an improvement
    assert best.since == 1 and export(store)["step"] == 20


def test_a_nan_evaluation_is_logged_and_never_kept_as_the_best(tmp_path):
    """Once the first evaluation's NaN was the best for good: nothing beats NaN, so patience 2
    stopped the run at step 30 as a plateau and best/generator.pt was step 10's."""
    write_idx(tmp_path / "data", n=256)
    torch.manual_seed(0)
    extractor = tmp_path / "nan-features.pt"
    torch.jit.script(OverflowOnCalls([3, 5])).save(str(extractor))  # the evaluations at 10 and 30
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_RUN_ID="nan", GAN_FID_FEATURES=extractor,
                  GAN_FID_EVERY=10, GAN_FID_NUM_SAMPLES=64, GAN_MAX_STEPS=40,
                  GAN_EARLY_STOP_PATIENCE=2)  # fmt: skip
    result = run_job(env)
    log, run = result.stdout + result.stderr, tmp_path / "runs/nan"
    assert result.returncode == 0, log
    assert "stopping at step 40: max_steps" in log, log
    for step in (10, 30):
        assert f"KID nan at step {step}: not compared" in log
    rows = evals(run)
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert "best_step" not in rows[0] and {r["best_step"] for r in rows[1:]} <= {20, 40}
    assert torch.load(run / "best/generator.pt", weights_only=True)["step"] in (20, 40)


def test_one_fid_sample_is_a_settings_error(tmp_path):
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist", GAN_FID_NUM_SAMPLES=1), timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "GAN_FID_NUM_SAMPLES='1': expected 0 (the default count) or at least 2" in result.stdout


# ---------------------------------------------------------------- a dry run over an s3:// dataset


def test_a_dry_run_lists_an_s3_dataset_and_downloads_nothing(s3, tmp_path):
    """Once it downloaded the whole prefix into GAN_DATA_DIR, though it promises to write
    nothing. Once the run has copied it, a dry run reads that copy as the run does."""
    bucket, data = new_bucket(s3), tmp_path / "data"
    for path in write_idx(tmp_path / "upload", n=96, gz=False).iterdir():
        s3.client().upload_file(str(path), bucket, f"datasets/digits/{path.name}")
    dataset = f"s3://{bucket}/datasets/digits"
    env = s3_job_env(tmp_path, s3, GAN_DATASET=dataset, GAN_IMAGE_SIZE=28, GAN_MAX_STEPS=2,
                     GAN_ARTIFACT_URI=tmp_path / "runs")  # fmt: skip
    result = run_job(env, "--dry-run", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    copy = data / "s3" / bucket / "datasets/digits"
    assert f"{dataset}: not on this node: the run would download 2 objects" in result.stdout
    assert f"to {copy}" in result.stdout
    assert not data.exists() or list(data.rglob("*")) == []
    assert (trained := run_job(env)).returncode == 0, trained.stdout + trained.stderr
    again = run_job(env, "--dry-run", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"data: {dataset} from {copy}: 96 images" in again.stdout
    assert "would download" not in again.stdout


def test_a_dry_run_over_an_empty_s3_prefix_exits_4_as_the_run_does(s3, tmp_path):
    dataset = f"s3://{new_bucket(s3)}/datasets/none"
    env = s3_job_env(tmp_path, s3, GAN_DATASET=dataset, GAN_IMAGE_SIZE=28)
    for args in (("--dry-run",), ()):
        result = run_job(env, *args, timeout=120)
        assert result.returncode == 4, result.stdout + result.stderr
        assert f"nothing to download under {dataset}" in result.stdout
        assert args == () or not (tmp_path / "data").exists()


# ---------------------------------------------------------------- an export as GAN_RESUME


@pytest.mark.parametrize("which", ["final", "best"])
def test_a_generator_export_as_gan_resume_exits_5_naming_the_checkpoint_folder(tmp_path, which):
    """Once exit 4, "File exists" (the file opened as a store folder), which Kubernetes retries."""
    write_idx(tmp_path / "data", n=256)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_RUN_ID="first", GAN_MAX_STEPS=10,
                  GAN_FID_FEATURES=write_extractor(tmp_path / "features.pt"),
                  GAN_FID_NUM_SAMPLES=32)  # fmt: skip
    assert run_job(env).returncode == 0
    run = tmp_path / "runs/first"
    env.update(GAN_RUN_ID="second", GAN_RESUME=str(run / f"{which}/generator.pt"))
    for args in ((), ("--dry-run",)):
        result = run_job(env, *args, timeout=120)
        assert result.returncode == 5, result.stdout + result.stderr
        assert f"{run}/{which}/generator.pt: a file, not a checkpoint" in result.stdout
        assert f"{run}/checkpoints/step-NNNNNNNN, or the run folder {run}" in result.stdout
    assert not (tmp_path / "runs/second/checkpoints").exists()


# ---------------------------------------------------------------- nohup


def nohup_job(tmp_path, nproc: int) -> subprocess.Popen:
    """A job of 60 steps started as nohup starts it: SIGHUP ignored."""
    write_idx(tmp_path / "data", n=512)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_NPROC_PER_NODE=nproc,
                  GAN_MAX_STEPS=60, GAN_LOG_EVERY=10, GAN_CHECKPOINT_EVERY=1000,
                  GAN_SAMPLE_EVERY=1000)  # fmt: skip
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.Popen([sys.executable, "-m", "job"], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))  # fmt: skip


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_job_started_under_nohup_trains_on_through_sighup(tmp_path, nproc):
    """Once SIGHUP stopped it (exit 75) though nohup had it ignored. Under gan-job's launcher
    the workers, which torchrun starts with SIGHUP handled, get the launcher's ignored state."""
    job = nohup_job(tmp_path, nproc)
    seen = read_until(job, "step 10/")
    job.send_signal(signal.SIGHUP)
    if nproc > 1:  # what a hang-up of their process group would send them
        for rank in range(nproc):
            os.kill(worker_pid(job.pid, rank), signal.SIGHUP)
    rest, _ = job.communicate(timeout=300)
    output = seen + rest
    assert job.returncode == 0, output
    assert output.count("stopping at step 60: max_steps") == nproc, output


# ---------------------------------------------------------------- names in the model card

HOSTILE = "a|b *em* <script>alert(1)</script> `tick` ``two`` [l](http://x) &amp; _u_\nnext"
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.*?)(?<!`)\1(?!`)")


def cells(row: str) -> list[str]:
    """A table row's cells (between its outer pipes), split at the pipes not escaped."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def outside_code(line: str) -> str:
    """A line of Markdown without its code spans and backslash escapes: what would be markup."""
    return re.sub(r"\\[!-/:-@\[-`{-~]", "", CODE_SPAN.sub("", line))


def outside_fences(markdown: str) -> list[str]:
    """The lines of Markdown outside its fenced code blocks, and not their fences."""
    parts = re.split(r"^```.*$", markdown, flags=re.M)
    return [line for part in parts[::2] for line in part.splitlines()]


def shape(markdown: str) -> list[str]:
    """Each line's kind: a table row (with its cell count), a heading, a fence, other."""
    kinds = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            kinds.append(f"row of {len(cells(line))}")
        else:
            heading_or_fence = line.startswith(("#", "```"))
            kinds.append(line.split(" ")[0] if heading_or_fence else "text" if line else "")
    return kinds


def card_facts(name: str) -> dict:
    return {"file": f"{name}.pt", "format": "torchscript", "sha256": "ab", "bytes": 3,
            "source": f"/runs/{name}", "run_id": name, "dataset": f"folder:/d/{name}",
            "image_shape": [1, 8, 8], "step": 4, "images_seen": 64, "inputs": {"z": "N x 4"},
            "output": "images", "load": load_lines(f"{name}.pt", ARCH, "torchscript"),
            "gan_job_version": "0", "trained_with": "0", "torch_version": "2",
            "architecture": {"model": "mlp"},
            "scores": {"fid": 1.0, "extractor": name, "num_samples": 32, f"k{name}": 2},
            "settings": {"run_id": name, "dataset": name, "empty": "", "edge": f" `{name}` "}}  # fmt: skip


def test_a_card_shows_user_given_names_as_text_never_as_markup():
    plain, hostile = card_markdown(card_facts("plain")), card_markdown(card_facts(HOSTILE))
    assert shape(hostile) == shape(plain)  # no row, heading or fence more or less
    for line in outside_fences(hostile):
        assert not re.search(r"[<>*_`\[\]&]", outside_code(line)), line
    for line in hostile.splitlines():
        if line.startswith("|") and line != "| --- | --- |":
            value = cells(line)[1]
            assert value == "" or CODE_SPAN.fullmatch(value), line  # one code span, whole
    load = ast.parse(card_facts(HOSTILE)["load"])  # the file name as one Python string
    strings = [n.value for n in ast.walk(load) if isinstance(getattr(n, "value", 0), str)]
    assert strings == [f"{HOSTILE}.pt"]


def test_an_exported_cards_table_keeps_its_columns_for_hostile_paths(tmp_path):
    """Once raw: a pipe split a row, a newline ended the table, <script> was HTML."""
    weird = "w|*<script>`x`\nq"
    folder = write_image_folder(tmp_path / f"data {weird}", size=(8, 8))
    env = job_env(tmp_path, GAN_DATASET=f"folder:{folder}", GAN_RUN_ID="r", GAN_MAX_STEPS=2,
                  GAN_MODEL="mlp", GAN_BATCH_SIZE=4,
                  GAN_IMAGE_SIZE=8, GAN_ARTIFACT_URI=tmp_path / f"runs {weird}")  # fmt: skip
    assert (trained := run_job(env)).returncode == 0, trained.stdout + trained.stderr
    out = tmp_path / f"g {weird}.pt"
    result = run_job(env, "export", str(tmp_path / f"runs {weird}/r"), "--out", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    markdown = out.with_name(out.name + ".card.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("|")]
    assert all(len(cells(row)) == 2 for row in rows), rows
    assert "<script>" not in "".join(map(outside_code, outside_fences(markdown)))
    dataset = next(row for row in rows if row.startswith("| dataset |"))
    span = CODE_SPAN.fullmatch(cells(dataset)[1])
    assert span and span[2].replace("\\|", "|") == f"folder:{folder}".replace("\n", "\\n")
