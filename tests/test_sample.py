import numpy as np
import pytest

from tests.helpers import job_env, run_job, write_idx


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
