import math
import re
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from job.gan.models import Arch, build_generator
from job.gan.truncation import truncate, truncation_bound
from job.infra import errors
from job.infra.errors import SettingsError
from job.run.generator_file import load_generator
from job.tools.sample import (
    interpolation_inputs,
    parse_seeds,
    render,
    seed_inputs,
    seed_z,
)
from job.tools.sample import main as sample_main
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


# ---------------------------------------------------------------- --seeds, --truncation,
# --interpolate, --which (the conditional MLP of `trained`: 16-d z, 10 classes)


def sampled(run_dir: Path, out: Path, *extra: str) -> np.ndarray:
    """The images `gan-job sample` wrote for these flags."""
    result = sample(run_dir, out, *extra)
    assert result.returncode == 0, result.stdout + result.stderr
    return np.load(out) if out.suffix == ".npy" else np.asarray(Image.open(out))


def rendered(checkpoint: Path, z: torch.Tensor, labels: torch.Tensor | None) -> np.ndarray:
    """The images of these inputs, generated in this process."""
    g, arch = load_generator(str(checkpoint))
    return np.concatenate(list(render(g, arch, [(z, labels)])))


def test_a_seed_gives_the_same_image_alone_in_any_list_order_and_batch_size(trained, tmp_path):
    alone = sampled(trained, tmp_path / "alone.npy", "--seeds", "5")
    listed = sampled(trained, tmp_path / "listed.npy", "--seeds", "3,5,0-1", "--batch-size", "2")
    other = sampled(trained, tmp_path / "other.npy", "--seeds", "0-1,3,5", "--batch-size", "1")
    assert listed.shape == (4, 28, 28)
    assert np.array_equal(alone[0], listed[1]) and np.array_equal(alone[0], other[3])
    assert np.array_equal(listed[0], other[2]) and np.array_equal(listed[2:], other[:2])
    assert len({image.tobytes() for image in listed}) == 4


def test_a_seeds_image_comes_from_its_own_generator_and_label(trained):
    z = torch.stack([seed_z(16, 13), seed_z(16, 13)])
    g, arch = load_generator(str(trained))
    (own,) = render(g, arch, seed_inputs(arch, [13], None))
    assert np.array_equal(own[0], rendered(trained, z, torch.tensor([3, 4]))[0])  # 13 % 10
    assert not np.array_equal(own[0], rendered(trained, z, torch.tensor([3, 4]))[1])
    (labelled,) = render(g, arch, seed_inputs(arch, [13], 4))
    assert np.array_equal(labelled[0], rendered(trained, z, torch.tensor([3, 4]))[1])


def test_num_and_seed_draw_their_noise_as_before_whatever_the_batch_size(trained, tmp_path):
    images = sampled(trained, tmp_path / "x.npy", "--num", "5", "--seed", "3", "--batch-size", "2")
    z = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(images, rendered(trained, z, torch.arange(5) % 10))


def test_parse_seeds_reads_ranges_and_lists_in_the_order_given():
    assert parse_seeds("0-3,100, 7 ,2-2") == [0, 1, 2, 3, 100, 7, 2]
    for bad, why in [("3-1", "goes down"), ("a", "neither a seed"), ("1,,2", "neither"),
                     ("-2", "neither"), (f"{2**64}", "seeds go up to")]:  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_seeds(bad)


@pytest.mark.parametrize("psi", [0.9, 0.7, 0.5, 0.2])
def test_truncation_draws_each_component_from_the_normal_truncated_at_its_psi_quantile(psi):
    t = truncation_bound(psi)
    z = torch.randn(200_000, 4, generator=torch.Generator().manual_seed(0))
    cut = truncate(z, psi)
    assert t == pytest.approx(float(torch.special.ndtri(torch.tensor((1 + psi) / 2))))
    assert float(cut.abs().max()) <= t + 1e-6 and float(cut.abs().max()) > 0.999 * t
    density = math.exp(-t * t / 2) / math.sqrt(2 * math.pi)
    variance = 1 - 2 * t * density / psi  # of N(0, 1) truncated to [-t, t]
    assert float(cut.var()) == pytest.approx(variance, rel=0.01)
    ordered = truncate(z.sort(dim=0).values, psi)
    assert bool((ordered.diff(dim=0) >= 0).all())  # monotone: each component keeps its order


