import re
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch

from job import errors
from job.errors import SettingsError
from job.models import Arch, build_generator
from job.sample import main as sample_main
from tests.helpers import REPO, job_env, run_job, write_extractor, write_idx


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A conditional MLP (1 channel) and a DCGAN at 32 px on CIFAR-like RGB folders."""
    tmp = tmp_path_factory.mktemp("sample")
    write_idx(tmp / "data", n=128)
    env = job_env(tmp, GAN_DATASET="mnist", GAN_MODEL="mlp", GAN_CONDITIONAL="true",
                  GAN_MAX_STEPS=3, GAN_RUN_ID="cond")  # fmt: skip
    assert run_job(env).returncode == 0
    return tmp / "runs" / "cond"


def sample(run_dir, out, *extra):
    return run_job(
        job_env(run_dir), "sample", "--checkpoint", str(run_dir), "--out", str(out), *extra
    )


def test_sample_writes_uint8_images_and_the_same_seed_repeats(trained, tmp_path):
    for name in ("a.npy", "b.npy"):
        assert sample(trained, tmp_path / name, "--num", "5", "--seed", "3").returncode == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    assert a.shape == (5, 28, 28) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    sample(trained, tmp_path / "c.npy", "--num", "5", "--seed", "4")
    assert not np.array_equal(a, np.load(tmp_path / "c.npy"))


def test_sample_from_checkpoint_export_and_run_folder_agree(trained, tmp_path):
    paths = [trained, trained / "final/generator.pt", trained / "checkpoints/step-00000003"]
    outputs = []
    for i, path in enumerate(paths):
        out = tmp_path / f"{i}.npy"
        result = sample(path, out, "--num", "4")
        assert result.returncode == 0, result.stdout + result.stderr
        outputs.append(np.load(out))
    assert all(np.array_equal(outputs[0], o) for o in outputs[1:])


def test_sample_png_grid_and_label(trained, tmp_path):
    assert sample(trained, tmp_path / "g.png", "--num", "9", "--label", "7").returncode == 0
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_sample_rejects_a_label_outside_the_classes(trained, tmp_path):
    result = sample(trained, tmp_path / "x.npy", "--num", "2", "--label", "10")
    assert result.returncode == 2 and "--label 10: expected 0..9" in result.stdout


def test_sample_from_nowhere_is_a_checkpoint_error(tmp_path):
    result = sample(tmp_path / "nothing", tmp_path / "x.npy", "--num", "2")
    assert result.returncode == 5 and "no complete checkpoint" in result.stdout


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A generator export (untrained: what it draws does not matter here)."""
    arch = Arch(model="mlp", channels=1, image_size=28, latent_dim=16, width=8, num_classes=0)
    path = tmp_path_factory.mktemp("export") / "generator.pt"
    torch.save({"arch": arch.to_dict(), "g_ema": build_generator(arch).state_dict()}, path)
    return path


def test_sample_of_any_size_is_generated_and_written_in_bounded_memory(export, tmp_path):
    out = tmp_path / "many.npy"
    # 100,000 images: 78 MB as uint8, but over 1 GB of float tensors if made at once
    limit = 1_200_000_000  # data segment: the imports need about 0.9 GB of it
    result = subprocess.run(
        [sys.executable, "-m", "job", "sample", "--checkpoint", str(export), "--num", "100000",
         "--out", str(out)],
        env=job_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=300,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_DATA, (limit, limit)),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    images = np.load(out, mmap_mode="r")
    assert images.shape == (100000, 28, 28) and images.dtype == np.uint8
    assert not np.array_equal(images[0], images[-1])
    assert [p.name for p in tmp_path.iterdir()] == ["many.npy"]  # no temporary file left


def test_sample_out_mistakes_are_settings_errors_before_any_work(export, tmp_path):
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "afile").write_text("")
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", "/nonexistent", "--num", "4",
                     "--out", str(tmp_path / "folder.npy"))  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert f"--out {tmp_path / 'folder.npy'}: is a folder: expected a file name" in result.stdout
    cases = {
        tmp_path / "afile" / "x.npy": f"{tmp_path / 'afile'} is a file, not a folder",
        tmp_path / "x.txt": "expected a .npy or .png file name",
    }
    for out, expected in cases.items():
        with pytest.raises(SettingsError, match=re.escape(f"--out {out}: {expected}")):
            sample_main(["--checkpoint", "/nonexistent", "--num", "4", "--out", str(out)])
    grid = ["--checkpoint", str(export), "--num", "5000", "--out", str(tmp_path / "grid.png")]
    with pytest.raises(SettingsError, match="--num 5000: a .png grid holds at most 1024 images"):
        sample_main(grid)


def test_sample_creates_a_missing_folder(export, tmp_path):
    out = tmp_path / "new" / "folder" / "x.npy"
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", str(export), "--num", "3",
                     "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert np.load(out).shape == (3, 28, 28)


NOT_A_CHECKPOINT = {
    "garbage.pt": (lambda p: p.write_bytes(b"\x80\x02garbage" * 100), "unreadable ("),
    "torchscript.pt": (write_extractor, "a TorchScript module, not a"),
    "tensor.pt": (lambda p: torch.save(torch.zeros(3), p), "a saved Tensor, not a"),
    "list.pt": (lambda p: torch.save([1, 2, 3], p), "a saved list, not a"),
}


@pytest.mark.parametrize("name", NOT_A_CHECKPOINT)
def test_sample_of_a_file_that_is_no_checkpoint_exits_5_naming_it_and_what_was_expected(
    tmp_path, name
):
    write, what = NOT_A_CHECKPOINT[name]
    write(tmp_path / name)
    out = tmp_path / "x.png"
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", str(tmp_path / name),
                     "--num", "4", "--out", str(out))  # fmt: skip
    assert result.returncode == errors.EXIT_CHECKPOINT, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    (line,) = result.stdout.strip().splitlines()
    assert f"--checkpoint {tmp_path / name}: {what}" in line
    assert "gan-job checkpoint or generator export (final/generator.pt)" in line
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".png", ".npy"])
def test_sample_onto_a_place_that_cannot_be_written_exits_4_naming_it(export, tmp_path, suffix):
    out = f"/proc/gan-job-sample{suffix}"
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", str(export), "--num", "4",
                     "--out", out)  # fmt: skip
    assert result.returncode == errors.EXIT_STORAGE, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"--out {out}: cannot write in /proc (" in result.stdout


def test_sample_png_onto_a_full_disk_exits_8_leaving_no_partial_png(export, tmp_path):
    disk = tmp_path / "small-disk"
    disk.mkdir()
    out = disk / "grid.png"
    # a grid of 256 images (about 220 KB) onto a 64 KiB tmpfs, in the command's own namespace
    script = (
        f'mount -t tmpfs -o size=64k tmpfs "{disk}" || exit 99; "{sys.executable}" -m job sample '
        f'--checkpoint "{export}" --num 256 --out "{out}"; code=$?; echo LEFT; ls -A "{disk}"; '
        "exit $code"
    )
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=job_env(tmp_path),
                            cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == errors.EXIT_DISK_FULL, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"--out {out}: No space left on device" in result.stdout
    assert result.stdout.split("LEFT")[-1].strip() == ""  # neither grid.png nor a temporary file
