import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from job.data.datasets import load_dataset, load_idx_dataset, read_idx
from job.data.source import BatchSource
from job.infra.errors import DataError
from job.settings import load_settings
from tests.helpers import job_env, run_job, write_extractor, write_idx, write_image_folder


def settings(tmp_path, **env):
    base = {"GAN_DATA_DIR": str(tmp_path)}
    base.update({f"GAN_{k.upper()}": str(v) for k, v in env.items()})
    return load_settings(base)


def load(tmp_path, **env):
    """load_dataset with the values the job passes for these settings."""
    s = settings(tmp_path, **env)
    return load_dataset(
        s.dataset, s.data_dir, s.resolved_image_size, s.conditional, s.bad_images == "skip"
    )


@pytest.mark.parametrize(
    "dataset,sub,gz",
    [("mnist", "MNIST/raw", True), ("kmnist", "KMNIST/raw", False), ("fashion-mnist", "", True)],
)
def test_idx_datasets_load_from_the_data_dir(tmp_path, dataset, sub, gz):
    write_idx(tmp_path / sub, n=50, gz=gz)
    data = load(tmp_path, dataset=dataset, conditional="true")
    assert data.images.shape == (50, 1, 28, 28) and data.images.dtype == torch.uint8
    assert data.num_classes == 10 and data.labels[:3].tolist() == [0, 1, 2]


def test_idx_images_are_resized_to_the_requested_size(tmp_path):
    write_idx(tmp_path, n=20)
    data = load(tmp_path, dataset="mnist", image_size=32)
    assert data.images.shape == (20, 1, 32, 32) and data.num_classes == 0


def test_missing_idx_files_say_where_to_put_which_files(tmp_path):
    with pytest.raises(DataError) as info:
        load(tmp_path, dataset="kmnist")
    msg = str(info.value)
    assert "train-images-idx3-ubyte[.gz]" in msg and str(tmp_path) in msg


def test_idx_with_wrong_magic_number_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34\x08\x03" + bytes(16))
    with pytest.raises(DataError, match="wrong magic number"):
        read_idx(path)


def test_truncated_idx_is_refused_with_its_sizes(tmp_path):
    write_idx(tmp_path, n=10, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="size mismatch"):
        read_idx(path)


def test_truncated_gzip_idx_is_refused(tmp_path):
    write_idx(tmp_path, n=10)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


def test_cifar10_reads_the_python_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        batch = {"data": np.full((4, 3072), i, dtype=np.uint8), "labels": [0, 1, 2, i]}
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    data = load(tmp_path, dataset="cifar10", conditional="true")
    assert data.images.shape == (20, 3, 32, 32) and data.channels == 3
    assert data.num_classes == 10 and int(data.images[-1].max()) == 5