def test_truncation_bounds_are_the_documented_ones_and_psi_1_leaves_z_alone():
    assert (round(truncation_bound(0.7), 3), round(truncation_bound(0.5), 3)) == (1.036, 0.674)
    z = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1)) * 3
    assert truncation_bound(1.0) == math.inf and torch.equal(truncate(z, 1.0), z)


def test_sample_truncation_feeds_the_generator_truncated_z_and_psi_1_is_none(trained, tmp_path):
    plain = sampled(trained, tmp_path / "plain.npy", "--seeds", "0-3")
    one = sampled(trained, tmp_path / "one.npy", "--seeds", "0-3", "--truncation", "1")
    half = sampled(trained, tmp_path / "half.npy", "--seeds", "0-3", "--truncation", "0.5")
    z = torch.stack([seed_z(16, s) for s in range(4)])
    assert np.array_equal(plain, one) and not np.array_equal(plain, half)
    assert np.array_equal(half, rendered(trained, truncate(z, 0.5), torch.arange(4)))


def test_interpolation_rows_run_from_one_seeds_image_to_the_next(trained, tmp_path):
    own = sampled(trained, tmp_path / "own.npy", "--seeds", "4,9,2", "--label", "2")
    grid = sampled(trained, tmp_path / "path.npy", "--seeds", "4,9,2", "--label", "2",
                   "--interpolate", "--steps", "5").reshape(2, 5, 28, 28)  # fmt: skip
    assert np.array_equal(grid[:, 0], own[:2]) and np.array_equal(grid[:, -1], own[1:])
    assert all(not np.array_equal(grid[0, 2], end) for end in own[:2])
    png = sampled(trained, tmp_path / "path.png", "--seeds", "4,9,2", "--interpolate")
    assert png.shape[:2] == (2 + 2 * 30, 2 + 8 * 30)  # 2 rows of 8 (--steps' default)


def test_interpolation_keeps_each_rows_first_seed_label_and_goes_along_the_great_circle():
    arch = Arch(model="mlp", channels=1, image_size=28, latent_dim=16, width=8, num_classes=10)
    z, labels = interpolation_inputs(arch, [4, 9, 2], 5, None, path=False)
    assert labels.tolist() == [4] * 5 + [9] * 5
    a, b = seed_z(16, 4), seed_z(16, 9)
    omega = torch.acos(a @ b / (a.norm() * b.norm()))
    middle = (a + b) * torch.sin(omega / 2) / torch.sin(omega)
    assert torch.allclose(z[2], middle, atol=1e-5)
    assert torch.equal(z[0], a) and torch.equal(z[4], b) and torch.equal(z[5], b)


