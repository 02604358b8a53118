"""gan-job export: a generator file that a Python with torch alone loads, and its model card."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from job.gan import sampling
from job.gan.models import Arch, build_generator
from job.infra import errors
from job.infra.errors import CheckpointError, SettingsError
from job.infra.stores import open_store
from job.run.generator_file import load_generator
from job.tools.export import Source, generator, serialize
from job.tools.export import main as export_main
from tests.helpers import REPO, job_env, run_job, write_extractor, write_idx

SITE_PACKAGES = Path(torch.__file__).resolve().parents[1]  # torch, without gan-job's finder
FLOAT_TOLERANCE = 1e-5  # exported images against the generator's, same z
NUM, SEED = 10, 3  # images compared with gan-job sample --num NUM --seed SEED

# run in `python -I -S`: no site hooks (so no editable gan-job), no cwd on sys.path; each file's
# card's own three lines load it, then the same module draws the images of inputs.pt
ISOLATED = """
import json, sys
sys.path.append(sys.argv[1])
try:
    import job
except ModuleNotFoundError:
    print("import job: ModuleNotFoundError")
else:
    sys.exit(f"job is importable here: {job.__file__}")
import torch
inputs = torch.load("inputs.pt")
for name in sys.argv[2:]:
    card = json.load(open(name + ".card.json"))
    assert card["file"] == name, card["file"]
    scope = {}
    exec(card["load"], scope)
    assert tuple(scope["images"].shape) == (16, *card["image_shape"]), scope["images"].shape
    torch.save(scope["g"](*inputs), name + ".images")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny trained runs: a DCGAN (GAN_DEPTH 1) evaluated at its last step, and a
    conditional MLP that was never evaluated (no eval.jsonl, no best/)."""
    tmp = tmp_path_factory.mktemp("export")
    write_idx(tmp / "data", n=128)
    features = write_extractor(tmp / "features.pt")
    settings = {
        "dcgan": dict(GAN_MODEL="dcgan", GAN_DEPTH=1, GAN_FID_FEATURES=str(features),
                      GAN_FID_NUM_SAMPLES=32, GAN_FID_EVERY=0),
        "cond": dict(GAN_MODEL="mlp", GAN_CONDITIONAL="true"),
    }  # fmt: skip
    for name, extra in settings.items():
        env = job_env(tmp, GAN_DATASET="mnist", GAN_MAX_STEPS=4, GAN_RUN_ID=name, **extra)
        result = run_job(env)
        assert result.returncode == 0, result.stdout + result.stderr
    return {name: tmp / "runs" / name for name in settings}


def export(source: Path | str, out: Path, *extra: str, env: dict | None = None):
    env = env or job_env(out.parent)
    return run_job(env, "export", str(source), "--out", str(out), *extra)


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory) -> dict[str, list[Path]]:
    """Each run exported from its folder as TorchScript (.pt) and torch.export (.pt2)."""
    folder = tmp_path_factory.mktemp("exported")
    files: dict[str, list[Path]] = {}
    for name, run in runs.items():
        files[name] = [folder / f"{name}.pt", folder / f"{name}.pt2"]
        for out in files[name]:
            result = export(run, out)
            assert result.returncode == 0, result.stdout + result.stderr
    return files


def card_of(path: Path, suffix: str) -> Path:
    return path.with_name(f"{path.name}.card{suffix}")


def sample_inputs(arch: Arch) -> list[torch.Tensor]:
    """What gan-job sample --num NUM --seed SEED feeds the generator (job/tools/sample.py sample())."""
    z = torch.randn(NUM, arch.latent_dim, generator=torch.Generator().manual_seed(SEED))
    return [z, torch.arange(NUM) % arch.num_classes] if arch.num_classes else [z]


def reference(g: torch.nn.Module, inputs: list[torch.Tensor]) -> torch.Tensor:
    """The generator's own images in [0, 1], as gan-job sample and evaluation make them."""
    return sampling.generate(g, inputs[0], inputs[1] if len(inputs) > 1 else None)