def test_image_folder_resizes_crops_and_labels_by_subfolder(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    data = load(tmp_path, dataset=f"folder:{root}", conditional="true", image_size=16, model="mlp")
    assert data.num_classes == 3 and len(data) == 6
    image, label, unreadable = data.folder[5]
    assert image.shape == (3, 16, 16) and image.dtype == torch.uint8 and label == 2
    assert unreadable == []


def test_16_bit_and_float_images_are_scaled_to_8_bits_by_their_own_range(tmp_path):
    """16-bit PNGs and TIFFs (I;16, I;16B) by their bit depth, float TIFFs from [0, 1]."""
    root = tmp_path / "wide"
    root.mkdir()
    expected = {}
    for name, value, dtype, grey in [
        ("mid16.png", 32768, "<u2", 128), ("white16.tif", 65535, ">u2", 255),
        ("dark16.png", 4096, "<u2", 16), ("mid.tif", 0.5, "float32", 128),
        ("quarter.tif", 0.25, "float32", 64), ("above.tif", 1.5, "float32", 255),
        ("below.tif", -0.25, "float32", 0),
    ]:  # fmt: skip
        Image.fromarray(np.full((8, 8), value, dtype=dtype)).save(root / name)
        expected[root / name] = grey
    data = load(tmp_path, dataset=f"folder:{root}", image_size=8, model="mlp")
    for i, path in enumerate(data.folder.files):
        image, _ = data.folder.load(i)
        assert image.shape == (3, 8, 8) and image.unique().tolist() == [expected[path]], path


def test_empty_image_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load(tmp_path, dataset=f"folder:{tmp_path / 'empty'}")


def test_conditional_folder_without_class_subfolders_is_refused(tmp_path):
    write_image_folder(tmp_path / "flat", classes=("only",))
    with pytest.raises(DataError, match="one subfolder per class"):
        load(tmp_path, dataset=f"folder:{tmp_path / 'flat'}", conditional="true")


def _idx_data(tmp_path, n=64):
    write_idx(tmp_path, n=n)
    return load(tmp_path, dataset="mnist", conditional="true")


def test_ranks_see_disjoint_shards_of_each_epoch(tmp_path):
    data = _idx_data(tmp_path)
    cpu = torch.device("cpu")
    seen = []
    for rank in range(2):
        src = BatchSource(data, 8, seed=3, device=cpu, rank=rank, world_size=2)
        seen.append({tuple(x.flatten()[:40].tolist()) for _ in range(4) for x in src.next()[0]})
    assert len(seen[0]) == 32 and len(seen[1]) == 32 and not seen[0] & seen[1]


def test_data_position_resumes_under_another_world_size(tmp_path):
    data = _idx_data(tmp_path)
    cpu = torch.device("cpu")
    two = BatchSource(data, 8, seed=3, device=cpu, rank=0, world_size=2)
    for _ in range(2):
        two.next()
    one = BatchSource(data, 8, seed=3, device=cpu)
    one.load_state_dict(two.state_dict())
    assert one.state_dict() == {"epoch": 0, "images_consumed": 32}
    one.next()
    assert one.state_dict()["images_consumed"] == 40


def test_batches_are_scaled_to_minus_one_one_and_epochs_advance(tmp_path):
    data = _idx_data(tmp_path, n=32)
    src = BatchSource(data, 16, seed=0, device=torch.device("cpu"))
    for _ in range(3):
        x, y = src.next()
    assert x.min() >= -1 and x.max() <= 1 and x.max() == 1
    assert src.position.epoch == 1 and y.dtype == torch.int64


def test_too_small_dataset_for_one_batch_is_a_clear_error(tmp_path):
    data = _idx_data(tmp_path, n=10)
    with pytest.raises(DataError, match="fewer than one batch"):
        BatchSource(data, 16, seed=0, device=torch.device("cpu"))


def test_idx_header_with_wrong_dimensions(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 8, 1, 3) + b"abc"
    )
    write_idx(tmp_path / "x", n=3)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 8, 1, 3) + b"\0\1\2"
    )
    with pytest.raises(DataError, match="expected N x H x W"):
        load(tmp_path, dataset="mnist")


def test_idx_labels_outside_the_classes_are_refused_naming_file_and_range(tmp_path):
    write_idx(tmp_path, n=20, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:8] + bytes([200] * 20))
    for conditional in ("true", "false"):
        with pytest.raises(DataError) as info:
            load(tmp_path, dataset="mnist", conditional=conditional)
        assert str(info.value) == (
            f"{labels}: labels 200 outside the dataset's classes: expected 0..9"
        )
        assert info.value.exit_code == 3


def test_labels_of_other_data_must_number_its_classes(tmp_path):
    write_idx(tmp_path, n=20, gz=False, classes=1)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:8] + bytes([0, 3] * 10))
    with pytest.raises(DataError, match=r"but 2 of 0\.\.3 have no image: 1, 2"):
        load_idx_dataset("s3", tmp_path, conditional=True)
    assert load_idx_dataset("s3", tmp_path, conditional=False).num_classes == 0