def test_interpolation_gif_has_a_frame_per_step_along_the_path_through_all_seeds(trained, tmp_path):
    own = sampled(trained, tmp_path / "own.npy", "--seeds", "0,1,7")
    out = tmp_path / "path.gif"
    result = sample(trained, out, "--seeds", "0,1,7", "--interpolate", "--steps", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    with Image.open(out) as gif:
        frames = [np.asarray(frame.convert("L")) for frame in ImageSequence.Iterator(gif)]
    assert len(frames) == 2 * (4 - 1) + 1
    assert np.array_equal(frames[0], own[0]) and np.array_equal(frames[-1], own[2])


@pytest.fixture
def best_run(trained, tmp_path) -> tuple[Path, Path]:
    """A copy of `trained` with a best/generator.pt of other weights (step 2), as training keeps
    it: {"arch", "g_ema", "step", "scores"}."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    shutil.rmtree(run / "best", ignore_errors=True)
    final = torch.load(run / "final/generator.pt", weights_only=False)
    weights = {k: v * 0.5 if v.is_floating_point() else v for k, v in final["g_ema"].items()}
    (run / "best").mkdir()
    best = {"arch": final["arch"], "g_ema": weights, "step": 2, "scores": {"fid": 12.5}}
    torch.save(best, run / "best/generator.pt")
    return run, run / "best/generator.pt"


def test_which_best_samples_the_runs_best_generator(best_run, tmp_path):
    run, best = best_run
    z = torch.stack([seed_z(16, s) for s in range(4)])
    images = sampled(run, tmp_path / "best.npy", "--seeds", "0-3", "--which", "best")
    final = sampled(run, tmp_path / "final.npy", "--seeds", "0-3", "--which", "final")
    assert np.array_equal(images, rendered(best, z, torch.arange(4)))
    assert np.array_equal(final, rendered(run, z, torch.arange(4)))
    assert not np.array_equal(images, final)


def test_which_best_of_a_run_without_best_exits_5_naming_it(best_run, tmp_path):
    run, best = best_run
    best.unlink()
    result = sample(run, tmp_path / "x.npy", "--seeds", "0", "--which", "best")
    assert result.returncode == errors.EXIT_CHECKPOINT, result.stdout + result.stderr
    assert f"--checkpoint {run}: no best/generator.pt" in result.stdout


def test_bad_sampling_flags_exit_2_naming_each_flag_before_any_work(tmp_path):
    out = str(tmp_path / "x.gif")
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", "/nonexistent", "--out", out,
                     "--seeds", "3-1", "--interpolate", "--steps", "1",
                     "--truncation", "0")  # fmt: skip
    assert result.returncode == errors.EXIT_SETTINGS, result.stdout + result.stderr
    for problem in ("--seeds 3-1: the range 3-1 goes down", "--steps 1: expected an integer from 2 to 1000",
                    "--truncation 0.0: expected 0 < PSI <= 1"):  # fmt: skip
        assert problem in result.stdout
    result = run_job(job_env(tmp_path), "sample", "--checkpoint", "/nonexistent", "--out", out,
                     "--seeds", "1", "--num", "4")  # fmt: skip
    assert result.returncode == errors.EXIT_SETTINGS
    assert "--seeds: not with --num or --seed" in result.stdout


BAD_FLAGS = {
    "--seeds with --seed": (["--seeds", "1-2", "--seed", "3"], "--seeds: not with --num or --seed"),
    "no images asked for": ([], "--num or --seeds: one of them is needed"),
    "a seed that is no number": (["--seeds", "1,x"], "--seeds 1,x: 'x' is neither a seed"),
    "--interpolate of one seed": (["--seeds", "4", "--interpolate"], "--interpolate: needs at least two"),
    "--interpolate without --seeds": (["--num", "4", "--interpolate"], "--interpolate: needs --seeds"),
    "--steps alone": (["--num", "4", "--steps", "5"], "--steps 5: only with --interpolate"),
    "psi above 1": (["--num", "4", "--truncation", "1.5"], "--truncation 1.5: expected 0 < PSI"),
    "psi not a number": (["--num", "4", "--truncation", "nan"], "--truncation nan: expected"),
    "--batch-size 0": (["--num", "4", "--batch-size", "0"], "--batch-size 0: expected an integer"),
    "--which best of a file": (["--num", "4", "--which", "best", "--checkpoint", "g.pt"],
                               "--which best: --checkpoint g.pt is a file"),
    "too many seeds for a grid": (["--seeds", "0-1024"], "--seeds: 1025 images: a .png grid holds at most"),
    "too many frames for a gif": (["--seeds", "0-100", "--interpolate", "--steps", "12", "--out", "TMP/x.gif"],
                                  "--seeds/--steps: 1101 images: a .gif holds at most"),
    "a gif without --interpolate": (["--seeds", "0-3", "--out", "TMP/x.gif"], "--out TMP/x.gif: a .gif is written by --interpolate only"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_each_bad_sampling_flag_is_a_settings_error_naming_it(case, tmp_path):
    flags, expected = BAD_FLAGS[case]
    argv = ["--checkpoint", "/nonexistent", "--out", str(tmp_path / "x.png"), *flags]
    argv = [arg.replace("TMP", str(tmp_path)) for arg in argv]
    with pytest.raises(SettingsError, match=re.escape(expected.replace("TMP", str(tmp_path)))):
        sample_main(argv)


def test_which_accepts_only_best_or_final(capsys):
    with pytest.raises(SystemExit) as exit_:
        sample_main(["--checkpoint", "/nonexistent", "--out", "x.png", "--which", "worst"])
    assert exit_.value.code == errors.EXIT_SETTINGS
    assert "argument --which: invalid choice: 'worst'" in capsys.readouterr().err