def run_isolated(folder: Path, names: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", ISOLATED, str(SITE_PACKAGES), *names],
        cwd=folder,
        env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", ["dcgan", "cond"])
def test_export_loads_without_gan_job_and_draws_what_sample_draws_for_the_same_z(
    runs, exported, tmp_path, name
):
    for path in exported[name]:
        for file in (path, card_of(path, ".json")):
            shutil.copy(file, tmp_path)
    g, arch = load_generator(str(runs[name]))
    inputs = sample_inputs(arch)
    torch.save(inputs, tmp_path / "inputs.pt")
    result = run_isolated(tmp_path, [p.name for p in exported[name]])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "import job: ModuleNotFoundError" in result.stdout
    expected = reference(g, inputs)
    assert run_job(job_env(tmp_path), "sample", "--checkpoint", str(runs[name]), "--num", str(NUM),
                   "--seed", str(SEED), "--out", str(tmp_path / "s.npy")).returncode == 0  # fmt: skip
    sampled = torch.from_numpy(np.load(tmp_path / "s.npy")).int()
    for path in exported[name]:
        images = torch.load(tmp_path / f"{path.name}.images")
        assert images.dtype == torch.float32 and images.shape == (NUM, 1, 28, 28)
        assert 0 <= images.min() and images.max() <= 1
        torch.testing.assert_close(images, expected, atol=FLOAT_TOLERANCE, rtol=0)
        pixels = (images * 255).round().int()[:, 0]
        assert (pixels - sampled).abs().max() <= 1


def test_card_names_the_run_its_step_scores_settings_and_the_files_sha256(runs, exported):
    out = exported["dcgan"][0]
    card = json.loads(card_of(out, ".json").read_text())
    assert card["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert card["bytes"] == out.stat().st_size and card["format"] == "torchscript"
    config = json.loads((runs["dcgan"] / "config.json").read_text())
    row = json.loads((runs["dcgan"] / "eval.jsonl").read_text().splitlines()[-1])
    assert card["scores"] == row and row["step"] == 4 and row["num_samples"] == 32
    assert (card["step"], card["images_seen"], card["run_id"]) == (4, 64, "dcgan")
    assert card["settings"] == config["settings"] and card["dataset"] == "mnist"
    assert card["architecture"] == {**dataclasses.asdict(Arch(**config["arch"]))}
    assert card["image_shape"] == [1, 28, 28]
    assert card["gan_job_version"] == importlib.metadata.version("gan-job")
    assert "[0, 1]" in card["output"] and card["load"].count("\n") == 3
    markdown = card_of(out, ".md").read_text()
    for fact in (card["sha256"], row["extractor"], "N = 32", card["load"].strip(), "depth"):
        assert fact in markdown


def test_a_conditional_export_takes_labels_and_says_so(exported):
    card = json.loads(card_of(exported["cond"][1], ".json").read_text())
    assert card["format"] == "torch.export" and card["scores"] is None
    assert card["inputs"]["labels"] == "N int64 class labels in 0..9"
    assert "torch.arange(16) % 10" in card["load"]


def test_which_best_of_a_run_without_best_exits_5_saying_so(runs, tmp_path):
    result = export(runs["cond"], tmp_path / "g.pt", "--which", "best")
    assert result.returncode == errors.EXIT_CHECKPOINT, result.stdout + result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert f"{runs['cond']}: no best/generator.pt" in line and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_which_best_exports_best_generator_with_the_scores_it_carries(runs, tmp_path):
    run = shutil.copytree(runs["cond"], tmp_path / "run")
    final = torch.load(run / "final/generator.pt", weights_only=False)
    scores = {"step": 4, "images_seen": 64, "fid": 12.5, "extractor": "x", "num_samples": 100}
    (run / "best").mkdir()
    torch.save({**final, "step": 4, "scores": scores}, run / "best/generator.pt")
    result = export(run, tmp_path / "best.pt", "--which", "best")
    assert result.returncode == 0, result.stdout + result.stderr
    card = json.loads((tmp_path / "best.pt.card.json").read_text())
    assert card["source"] == f"{run}/best/generator.pt"
    assert (card["scores"], card["step"], card["images_seen"]) == (scores, 4, 64)
    assert "with extractor `x`, N = 100 generated" in (tmp_path / "best.pt.card.md").read_text()


def test_export_from_s3_reads_the_run_through_gan_s3_endpoint_url(
    runs, s3_env, s3_bucket, tmp_path
):
    store = open_store(f"s3://{s3_bucket}/runs/cond")
    for path in runs["cond"].rglob("*"):
        if path.is_file():
            store.put_file(path.relative_to(runs["cond"]).as_posix(), path)
    env = job_env(tmp_path, GAN_S3_ENDPOINT_URL=s3_env.endpoint_url)
    env.pop("AWS_ENDPOINT_URL_S3")
    result = export(f"s3://{s3_bucket}/runs/cond", tmp_path / "g.pt", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    card = json.loads((tmp_path / "g.pt.card.json").read_text())
    assert (card["run_id"], card["step"], card["images_seen"]) == ("cond", 4, 64)


def test_bad_out_exits_2_naming_it_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("")
    (tmp_path / "folder.pt").mkdir()
    cases = {
        tmp_path / "g.npy": "expected a file name ending in .pt, .pt2, .onnx",
        tmp_path / "folder.pt": "is a folder: expected a file name",
        tmp_path / "afile" / "g.pt": f"{tmp_path / 'afile'} is a file, not a folder",
    }
    for out, expected in cases.items():
        with pytest.raises(SettingsError, match=re.escape(f"--out {out}: {expected}")):
            export_main(["/nonexistent", "--out", str(out)])
    result = export("/nonexistent", tmp_path / "g.npy")
    assert result.returncode == errors.EXIT_SETTINGS, result.stdout + result.stderr


def test_out_that_cannot_be_written_exits_4_naming_it(runs, tmp_path):
    result = export(runs["cond"], Path("/proc/gan-job-export.pt"))
    assert result.returncode == errors.EXIT_STORAGE, result.stdout + result.stderr
    assert "--out /proc/gan-job-export.pt: cannot write in /proc (" in result.stdout


def test_export_onto_a_full_disk_exits_8_leaving_no_file_or_card(runs, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    out = disk / "g.pt"
    script = (
        f'mount -t tmpfs -o size=16k tmpfs "{disk}" || exit 99; "{sys.executable}" -m job export '
        f'"{runs["dcgan"]}" --out "{out}"; code=$?; echo LEFT; ls -A "{disk}"; exit $code'
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=job_env(tmp_path),
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == errors.EXIT_DISK_FULL, result.stdout + result.stderr
    assert f"--out {out}: No space left on device" in result.stdout
    assert result.stdout.split("LEFT")[-1].strip() == ""


NOT_A_GENERATOR = {
    "garbage.pt": (lambda p: p.write_bytes(b"\x80\x02garbage" * 100), "unreadable ("),
    "tensor.pt": (lambda p: torch.save(torch.zeros(3), p), "a saved Tensor, not a"),
    "torchscript.pt": (write_extractor, "a TorchScript module, not a"),
    "dict.pt": (lambda p: torch.save({"a": 1}, p), "a dict without a generator, not a"),
    "missing.pt": (lambda p: None, "no such file"),
    "folder": (lambda p: p.mkdir(), "no complete checkpoint or final/generator.pt"),
}


@pytest.mark.parametrize("name", NOT_A_GENERATOR)
def test_an_input_that_holds_no_generator_is_a_checkpoint_error_naming_it(tmp_path, name):
    write, what = NOT_A_GENERATOR[name]
    write(tmp_path / name)
    with pytest.raises(CheckpointError, match="^" + re.escape(f"{tmp_path / name}: {what}")):
        export_main([str(tmp_path / name), "--out", str(tmp_path / "g.pt")])
    assert CheckpointError.exit_code == errors.EXIT_CHECKPOINT
    assert not (tmp_path / "g.pt").exists()


def arch_of(model: str, classes: int, depth: int, size: int = 28, channels: int = 1) -> Arch:
    return Arch(model=model, channels=channels, image_size=size, latent_dim=16, width=8,
                num_classes=classes, depth=depth)  # fmt: skip


KINDS = [(m, c, d) for m in ("mlp", "dcgan") for c in (0, 10) for d in (0, 1)]


def loaded(data: bytes, fmt: str) -> torch.nn.Module:
    if fmt == "torchscript":
        return torch.jit.load(io.BytesIO(data))
    return torch.export.load(io.BytesIO(data)).module()


@pytest.mark.parametrize("fmt", ["torchscript", "torch.export"])
@pytest.mark.parametrize(("model", "classes", "depth"), KINDS)
def test_every_generator_kind_exports_with_a_free_batch_size(model, classes, depth, fmt):
    arch = arch_of(model, classes, depth)
    state = {"arch": arch.to_dict(), "g_ema": build_generator(arch).state_dict()}
    g, _ = generator(Source("untrained", state, None))
    module = loaded(serialize(g, arch, fmt), fmt)
    for n in (1, 7):
        inputs = [torch.randn(n, 16)] + ([torch.arange(n) % classes] if classes else [])
        torch.testing.assert_close(
            module(*inputs), reference(g, inputs), atol=FLOAT_TOLERANCE, rtol=0
        )


def test_an_rgb_dcgan_at_32_pixels_exports():
    arch = arch_of("dcgan", 10, 1, size=32, channels=3)
    g = build_generator(arch).eval()
    module = loaded(serialize(g, arch, "torchscript"), "torchscript")
    assert module(torch.randn(3, 16), torch.arange(3)).shape == (3, 3, 32, 32)


def test_onnx_without_the_onnx_extra_exits_2_saying_what_to_install(tmp_path, monkeypatch):
    for name in ("onnx", "onnxscript"):  # None in sys.modules: Python's own "cannot import"
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(SettingsError, match="ONNX needs the onnx and onnxscript package"):
        export_main(["/nonexistent", "--out", str(tmp_path / "g.onnx")])


@pytest.mark.parametrize(("model", "classes", "depth"), KINDS)
def test_every_generator_kind_exports_to_onnx_and_runs_in_onnxruntime(model, classes, depth):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    arch = arch_of(model, classes, depth)
    g = build_generator(arch).eval()
    session = ort.InferenceSession(serialize(g, arch, "onnx"))
    inputs = [torch.randn(5, 16)] + ([torch.arange(5) % classes] if classes else [])
    feed = dict(zip(("z", "labels"), (t.numpy() for t in inputs), strict=False))
    images = torch.from_numpy(session.run(None, feed)[0])
    torch.testing.assert_close(images, reference(g, inputs), atol=FLOAT_TOLERANCE, rtol=0)
