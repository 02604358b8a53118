"""`gan-job features`: a small classifier trained on tiny synthetic data becomes a FID extractor."""

import pickle

import numpy as np
import pytest
import torch

from job.__main__ import main
from job.quality.extractors import ChannelAdapter, _file_digest, load_extractor
from job.quality.reference import real_statistics
from job.settings import help_text
from job.tools.features import read_meta
from tests.helpers import job_env, run_job, write_idx, write_image_folder

CPU = torch.device("cpu")
TINY = ["--epochs", "1", "--batch-size", "16", "--width", "8", "--feature-dim", "32"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny nets train faster on one thread than on two shared, busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("features-data")
    write_idx(folder, n=800)  # 28 px: the 10 squares sit at 10 distinct positions
    write_idx(folder, n=100, prefix="t10k", seed=1)
    return folder


@pytest.fixture(scope="module")
def trained(idx_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "mnist-feat.pt"
    code = main(["features", "--dataset", "mnist", "--data-dir", str(idx_dir), "--out", str(out), *TINY])  # fmt: skip
    assert code == 0
    return out


def test_writes_an_extractor_that_load_extractor_accepts(trained):
    extractor = load_extractor(str(trained), 1, 28, CPU)
    assert extractor.name == "torchscript:mnist-feat" and extractor.dim == 32
    assert extractor.identity == f"ts-{_file_digest(trained)}"
    assert isinstance(extractor.model, ChannelAdapter)
    # any input size, 3 channels as torcheval feeds them: N x D features
    for size in (16, 28, 32):
        assert extractor.model(torch.rand(5, 3, size, size)).shape == (5, 32)
    state = real_statistics(extractor, (torch.rand(20, 1, 28, 28) * 255).to(torch.uint8), CPU)
    assert torch.isfinite(state["real_cov_sum"]).all()


def test_meta_records_a_test_accuracy_well_above_chance(trained, capsys):
    meta = read_meta(trained)
    assert meta["dataset"] == "mnist" and meta["test_split"] == "test split"
    assert meta["image_size"] == 28 and meta["epochs"] == 1 and meta["num_classes"] == 10
    assert meta["test_images"] == 100 and meta["train_images"] == 800
    assert 0 <= meta["test_accuracy"] <= 1
    assert meta["test_accuracy"] >= 0.5  # chance is 0.1; squares at 10 positions are easy


def test_output_prints_accuracy_and_wall_time(idx_dir, tmp_path, capsys):
    out = tmp_path / "again.pt"
    args = ["--dataset", "mnist", "--data-dir", str(idx_dir), "--out", str(out), *TINY]
    assert main(["features", *args, "--image-size", "12", "--seed", "1"]) == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "wall time" in printed
    assert read_meta(out)["image_size"] == 12 and read_meta(out)["seed"] == 1


def test_another_file_gives_another_extractor_identity(trained, tmp_path):
    other = tmp_path / "mnist-feat.pt"
    torch.jit.load(str(trained)).save(str(other), _extra_files={"meta.json": "{}"})
    ids = [load_extractor(str(p), 1, 28, CPU).identity for p in (trained, other)]
    assert ids[0] != ids[1]


def test_without_a_test_split_it_holds_out_ten_percent(tmp_path):
    write_idx(tmp_path / "data", n=200, size=12)
    out = tmp_path / "f.pt"
    args = ["--dataset", "kmnist", "--data-dir", str(tmp_path / "data"), "--out", str(out)]
    assert main(["features", *args, *TINY]) == 0
    meta = read_meta(out)
    assert meta["image_size"] == 28  # the dataset's own size by default
    assert meta["test_images"] == 20 and meta["train_images"] == 180
    assert "held-out" in meta["test_split"]


def test_image_folder_gives_a_three_channel_extractor(tmp_path):
    root = write_image_folder(tmp_path / "imgs", per_class=10)
    out = tmp_path / "folder.pt"
    args = ["--dataset", f"folder:{root}", "--out", str(out), "--image-size", "16", "--num-workers", "0"]  # fmt: skip
    assert main(["features", *args, *TINY]) == 0
    meta = read_meta(out)
    assert meta["channels"] == 3 and meta["num_classes"] == 2 and meta["test_images"] == 2
    extractor = load_extractor(str(out), 3, 28, CPU)
    assert extractor.model(torch.rand(4, 3, 40, 40)).shape == (4, 32)


def test_cifar10_is_evaluated_on_its_test_batch(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (8, 3072), dtype=np.uint8), "labels": [0, 1] * 4}
        (folder / name).write_bytes(pickle.dumps(batch))
    out = tmp_path / "cifar.pt"
    args = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(out)]
    assert main(["features", *args, *TINY]) == 0
    meta = read_meta(out)
    assert meta["test_split"] == "test split" and meta["test_images"] == 8
    assert meta["train_images"] == 40 and meta["channels"] == 3 and meta["image_size"] == 32


def test_missing_dataset_is_a_data_error(tmp_path):
    result = run_job(
        job_env(tmp_path), "features", "--dataset", "kmnist", "--out", str(tmp_path / "f.pt"),
        "--data-dir", str(tmp_path / "empty"),
    )  # fmt: skip
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no data found" in result.stdout and "train-images-idx3-ubyte" in result.stdout
    assert not (tmp_path / "f.pt").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["--dataset", "imagenet", "--out", "x.pt"],
        ["--dataset", "mnist", "--out", "x.pt", "--epochs", "0"],
        ["--dataset", "mnist", "--out", "x.pt", "--image-size", "4"],
        ["--dataset", "mnist", "--out", "s3://bucket/x.pt"],
    ],
)
def test_bad_arguments_are_settings_errors(tmp_path, args):
    assert main(["features", *args]) == 2


def test_unparseable_arguments_exit_2(tmp_path):
    result = run_job(job_env(tmp_path), "features", "--dataset", "mnist", "--epochs", "two")
    assert result.returncode == 2 and "--epochs" in result.stderr


def test_help_names_the_subcommand():
    assert "gan-job features --dataset" in help_text()


def test_a_features_file_carries_its_classifier_head_applied_to_the_features(tmp_path):
    from job.tools.features import FeatureNet, save_extractor

    torch.manual_seed(0)
    net = FeatureNet(1, 28, 7, width=4, feature_dim=16)
    save_extractor(net, tmp_path / "f.pt", {"num_classes": 7})
    extractor = load_extractor(str(tmp_path / "f.pt"), 1, 28, CPU)
    assert extractor.num_classes == 7 and extractor.label_accuracy_problem(7) is None
    x = torch.rand(5, 3, 28, 28)
    with torch.no_grad():
        features = extractor.model(x)
        # the head runs on the features already extracted: the images are not looked at again
        logits = extractor.classifier(torch.zeros_like(x), features)
        assert torch.allclose(logits, net.eval().logits(x[:, :1]), atol=1e-5)
