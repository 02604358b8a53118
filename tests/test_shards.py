"""Sharded streaming (job/data/shards.py) against a real SeaweedFS: `gan-job shard`, the epoch order,
exact resume, resume under another world size, the bounded cache and storage failures.

The dataset: 307 MNIST-like images in 31 shards of 10 (the last holds 7).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from s3server import SeaweedS3, use_server

from job.__main__ import main as job_main
from job.data.datasets import load_dataset
from job.data.shards import INDEX, ShardSource, open_shards, read_index, shard_order
from job.data.source import real_images
from job.infra import errors
from job.infra.errors import DataError, SettingsError
from job.infra.s3_store import S3Store
from job.infra.stores import open_store
from job.settings import load_settings
from tests.helpers import REPO, run_job, write_idx
from tests.test_faults import job_running, wait_for_line
from tests.test_s3_job import s3_job_env

N, SHARD = 307, 10
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sharded(s3, tmp_path_factory) -> dict:
    """The dataset as IDX files and as shards in a bucket of its own, written by `gan-job shard`."""
    tmp = tmp_path_factory.mktemp("shards")
    write_idx(tmp / "data", n=N)
    bucket = s3.create_bucket(f"shards-{uuid.uuid4().hex[:12]}")
    uri = f"s3://{bucket}/mnist"
    with pytest.MonkeyPatch.context() as mp:
        use_server(mp, s3, tmp)
        args = ["shard", "mnist", uri, "--shard-size", str(SHARD), "--data-dir", str(tmp / "data")]
        assert job_main(args) == 0
    return {"tmp": tmp, "bucket": bucket, "uri": uri, "dataset": f"shards:{uri}"}


def source(sharded, cache: Path, rank: int = 0, world: int = 1, batch: int = 16, mb: float = 64):
    data = open_shards(sharded["dataset"], None, True, "dcgan", cache, mb, rank=rank)
    return ShardSource(data, batch, seed=3, device=CPU, rank=rank, world_size=world)


def take(src: ShardSource, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [src.next() for _ in range(steps)]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b, strict=True)
    )


# ---------------------------------------------------------------- writing and reading shards


class RecordingStore(S3Store):
    """The real S3 store, noting the order in which keys are stored."""

    def __init__(self, uri: str):
        bucket, prefix = uri.removeprefix("s3://").split("/", 1)
        super().__init__(bucket, prefix)
        self.stored: list[str] = []

    def put_bytes(self, key, data):
        super().put_bytes(key, data)
        self.stored.append(key)

    def put_file(self, key, path):
        super().put_file(key, path)
        self.stored.append(key)


def test_shards_hold_every_image_and_label_once_and_the_index_is_written_last(
    s3_env, sharded, tmp_path
):
    from job.tools.shard import write_shards

    data = load_dataset("mnist", sharded["tmp"] / "data", 28)
    store = RecordingStore(f"s3://{sharded['bucket']}/again")
    index = write_shards(data, store, SHARD, "mnist")
    assert store.stored[-1] == INDEX and len(store.stored) == 32
    assert [s.count for s in index.shards] == [10] * 30 + [7]
    assert (index.count, index.channels, index.image_size, index.num_classes) == (N, 1, 28, 10)

    # one process, one batch of every image per epoch: each image once, with its label
    src = source(sharded, tmp_path / "cache", batch=N)
    expected = sorted((data.images[i].numpy().tobytes(), int(data.labels[i])) for i in range(N))
    epochs = []
    for _ in range(2):
        images, labels = src.next()
        assert images.shape == (N, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
        raw = ((images + 1) * 127.5).round().to(torch.uint8)
        epochs.append([(raw[i].numpy().tobytes(), int(labels[i])) for i in range(N)])
        assert sorted(epochs[-1]) == expected
    assert epochs[0] != epochs[1]  # reshuffled: shards and the samples in each
    assert src.position.epoch == 1

    # two processes: disjoint shards that together are all of them
    order = shard_order(len(index.shards), 3, 0)
    ranks = [source(sharded, tmp_path / "cache2", r, 2).rank_shards(0) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(31)) and ranks[0] == order[0::2]


def test_fid_real_images_and_another_image_size_come_from_the_shards(s3_env, sharded, tmp_path):
    data = open_shards(sharded["dataset"], 32, False, "dcgan", tmp_path, 64)
    assert (len(data), data.image_size, data.channels, data.num_classes) == (N, 32, 1, 0)
    images, labels = real_images(data, 25, seed=1)
    assert images.shape == (25, 1, 32, 32) and images.dtype == torch.uint8 and len(labels) == 25
    assert torch.equal(real_images(data, 25, seed=1)[0], images)
    assert len(real_images(data, 1000, seed=1)[0]) == N  # all there are
    batch, _ = ShardSource(data, 8, seed=0, device=CPU).next()
    assert batch.shape == (8, 1, 32, 32)


# ---------------------------------------------------------------- resume


def test_resume_mid_epoch_continues_the_exact_order_without_downloading_skipped_shards(
    s3_env, sharded, tmp_path
):
    straight = source(sharded, tmp_path / "a")
    steps = straight.batches_per_epoch  # 307 // 16 = 19
    expected = take(straight, steps + 5)  # into the next epoch

    first = source(sharded, tmp_path / "b")
    assert same(take(first, 11), expected[:11])
    state = first.state_dict()
    assert state == {"epoch": 0, "images_consumed": 11 * 16}

    resumed = source(sharded, tmp_path / "c")  # an empty cache: what it downloads shows
    resumed.load_state_dict(state)
    assert same(take(resumed, steps - 11), expected[11:steps])
    # 176 images consumed: the first 17 shards of the epoch (170 images) were not downloaded,
    # the rest of the epoch's were, and the next epoch's first was fetched ahead
    order, following = resumed.rank_shards(0), resumed.rank_shards(1)[0]
    allowed = {f"shard-{i:06d}.tar" for i in [*order[17:], following]}
    downloaded = {p.name for p in (tmp_path / "c" / "rank-0").glob("shard-*.tar")}
    assert f"shard-{order[17]:06d}.tar" in downloaded and downloaded <= allowed
    assert same(take(resumed, 5), expected[steps:])


def test_resume_under_another_world_size_continues_the_epoch_and_then_runs_as_a_fresh_run(
    s3_env, sharded, tmp_path
):
    pair = [source(sharded, tmp_path / "two", r, 2) for r in (0, 1)]
    steps2 = pair[0].batches_per_epoch
    for src in pair:
        take(src, 5)
    state = pair[0].state_dict()
    assert state == pair[1].state_dict() == {"epoch": 0, "images_consumed": 5 * 16 * 2}

    one = source(sharded, tmp_path / "one")
    one.load_state_dict(state)
    fresh = source(sharded, tmp_path / "fresh")
    steps1 = fresh.batches_per_epoch
    assert steps1 == 19 and steps2 < steps1
    expected = take(fresh, 2 * steps1)
    assert one.position.batch_index == 10  # 160 images consumed = 10 steps of one process
    assert same(take(one, steps1 - 10), expected[10:steps1])  # the rest of epoch 0, as at W=1
    assert same(take(one, steps1), expected[steps1:])  # epoch 1: exactly a fresh run's
    assert one.position.epoch == 1


# ---------------------------------------------------------------- the cache


def test_the_cache_folder_never_exceeds_its_bound(s3_env, sharded, tmp_path):
    index = read_index(open_store(sharded["uri"]))
    largest = max(s.bytes for s in index.shards)
    bound_mb = 2.5 * largest / 2**20  # two shards and a half: one read, one fetched ahead
    src = source(sharded, tmp_path / "cache", mb=bound_mb)
    folder = tmp_path / "cache" / "rank-0"
    peak, done = 0, threading.Event()

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            try:
                size = sum(p.stat().st_size for p in folder.iterdir())
            except FileNotFoundError:  # a file renamed or deleted while listed
                continue
            peak = max(peak, size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        take(src, 2 * src.batches_per_epoch)  # every shard, twice
    finally:
        done.set()
        watcher.join()
    assert src.shards.cache.downloads > len(index.shards)  # shards were evicted and fetched again
    assert 0 < peak <= bound_mb * 2**20
    assert src.stats()["data_cache_bytes"] <= bound_mb * 2**20


def test_a_cache_smaller_than_a_shard_is_a_settings_error(s3_env, sharded, tmp_path):
    with pytest.raises(SettingsError, match=r"GAN_SHARD_CACHE_MB=0.001: expected at least"):
        source(sharded, tmp_path / "cache", mb=0.001)


# ---------------------------------------------------------------- bad inputs


def test_a_prefix_without_an_index_is_no_dataset(s3_env, sharded, tmp_path):
    uri = f"s3://{sharded['bucket']}/nothing-here"
    with pytest.raises(DataError, match=f"{uri}: no index.json, so not a shards dataset"):
        open_shards(f"shards:{uri}", None, False, "dcgan", tmp_path, 64)
    assert errors.DataError.exit_code == errors.EXIT_DATA


@pytest.mark.parametrize(
    "args,message",
    [
        (["--shard-size", "0"], "--shard-size 0: expected an integer from 1 to"),
        (["--image-size", "big"], "--image-size big: expected an integer from 8 to 512"),
        (["--frobnicate"], "--frobnicate: unknown argument"),
    ],
)
def test_bad_shard_arguments_exit_2_naming_them(s3_env, sharded, args, message, caplog):
    assert job_main(["shard", "mnist", sharded["uri"] + "-x", *args]) == errors.EXIT_SETTINGS
    assert message in caplog.text


def test_shard_refuses_a_bad_destination_and_an_existing_index_without_force(
    s3_env, sharded, caplog
):
    assert job_main(["shard", "mnist", "/tmp/out"]) == errors.EXIT_SETTINGS
    assert "DEST '/tmp/out': expected s3://bucket/prefix" in caplog.text
    data_dir = str(sharded["tmp"] / "data")
    assert job_main(["shard", "mnist", sharded["uri"], "--data-dir", data_dir]) == 2
    assert "already holds a shards dataset (index.json): add --force" in caplog.text


@pytest.mark.parametrize(
    "dataset,ok",
    [
        ("shards:s3://bucket/prefix", True),
        ("shards:s3://Bad_Bucket/prefix", False),
        ("shards:/local/folder", False),
    ],
)
def test_the_dataset_setting_takes_shards_in_s3(dataset, ok):
    if ok:
        settings = load_settings({"GAN_DATASET": dataset})
        assert settings.dataset_kind == "shards" and settings.resolved_run_id == "prefix-dcgan"
    else:
        with pytest.raises(SettingsError, match="GAN_DATASET="):
            load_settings({"GAN_DATASET": dataset})


# ---------------------------------------------------------------- the job


def shards_env(tmp: Path, s3, sharded, run_id: str, **settings) -> dict[str, str]:
    return s3_job_env(
        tmp, s3, GAN_DATASET=sharded["dataset"], GAN_ARTIFACT_URI=str(tmp / "runs"),
        GAN_RUN_ID=run_id, GAN_SHARD_CACHE_DIR=str(tmp / f"cache-{run_id}"), GAN_SEED=3,
        **settings,
    )  # fmt: skip


def load_state(tmp: Path, run_id: str, step: int) -> dict:
    path = tmp / "runs" / run_id / f"checkpoints/step-{step:08d}/state.pt"
    return torch.load(path, weights_only=False)


def test_a_job_stopped_mid_epoch_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(
    s3, sharded, tmp_path
):
    """The stop: the uninterrupted run's own checkpoint of step 11, resumed as another run."""
    straight = shards_env(tmp_path, s3, sharded, "straight", GAN_MAX_STEPS=25,
                          GAN_CHECKPOINT_EVERY=11, GAN_CONDITIONAL="true")  # fmt: skip
    result = run_job(straight, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    start = result.stdout.split("starting")[1]
    assert f"data: {sharded['dataset']} from {sharded['uri']} (31 shards): 307 images" in start
    record = json.loads((tmp_path / "runs/straight/metrics.jsonl").read_text().splitlines()[-1])
    assert record["data_images_per_s"] > 0 and record["data_downloaded_bytes"] > 0

    stopped = tmp_path / "runs/straight/checkpoints/step-00000011"
    resumed = dict(straight, GAN_RUN_ID="split", GAN_RESUME=str(stopped),
                   GAN_SHARD_CACHE_DIR=str(tmp_path / "cache-resumed"))  # fmt: skip
    result = run_job(resumed, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step 11" in result.stdout
    a, b = load_state(tmp_path, "straight", 25), load_state(tmp_path, "split", 25)
    assert a["data"] == b["data"] == {"epoch": 1, "images_consumed": 6 * 16}
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"


def test_a_checkpoint_of_two_processes_resumes_in_one_at_the_same_images_consumed(
    s3, sharded, tmp_path
):
    two = shards_env(tmp_path, s3, sharded, "w", GAN_MAX_STEPS=6, GAN_CHECKPOINT_EVERY=6,
                     GAN_NPROC_PER_NODE=2, GAN_DEVICE="cpu")  # fmt: skip
    result = run_job(two, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    assert load_state(tmp_path, "w", 6)["data"] == {"epoch": 0, "images_consumed": 6 * 16 * 2}
    assert {p.name for p in (tmp_path / "cache-w").iterdir()} == {"rank-0", "rank-1"}

    # one process: 192 images consumed = its step 12 of 19 in epoch 0; 7 steps end the
    # epoch, 7 more are epoch 1's first (a restart of the epoch would be at its step 14)
    # (told to train on 16 images a step: it would keep the checkpoint's global batch of 32)
    one = dict(two, GAN_MAX_STEPS="20", GAN_NPROC_PER_NODE="1", GAN_GLOBAL_BATCH_SIZE="16")
    result = run_job(one, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed from step 6" in result.stdout
    assert load_state(tmp_path, "w", 20)["data"] == {"epoch": 1, "images_consumed": 7 * 16}


def test_a_full_disk_under_the_shard_cache_exits_8_naming_the_folder(s3, sharded, tmp_path):
    """GAN_SHARD_CACHE_MB larger than the disk has free: the cache fills a 64 KiB tmpfs (the
    shards are 250 KB) inside the job's own namespace."""
    cache = tmp_path / "cache-full"  # shards_env's GAN_SHARD_CACHE_DIR
    cache.mkdir()
    env = shards_env(tmp_path, s3, sharded, "full", GAN_MAX_STEPS=100, GAN_SHARD_CACHE_MB=64)
    script = f'mount -t tmpfs -o size=64k tmpfs "{cache}" || exit 99; "{sys.executable}" -m job'
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=180)  # fmt: skip
    assert result.returncode == errors.EXIT_DISK_FULL, result.stdout + result.stderr
    assert f"{cache}/rank-0: no space left for shard " in result.stdout
    assert "GAN_SHARD_CACHE_MB=64 is more than the disk has free" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_storage_gone_while_streaming_exits_4_naming_the_shard(tmp_path, monkeypatch):
    server = SeaweedS3(tmp_path / "weed")
    server.start()
    try:
        bucket = server.create_bucket(f"down-{uuid.uuid4().hex[:8]}")
        write_idx(tmp_path / "data", n=200)
        use_server(monkeypatch, server, tmp_path)
        uri = f"s3://{bucket}/d"
        assert job_main(["shard", "mnist", uri, "--shard-size", "10",
                         "--data-dir", str(tmp_path / "data")]) == 0  # fmt: skip
        env = shards_env(tmp_path, server, {"dataset": f"shards:{uri}"}, "down",
                         GAN_MAX_STEPS=100000, GAN_CHECKPOINT_EVERY=100000, GAN_LOG_EVERY=5,
                         GAN_SHARD_CACHE_MB=0.03)  # fmt: skip
        env["AWS_MAX_ATTEMPTS"] = "1"  # botocore's own retries short: the job's outer retry shows
        log_path = tmp_path / "job.log"
        with job_running(env, log_path) as proc:
            wait_for_line(log_path, "step 10/", proc)
            server.stop()
            down = time.monotonic()
            code = proc.wait(timeout=60)
    finally:
        server.stop()
    log = log_path.read_text()
    assert code == errors.EXIT_STORAGE, log
    assert time.monotonic() - down < 30, log
    message = log.strip().splitlines()[-1]
    assert f"shard {uri}/shard-0000" in message and "download failed 3 times" in message, log
    assert "cannot reach endpoint" in message and "Traceback" not in log
    assert server.secret_key not in log
