"""gan-job --dry-run and GAN_DRY_RUN=true: real job processes, a real SeaweedFS for S3."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from s3server import SeaweedS3, closed_port

from job.gan.models import Arch, build_discriminator, build_generator
from tests.helpers import job_env, run_job, write_idx
from tests.test_s3_job import bucket_objects, new_bucket, s3_job_env

TRAINED = dict(GAN_DATASET="mnist", GAN_RUN_ID="r", GAN_MAX_STEPS=4, GAN_CHECKPOINT_EVERY=2,
               GAN_SAMPLE_EVERY=2)  # fmt: skip


def output(result) -> str:
    return result.stdout + result.stderr


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime in ns) of root and of every file and folder under it: a file written and
    removed again still changes its folder's."""
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in [root, *root.rglob("*")]
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A local run of 4 steps with checkpoints at steps 2 and 4: its tmp folder."""
    tmp = tmp_path_factory.mktemp("dryrun")
    write_idx(tmp / "data", n=64)
    result = run_job(job_env(tmp, **TRAINED))
    assert result.returncode == 0, output(result)
    assert (tmp / "runs/r/checkpoints/step-00000004/COMPLETE.json").is_file()
    return tmp


def test_dry_run_of_a_new_run_says_it_would_start_fresh_and_creates_no_folder(tmp_path):
    write_idx(tmp_path / "data", n=64)
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist"), "--dry-run")
    assert result.returncode == 0, output(result)
    assert "run mnist-dcgan: would start fresh" in result.stdout
    assert ": 64 images, 10 classes, 1x28x28" in result.stdout
    assert "recipe: fast28 (filled in: model='dcgan', depth=1" in result.stdout
    assert "    GAN_LR_G=0.0008 (recipe)" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "settings"), [(("--dry-run",), {}), ((), {"GAN_DRY_RUN": "true"})], ids=["flag", "env"]
)
def test_dry_run_over_checkpoints_says_it_would_resume_and_changes_no_file(trained, args, settings):
    before = tree(trained / "runs")
    result = run_job(job_env(trained, **TRAINED, **settings), *args)
    assert result.returncode == 0, output(result)
    assert "run r: would resume from step 4" in result.stdout
    assert "stopping at step" not in result.stdout
    assert tree(trained / "runs") == before
    assert not (trained / "runs/r/lock.json").exists()


def test_dry_run_with_resume_never_over_an_existing_run_exits_2(trained):
    before = tree(trained / "runs")
    result = run_job(job_env(trained, **TRAINED, GAN_RESUME="never"), "--dry-run")
    assert result.returncode == 2, output(result)
    assert "GAN_RESUME=never, but run r already has" in result.stdout
    assert tree(trained / "runs") == before


def test_dry_run_seeded_by_a_resume_path_names_its_step(trained):
    seed = trained / "runs/r/checkpoints/step-00000002"
    settings = {**TRAINED, "GAN_RUN_ID": "seeded", "GAN_RESUME": str(seed)}
    result = run_job(job_env(trained, **settings), "--dry-run")
    assert result.returncode == 0, output(result)
    assert f"would resume from step 2 (GAN_RESUME: {seed.resolve()}/)" in result.stdout
    assert not (trained / "runs/seeded").exists()


def test_dry_run_with_bad_settings_exits_2_naming_them(tmp_path):
    write_idx(tmp_path / "data", n=64)
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist", GAN_BATCH_SIZE=0), "--dry-run")
    assert result.returncode == 2, output(result)
    assert "GAN_BATCH_SIZE='0'" in result.stdout


def test_dry_run_without_the_dataset_exits_3(tmp_path):
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist"), "--dry-run")
    assert result.returncode == 3, output(result)
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a usable GPU")
def test_dry_run_with_device_cuda_and_no_gpu_exits_9(tmp_path):
    write_idx(tmp_path / "data", n=64)
    result = run_job(job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cuda"), "--dry-run")
    assert result.returncode == 9, output(result)
    assert "GAN_DEVICE=cuda: " in result.stdout


def test_dry_run_of_several_processes_reports_the_world_size_without_torchrun(tmp_path):
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cpu", GAN_NPROC_PER_NODE=2,
                  GAN_NNODES=2, GAN_RDZV_ENDPOINT=f"127.0.0.1:{closed_port()}",
                  GAN_RDZV_TIMEOUT_SECONDS=5)  # fmt: skip
    result = run_job(env, "--dry-run", timeout=60)
    assert result.returncode == 0, output(result)
    assert "x 4 process(es), batch 16 per process, global batch 64" in result.stdout
    assert "processes: GAN_NPROC_PER_NODE=2 x GAN_NNODES=2; torchrun would start" in result.stdout
    assert "starting 2 processes" not in result.stdout


def test_dry_run_counts_the_parameters_and_forward_flops_of_the_run_s_models(tmp_path):
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MODEL="mlp", GAN_CONDITIONAL="true")
    result = run_job(env, "--dry-run")
    assert result.returncode == 0, output(result)
    found = re.search(r"G ([\d,]+) parameters, D ([\d,]+) parameters; .*forward: G ([\d,]+), "
                      r"D ([\d,]+)\)", result.stdout)  # fmt: skip
    assert found, result.stdout
    g_params, d_params, g_flops, d_flops = (int(n.replace(",", "")) for n in found.groups())
    arch = Arch(model="mlp", channels=1, image_size=28, latent_dim=16, width=8, num_classes=10)
    assert g_params == sum(p.numel() for p in build_generator(arch).parameters())
    assert d_params == sum(p.numel() for p in build_discriminator(arch).parameters())
    # the MLP's Linear layers for one image (the label embedding is a lookup): 2 x in x out
    g_layers = [(16 + 10, 16), (16, 32), (32, 64), (64, 128), (128, 784)]
    d_layers = [(784 + 10, 64), (64, 32), (32, 1)]
    assert g_flops == sum(2 * i * o for i, o in g_layers)
    assert d_flops == sum(2 * i * o for i, o in d_layers)


def test_dry_run_with_an_unreachable_s3_endpoint_exits_4(s3: SeaweedS3, s3_bucket, tmp_path):
    write_idx(tmp_path / "data", n=64)
    closed = closed_port()
    env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{s3_bucket}/runs",
                     GAN_S3_ENDPOINT_URL=f"http://127.0.0.1:{closed}")  # fmt: skip
    result = run_job(env, "--dry-run", timeout=60)
    assert result.returncode == 4, output(result)
    assert f"cannot reach endpoint http://127.0.0.1:{closed}" in result.stdout


def test_dry_run_over_an_s3_run_says_it_would_resume_and_leaves_its_objects(s3, tmp_path):
    write_idx(tmp_path / "data", n=64)
    bucket = new_bucket(s3)
    env = s3_job_env(tmp_path, s3, GAN_ARTIFACT_URI=f"s3://{bucket}/runs", **TRAINED)
    trained = run_job(env)
    assert trained.returncode == 0, output(trained)
    before = bucket_objects(s3, bucket)
    result = run_job(env, "--dry-run")
    assert result.returncode == 0, output(result)
    assert "run r: would resume from step 4" in result.stdout
    assert bucket_objects(s3, bucket) == before
    assert "runs/r/lock.json" not in before
