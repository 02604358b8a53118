"""Hostile inputs, fifth round (issue 42, item 12): users' mistakes that ended in a traceback.
Damaged generator files and config.json, flags without bounds, an --out that cannot be written
or names S3, micro-batches of one image under BatchNorm, a CIFAR-10 archive that is no tar or
reaches outside the data folder, and SIGTERM during `gan-job sample`. Each through the real
`gan-job` process: its exit status, a message naming the culprit, no traceback."""

from __future__ import annotations

import io
import json
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from job.gan.models import Arch, build_generator
from job.infra import errors
from tests.helpers import REPO, job_env, run_job, write_extractor, write_idx
from tests.test_s3_job import bucket_objects, new_bucket

ARCH = Arch("mlp", 1, 28, 16, 8, 0)
EXPECTED = "expected a gan-job checkpoint or generator export"


def check(result: subprocess.CompletedProcess, status: int, *named: str) -> None:
    """Exit status, every text in named in its message, and no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == status, text
    assert "Traceback" not in text and "unexpected failure" not in text, text
    for name in named:
        assert name in text, text


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory) -> Path:
    """A generator export as a run writes final/generator.pt, of an untrained tiny MLP."""
    path = tmp_path_factory.mktemp("gen") / "generator.pt"
    torch.manual_seed(0)
    torch.save({"arch": ARCH.to_dict(), "g_ema": build_generator(ARCH).state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A tiny trained run (2 steps) with a FID extractor, so that `evaluate` can measure it."""
    tmp = tmp_path_factory.mktemp("run")
    write_idx(tmp / "data", n=64)
    env = job_env(tmp, GAN_DATASET="mnist", GAN_MODEL="mlp", GAN_MAX_STEPS=2, GAN_RUN_ID="r",
                  GAN_FID_FEATURES=write_extractor(tmp / "features.pt"), GAN_FID_EVERY=0,
                  GAN_FID_NUM_SAMPLES=20)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    return tmp / "runs" / "r"


# ---------------------------------------------------------------- damaged generator files