def truncated_png(path):
    """A PNG whose header is fine and whose pixels are cut off: found only when decoded."""
    pixels = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[:1000])


def test_files_that_are_no_images_do_not_count_as_images(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=6)
    (root / "a" / "garbage.png").write_bytes(b"not a PNG at all" * 20)
    (root / "a" / "empty.png").write_bytes(b"")
    data = load(tmp_path, dataset=f"folder:{root}", image_size=16, model="mlp")
    assert len(data) == 6 and data.folder.skipped == 2


def test_a_corrupt_image_is_warned_about_and_counted_once(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=16)
    for i in range(4):
        truncated_png(root / "a" / f"bad{i}.png")
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=16,
                  GAN_BATCH_SIZE=8, GAN_MAX_STEPS=15, GAN_LOG_EVERY=15, GAN_NUM_WORKERS=2)  # fmt: skip
    result = run_job(env)  # 15 steps of 8 over 20 files: every file drawn 6 times
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if "skipping" in line]
    assert len(warnings) == 4 and all("bad" in w and "truncated" in w for w in warnings)
    (record,) = [json.loads(r) for r in (tmp_path / "runs/imgs-mlp/metrics.jsonl").open()]
    assert record["skipped_images"] == 4


def test_bad_images_fail_mode_names_the_file_in_one_line(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=16)
    truncated_png(root / "a" / "bad.png")
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=16,
                  GAN_BATCH_SIZE=8, GAN_MAX_STEPS=10, GAN_NUM_WORKERS=2, GAN_BAD_IMAGES="fail")  # fmt: skip
    result = run_job(env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    error = [line for line in result.stdout.splitlines() if " ERROR " in line]
    assert len(error) == 1 and f"{root / 'a' / 'bad.png'}: unreadable image (" in error[0]
    assert "set GAN_BAD_IMAGES=skip" in error[0]


def test_fid_records_the_real_images_it_used(tmp_path):
    write_idx(tmp_path / "data", n=64)
    extractor = write_extractor(tmp_path / "features.pt", channels=1)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=2, GAN_FID_FEATURES=extractor,
                  GAN_FID_NUM_SAMPLES=100, GAN_FID_EVERY=1)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(r) for r in (tmp_path / "runs/mnist-dcgan/eval.jsonl").open()]
    assert [(r["num_samples"], r["num_real"]) for r in rows] == [(100, 64), (100, 64)]
    assert result.stdout.count("real statistics from all 64 images of the dataset") == 1


def bomb_png(path: Path, side: int = 30000) -> Path:
    """A PNG header of side x side 8-bit gray pixels (900 megapixels for 30,000): PIL refuses
    it at open, before decoding, with DecompressionBombError."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + header + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )
    return path


def test_a_decompression_bomb_is_a_bad_image_skipped_and_counted(tmp_path):
    root = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=6)
    bomb_png(root / "a" / "huge.png")
    data = load(tmp_path, dataset=f"folder:{root}", image_size=16, model="mlp")
    assert len(data) == 6 and data.folder.skipped == 1


def test_a_decompression_bomb_fails_a_run_with_exit_3_naming_it(tmp_path):
    """Once a DecompressionBombError traceback, exit 1."""
    root = write_image_folder(tmp_path / "imgs", classes=("a",), per_class=16)
    bomb = bomb_png(root / "a" / "huge.png")
    env = job_env(tmp_path, GAN_DATASET=f"folder:{root}", GAN_MODEL="mlp", GAN_IMAGE_SIZE=16,
                  GAN_BATCH_SIZE=8, GAN_MAX_STEPS=10, GAN_BAD_IMAGES="fail")  # fmt: skip
    result = run_job(env)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert f"{bomb}: unreadable image (Image size (900000000 pixels) exceeds limit" in result.stdout
    assert "set GAN_BAD_IMAGES=skip" in result.stdout