def _zip_not_torch(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("notes.txt", "not a torch file")


def _with(generator_file: Path, path: Path, **changes: object) -> None:
    state = torch.load(generator_file, weights_only=True)
    torch.save({**state, **changes}, path)


DAMAGED = {
    "empty": (lambda g, p: p.write_bytes(b""), f"unreadable (EOFError): {EXPECTED}"),
    "text": (lambda g, p: p.write_text("hello\n"), f"): {EXPECTED}"),
    "zip": (lambda g, p: _zip_not_torch(p), f"): {EXPECTED}"),
    "truncated": (lambda g, p: p.write_bytes(g.read_bytes()[: g.stat().st_size // 2]), f"): {EXPECTED}"),
    "foreign-dict": (lambda g, p: torch.save({"weights": torch.zeros(2)}, p), "a dict without a generator, not a gan-job"),
    "wrong-shapes": (lambda g, p: _with(g, p, g_ema={k: torch.zeros(3) for k in torch.load(g, weights_only=True)["g_ema"]}), "size mismatch for "),
    "arch-missing-keys": (lambda g, p: _with(g, p, arch={"model": "mlp"}), "missing 'channels'"),
    "arch-not-a-dict": (lambda g, p: _with(g, p, arch="mlp"), "its architecture is a str, expected a dict"),
    "unknown-model": (lambda g, p: _with(g, p, arch={**ARCH.to_dict(), "model": "vae"}), "model 'vae'"),
    "weights-not-a-dict": (lambda g, p: _with(g, p, g_ema=[1, 2]), "its weights are a list, expected a dict"),
}  # fmt: skip


@pytest.mark.parametrize("tool", ["sample", "export"])
@pytest.mark.parametrize("kind", DAMAGED)
def test_a_damaged_generator_file_exits_5_naming_it_and_what_it_expected(
    generator_file, tmp_path, kind, tool
):
    damage, why = DAMAGED[kind]
    path = tmp_path / f"{kind}.pt"
    damage(generator_file, path)
    out = tmp_path / ("x.npy" if tool == "sample" else "x.pt")
    if tool == "sample":
        result = run_job(job_env(tmp_path), "sample", "--checkpoint", str(path), "--num", "2",
                         "--out", str(out))  # fmt: skip
    else:
        result = run_job(job_env(tmp_path), "export", str(path), "--out", str(out))
    check(result, errors.EXIT_CHECKPOINT, str(path), why)
    assert not out.exists()


# ---------------------------------------------------------------- flags without bounds

UNBOUNDED = {
    "sample --steps": (
        ["sample", "--seeds", "0,1", "--interpolate", "--steps", "100000000", "--out", "x.npy"],
        "--steps 100000000: expected an integer from 2 to 1000",
    ),
    "sample --seed": (
        ["sample", "--num", "2", "--seed", str(2**64), "--out", "x.npy"],
        f"--seed {2**64}: expected an integer from 0 to {2**64 - 1}",
    ),
    "sample --seed negative": (
        ["sample", "--num", "2", "--seed", "-1", "--out", "x.npy"],
        f"--seed -1: expected an integer from 0 to {2**64 - 1}",
    ),
    "evaluate --num": (
        ["evaluate", "RUN", "--num", "10000000000"],
        "--num 10000000000: expected an integer from 10 to 1000000",
    ),
    "evaluate --seed": (
        ["evaluate", "RUN", "--seed", str(2**70)],
        f"--seed {2**70}: expected an integer from 0 to {2**64 - 1}",
    ),
}


@pytest.mark.parametrize("case", UNBOUNDED)
def test_a_flag_beyond_its_range_exits_2_naming_it_and_the_range(generator_file, tmp_path, case):
    argv, message = UNBOUNDED[case]
    argv = [str(generator_file) if a == "RUN" else a for a in argv]
    if argv[0] == "sample":
        argv[1:1] = ["--checkpoint", str(generator_file)]
    argv = [str(tmp_path / a) if a == "x.npy" else a for a in argv]
    check(run_job(job_env(tmp_path), *argv), errors.EXIT_SETTINGS, message)
    assert not (tmp_path / "x.npy").exists()


def test_the_bounds_are_in_the_help():
    sample = run_job(job_env(REPO), "sample", "--help").stdout
    evaluate = run_job(job_env(REPO), "evaluate", "--help").stdout
    assert "2 to 1000" in sample and "0 to 2**64-1" in " ".join(sample.split())
    assert "10 to 1000000" in " ".join(evaluate.split())


# ---------------------------------------------------------------- evaluate --out


def test_evaluate_out_under_a_file_exits_2_before_any_work(run, tmp_path):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "scores.json"
    result = run_job(job_env(tmp_path), "evaluate", str(run), "--num", "10", "--out", str(out))
    check(result, errors.EXIT_SETTINGS, f"--out {out}: {tmp_path / 'afile'} is a file")
    assert "FID" not in result.stdout  # refused before measuring


def test_evaluate_out_that_cannot_be_written_exits_4_naming_it(run, tmp_path):
    out = "/proc/gan-job-scores.json"
    result = run_job(job_env(tmp_path), "evaluate", str(run), "--num", "10", "--out", out)
    check(result, errors.EXIT_STORAGE, f"--out {out}: cannot write")


# ---------------------------------------------------------------- damaged config.json

DAMAGED_CONFIG = {
    "not JSON": (b"{not json", "not JSON"),
    "not an object": (b"[1, 2]", "expected a JSON object"),
    "no settings": (b'{"run_id": "r"}', "no 'settings'"),
}


@pytest.mark.parametrize("tool", ["export", "evaluate"])
@pytest.mark.parametrize("kind", DAMAGED_CONFIG)
def test_a_damaged_config_json_exits_5_naming_it(run, tmp_path, kind, tool):
    copy = shutil.copytree(run, tmp_path / "run")
    if tool == "evaluate":  # it reads config.json for a run with no checkpoint but its export
        shutil.rmtree(copy / "checkpoints")
    data, why = DAMAGED_CONFIG[kind]
    (copy / "config.json").write_bytes(data)
    if tool == "export":
        result = run_job(job_env(tmp_path), "export", str(copy), "--out", str(tmp_path / "g.pt"))
    else:
        result = run_job(job_env(tmp_path), "evaluate", str(copy), "--num", "10")
    check(result, errors.EXIT_CHECKPOINT, f"{copy / 'config.json'}: ", why)
    assert not (tmp_path / "g.pt").exists()


# ---------------------------------------------------------------- micro-batches of one image

ONE_IMAGE = {
    "batch 1": {"GAN_BATCH_SIZE": 1},
    "micro-batches of 1": {"GAN_BATCH_SIZE": 3, "GAN_MICRO_BATCH_SIZE": 2},
    "global batch over 2 processes": {"GAN_GLOBAL_BATCH_SIZE": 2, "GAN_NPROC_PER_NODE": 2},
}


@pytest.mark.parametrize("case", ONE_IMAGE)
def test_mlp_micro_batches_of_one_image_exit_2_before_training(tmp_path, case):
    """BatchNorm cannot train on one value per channel: the MLP's G failed at its first step."""
    write_idx(tmp_path / "data", n=32)
    env = job_env(
        tmp_path, GAN_DATASET="mnist", GAN_MODEL="mlp", GAN_MAX_STEPS=2, **ONE_IMAGE[case]
    )
    if "GAN_BATCH_SIZE" not in ONE_IMAGE[case]:
        del env["GAN_BATCH_SIZE"]  # job_env's 16 per process would disagree with the global 2
    result = run_job(env)
    check(
        result, errors.EXIT_SETTINGS, "GAN_MODEL=mlp", "micro-batches of 1 image", *ONE_IMAGE[case]
    )
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- hostile CIFAR-10 archives


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


ESCAPES = {  # archive members, and the path outside the data folder each would write
    "../ member": lambda out: [(_member("cifar-10-batches-py/../../escaped"), b"x")],
    "absolute member": lambda out: [(_member(str(out / "escaped")), b"x")],
    "symlink member": lambda out: [
        (_member("cifar-10-batches-py", tarfile.SYMTYPE, str(out)), b""),
        (_member("cifar-10-batches-py/escaped"), b"x"),
    ],
}


@pytest.mark.parametrize("case", ESCAPES)
def test_a_cifar_archive_reaching_outside_the_data_folder_exits_3_writing_nothing_there(
    tmp_path, case
):
    data, outside = tmp_path / "a" / "data", tmp_path / "outside"
    data.mkdir(parents=True)
    outside.mkdir()
    archive = data / "cifar-10-python.tar.gz"
    _tar(archive, ESCAPES[case](outside))
    env = job_env(
        tmp_path, GAN_DATASET="cifar10", GAN_RECIPE="custom", GAN_DATA_DIR=data, GAN_MAX_STEPS=1
    )
    check(run_job(env), errors.EXIT_DATA, str(archive), "outside")
    assert not (outside / "escaped").exists() and not (tmp_path / "a" / "escaped").exists()
    assert list(outside.iterdir()) == []


def test_a_cifar_archive_that_is_no_tar_exits_3_naming_it(tmp_path):
    (tmp_path / "data").mkdir()
    archive = tmp_path / "data" / "cifar-10-python.tar.gz"
    archive.write_bytes(b"<html>404 not found</html>")
    env = job_env(tmp_path, GAN_DATASET="cifar10", GAN_RECIPE="custom", GAN_MAX_STEPS=1)
    check(run_job(env), errors.EXIT_DATA, str(archive), "not a tar")


class PlantedBatch:
    """Unpickled by a full unpickler, this calls open(marker, "w"): the file appears."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_cifar_batch_file_exits_3_and_its_code_never_runs(tmp_path):
    folder, marker = tmp_path / "data" / "cifar-10-batches-py", tmp_path / "planted-ran"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        batch = {"data": PlantedBatch(marker), "labels": [0]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
    env = job_env(tmp_path, GAN_DATASET="cifar10", GAN_RECIPE="custom", GAN_MAX_STEPS=1)
    check(run_job(env), errors.EXIT_DATA, f"{folder / 'data_batch_1'}: not a CIFAR-10 batch file",
          "it names the Python object")  # fmt: skip
    assert not marker.exists()


# ---------------------------------------------------------------- --out s3://


def test_out_s3_uploads_what_the_tools_write_and_writes_no_local_s3_folder(
    s3, run, generator_file, tmp_path
):
    bucket = new_bucket(s3)
    env = {**job_env(tmp_path), **s3.env()}
    prefix = f"s3://{bucket}/out"
    runs = [
        ("sample", "--checkpoint", str(generator_file), "--num", "3", "--out", f"{prefix}/x.npy"),
        ("export", str(generator_file), "--out", f"{prefix}/g.pt"),
        ("evaluate", str(run), "--num", "10", "--out", f"{prefix}/scores.json"),
        ("compare", str(run), "--out", f"{prefix}/compare"),
    ]
    for argv in runs:
        result = subprocess.run([sys.executable, "-m", "job", *argv], env=env, cwd=tmp_path,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        check(result, 0)
    stored = bucket_objects(s3, bucket, "out/")
    assert np.load(io.BytesIO(stored["x.npy"])).shape == (3, 28, 28)
    assert {"g.pt", "g.pt.card.json", "g.pt.card.md"} <= set(stored)
    assert json.loads(stored["scores.json"])["num_samples"] == 10
    assert {"compare/compare.csv", "compare/compare.png"} <= set(stored)
    assert not [k for k in stored if k.endswith(".partial")]
    assert not (tmp_path / "s3:").exists()


def test_features_out_s3_is_refused_naming_the_flag(tmp_path):
    result = run_job(job_env(tmp_path), "features", "--dataset", "mnist", "--out", "s3://b/f.pt")
    check(result, errors.EXIT_SETTINGS, "--out s3://b/f.pt")
    assert not (REPO / "s3:").exists()


# ---------------------------------------------------------------- SIGTERM during sample


def test_sigterm_during_sample_removes_its_partial_file_and_exits_143(generator_file, tmp_path):
    out = tmp_path / "many.npy"
    partial = tmp_path / ".many.npy.partial"
    argv = ["sample", "--checkpoint", str(generator_file), "--num", "200000", "--batch-size", "1"]
    child = subprocess.Popen([sys.executable, "-m", "job", *argv, "--out", str(out)],
                             env=job_env(tmp_path), cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not partial.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    assert partial.exists(), child.communicate()[0]
    time.sleep(0.3)
    child.send_signal(signal.SIGTERM)
    text = child.communicate(timeout=60)[0]
    assert child.returncode == 128 + signal.SIGTERM, text
    assert "Traceback" not in text and "stopped by SIGTERM" in text, text
    assert not partial.exists() and not out.exists()
