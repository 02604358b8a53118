"""Datasets larger than a node's disk: WebDataset tar shards in S3, streamed through a bounded
local cache.

A shards dataset is `shard-000000.tar`... (each sample KEY.png, uint8 in the source's channels,
and KEY.cls, its label) and `index.json`, which `gan-job shard` (job/tools/shard.py) writes
last: a prefix without one is not a dataset. GAN_DATASET=shards:s3://bucket/prefix trains from
them with ShardSource, which keeps BatchSource's interface and its position (epoch, images
consumed by all ranks), and a per-epoch order that is a pure function of (seed, epoch, world
size, rank): see docs/data.md.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from webdataset import autodecode, tariterators

from job.data.datasets import ImageData, resize_images
from job.data.naming import SHARDS_PREFIX
from job.data.source import Position
from job.infra.errors import DataError, DiskFullError, SettingsError, StorageError
from job.infra.store import MiB, Store
from job.infra.stores import open_store

log = logging.getLogger(__name__)

INDEX = "index.json"
FORMAT = 1
DOWNLOAD_ATTEMPTS = 3  # each one is botocore's own retried request (AWS_MAX_ATTEMPTS)
RETRY_SECONDS = 1.0  # first wait between attempts, doubled each time


# ---------------------------------------------------------------- the index


@dataclass
class Shard:
    name: str
    count: int  # samples
    bytes: int


@dataclass
class ShardIndex:
    """index.json: what the shards under a prefix hold, readable without opening any shard."""

    dataset: str
    image_size: int
    channels: int
    num_classes: int  # classes a conditional model gets: 0..num_classes-1
    classes: int  # distinct labels found
    count: int
    shards: list[Shard]
    format: int = FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> ShardIndex:
        try:
            fields = json.loads(raw)
            if fields.get("format") != FORMAT:
                raise ValueError(f"format {fields.get('format')!r}, expected {FORMAT}")
            shards = [Shard(**s) for s in fields.pop("shards")]
            index = cls(**fields, shards=shards)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise DataError(f"{where}/{INDEX}: not a gan-job shard index ({exc})") from exc
        if not shards or sum(s.count for s in shards) != index.count:
            raise DataError(f"{where}/{INDEX}: the shards' counts do not add up to {index.count}")
        return index


def read_index(store: Store) -> ShardIndex:
    """The index of the shards under store; DataError (exit 3) naming the prefix without one."""
    try:
        raw = store.get_bytes(INDEX)
    except FileNotFoundError:
        raise DataError(
            f"{store.uri}: no {INDEX}, so not a shards dataset (write one with "
            f"`gan-job shard SOURCE {store.uri}`; {INDEX} is written last)"
        ) from None
    return ShardIndex.from_json(raw, store.uri)


def shards_uri(dataset: str) -> str:
    """s3://bucket/prefix of GAN_DATASET=shards:s3://bucket/prefix."""
    return dataset.removeprefix(SHARDS_PREFIX).rstrip("/")


# ---------------------------------------------------------------- the bounded cache


class ShardCache:
    """Shards downloaded from the store into a local folder, never more than max_bytes.

    One download thread fetches shards on demand (get) and ahead of need (prefetch). Each
    download goes to a temporary file renamed into place, so a half-downloaded shard is never
    read; before it, the least recently used shards are deleted until the new one fits. A
    prefetch that does not fit without evicting the shard just asked for is not made.
    """

    def __init__(self, store: Store, index: ShardIndex, folder: Path, max_bytes: int):
        self.store, self.folder, self.max_bytes = store, Path(folder), max_bytes
        self.sizes = {s.name: s.bytes for s in index.shards}
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: OrderedDict[str, int] = OrderedDict()  # name -> bytes, least recent first
        self._adopt_existing()
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-download")
        self.downloaded_bytes, self.download_seconds, self.downloads = 0, 0.0, 0

    def _adopt_existing(self) -> None:
        """Shards of an earlier run in this folder are kept if complete; anything else goes."""
        found = sorted(self.folder.iterdir(), key=lambda p: p.stat().st_mtime)
        for path in found:
            if path.is_file() and self.sizes.get(path.name) == path.stat().st_size:
                self.files[path.name] = path.stat().st_size
            elif path.is_file():
                path.unlink()
        self._evict(0, keep=None)

    @property
    def used_bytes(self) -> int:
        return sum(self.files.values())

    def get(self, name: str) -> Path:
        """The local path of shard name: cached, fetched ahead, or downloaded now."""
        with self._lock:
            future = self._futures.pop(name, None)
        if future is not None:
            future.result()  # a prefetch that failed or did not fit left nothing: see below
        with self._lock:
            cached = name in self.files
        if not cached:
            self._pool.submit(self._download, name, True).result()
        with self._lock:
            self.files.move_to_end(name)
        return self.folder / name

    def prefetch(self, name: str) -> None:
        with self._lock:
            if name in self._futures or name in self.files:
                return
            self._futures[name] = self._pool.submit(self._download, name, False)

    def _download(self, name: str, needed: bool) -> Path | None:
        """In the download thread. needed: retried, and a failure raises; a prefetch gives up
        quietly (the get() that follows tries again)."""
        path = self.folder / name
        with self._lock:
            if name in self.files:
                return path
            if not self._evict(self.sizes[name], keep=None if needed else "newest"):
                return None
        delay = RETRY_SECONDS
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            started = time.monotonic()
            try:
                self.store.get_file(name, path)  # a temporary file renamed into place
            except FileNotFoundError:
                raise DataError(
                    f"{self.store.uri}/{name}: listed in {INDEX} but not in the store"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    raise DiskFullError(
                        f"{self.folder}: no space left for shard {name} (GAN_SHARD_CACHE_MB="
                        f"{self.max_bytes / MiB:g} is more than the disk has free)"
                    ) from exc
                raise
            except StorageError as exc:
                if not needed:
                    log.info("prefetch of %s failed: %s", name, exc)
                    return None
                if attempt == DOWNLOAD_ATTEMPTS:
                    cause = str(exc).rpartition(f"{name!r} failed: ")[2]
                    raise StorageError(
                        f"shard {self.store.uri}/{name}: download failed {attempt} times: {cause}"
                    ) from exc
                log.warning("shard %s: download failed, retrying in %.0f s: %s", name, delay, exc)
                time.sleep(delay)
                delay *= 2
                continue
            with self._lock:
                self.files[name] = path.stat().st_size
                self.downloaded_bytes += self.files[name]
                self.download_seconds += time.monotonic() - started
                self.downloads += 1
            return path
        return None

    def _evict(self, incoming: int, keep: str | None) -> bool:
        """Delete least recently used shards until incoming bytes fit; keep="newest" spares the
        most recent one (the shard being read next). False when that is not enough."""
        candidates = list(self.files)
        if keep == "newest" and candidates:
            candidates = candidates[:-1]
        spare = self.used_bytes - sum(self.files[n] for n in candidates)
        if spare + incoming > self.max_bytes:
            return False
        for name in candidates:
            if self.used_bytes + incoming <= self.max_bytes:
                break
            (self.folder / name).unlink(missing_ok=True)
            del self.files[name]
        return self.used_bytes + incoming <= self.max_bytes


def read_shard(path: Path, channels: int) -> list[tuple[torch.Tensor, int]]:
    """(uint8 C x H x W image, label) of every sample of a local shard, in file order, read and
    decoded by WebDataset's tar iterator and decoder."""
    decode = autodecode.Decoder(
        [autodecode.imagehandler("torchl8" if channels == 1 else "torchrgb8")]
    )
    out = []
    for sample in tariterators.tarfile_samples([{"url": str(path)}]):
        sample = decode(sample)
        image = sample["png"]
        out.append((image.unsqueeze(0) if image.ndim == 2 else image, int(sample["cls"])))
    return out


# ---------------------------------------------------------------- the dataset and its order


class ShardSet:
    """A shards dataset as the job sees it: the index, the store, this process's cache."""

    def __init__(self, store: Store, index: ShardIndex, cache: ShardCache, image_size: int):
        self.store, self.index, self.cache = store, index, cache
        self.image_size = image_size  # what training asks for; the shards hold index.image_size

    def read(self, i: int) -> list[tuple[torch.Tensor, int]]:
        shard = self.index.shards[i]
        samples = read_shard(self.cache.get(shard.name), self.index.channels)
        if len(samples) != shard.count:
            raise DataError(
                f"{self.store.uri}/{shard.name}: {len(samples)} samples, {INDEX} says {shard.count}"
            )
        return samples

    def real_images(self, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """num images (or all) of the shards, for FID: whole shards in a seeded order."""
        images, labels = [], []
        for i in torch.randperm(len(self.index.shards), generator=_generator(seed)).tolist():
            if len(images) >= num:
                break
            for image, label in self.read(i)[: num - len(images)]:
                images.append(image)
                labels.append(label)
        return resize_images(torch.stack(images), self.image_size), torch.tensor(labels)


def open_shards(
    dataset: str,
    image_size: int | None,
    conditional: bool,
    model: str,
    cache_dir: str | Path,
    cache_mb: float,
    endpoint_url: str | None = None,
    rank: int = 0,
) -> ImageData:
    """GAN_DATASET=shards:s3://bucket/prefix: its index (nothing else is downloaded here), and a
    cache of at most cache_mb MB in cache_dir/rank-<rank>."""
    store = open_store(shards_uri(dataset), endpoint_url)
    index = read_index(store)
    largest = max(index.shards, key=lambda s: s.bytes)
    max_bytes = int(cache_mb * MiB)
    if largest.bytes > max_bytes:
        raise SettingsError(
            [
                f"GAN_SHARD_CACHE_MB={cache_mb:g}: expected at least the largest shard's size, "
                f"{largest.bytes / MiB:.3f} MB ({store.uri}/{largest.name}); twice that to "
                "download the next shard while one is read"
            ]
        )
    size = image_size or index.image_size
    if model == "dcgan" and size not in (28, 32, 64):
        raise DataError(
            f"{store.uri}: its images are {index.image_size} px, not supported by "
            "GAN_MODEL=dcgan: set GAN_IMAGE_SIZE to 28, 32 or 64"
        )
    if model == "r3gan" and size not in (16, 28, 32, 64, 128, 256):
        raise DataError(
            f"{store.uri}: its images are {index.image_size} px, not supported by "
            "GAN_MODEL=r3gan: set GAN_IMAGE_SIZE to 16, 28, 32, 64, 128 or 256"
        )
    if conditional and index.num_classes < 2:
        raise DataError(f"GAN_CONDITIONAL=true: {dataset} has fewer than 2 classes")
    cache = ShardCache(store, index, Path(cache_dir) / f"rank-{rank}", max_bytes)
    data = ImageData(
        name=dataset,
        channels=index.channels,
        image_size=size,
        num_classes=index.num_classes if conditional else 0,
        labels=torch.zeros(0, dtype=torch.int64),
        source=f"{store.uri} ({len(index.shards)} shards)",
    )
    data.shards = ShardSet(store, index, cache, size)
    return data


def default_cache_dir(data_dir: str | Path, dataset: str, run_id: str) -> Path:
    """GAN_DATA_DIR/shards/<bucket>/<prefix>/<run id>: a restart finds its shards again, and
    two runs on one node do not evict each other's."""
    return Path(data_dir) / "shards" / shards_uri(dataset).removeprefix("s3://") / run_id


def _generator(*parts: int) -> torch.Generator:
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63)
    return torch.Generator().manual_seed(seed)


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """The epoch's order of the shards, the same on every rank; rank r of W takes r, r+W, ..."""
    return torch.randperm(num_shards, generator=_generator(seed, epoch)).tolist()


def sample_order(count: int, seed: int, epoch: int, shard: int) -> list[int]:
    return torch.randperm(count, generator=_generator(seed, epoch, shard + 1)).tolist()


class ShardSource:
    """BatchSource's interface over a shards dataset: endless batches of (images in [-1, 1] on
    the device, labels), epoch after epoch, each rank reading its own shards.

    Epoch e: the shards in shard_order(seed, e); rank r of W takes every W-th from r; each
    shard's samples in sample_order(seed, e, shard); the rank's stream is those, shard after
    shard, cut into batches. Every rank takes steps_per_epoch(e) steps: the fewest whole batches
    any rank's shards hold (computed from the index), so ranks stay in lockstep; the rest of
    a rank's images that epoch are not used. Position: (epoch, images consumed by all ranks).
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.data, self.shards, self.index = data, data.shards, data.shards.index
        self.batch_size, self.seed, self.device = batch_size, seed, device
        self.rank, self.world_size = rank, world_size
        if len(self.index.shards) < world_size:
            raise DataError(
                f"{data.name}: {len(self.index.shards)} shards for {world_size} processes: "
                "write more, smaller shards (gan-job shard --shard-size)"
            )
        self.position = Position(batch_size * world_size)
        self._iter = None
        self._steps: dict[int, int] = {}
        self.steps_per_epoch(0)  # fails now if the shards are too small for a batch
        self.delivered, self.busy_seconds = 0, 0.0  # since the last stats()

    skipped_images = 0  # a shard's images were all readable when it was written

    def steps_per_epoch(self, epoch: int) -> int:
        if epoch not in self._steps:
            order = shard_order(len(self.index.shards), self.seed, epoch)
            per_rank = [
                sum(self.index.shards[i].count for i in order[r :: self.world_size])
                for r in range(self.world_size)
            ]
            steps = min(per_rank) // self.batch_size
            if steps == 0:
                raise DataError(
                    f"{self.data.name}: epoch {epoch} gives a process {min(per_rank)} images, "
                    f"fewer than one batch (GAN_BATCH_SIZE={self.batch_size} x "
                    f"{self.world_size} processes)"
                )
            self._steps = {epoch: steps}  # one epoch at a time is asked for
        return self._steps[epoch]

    def resize(self, batch_size: int) -> None:
        """BatchSource.resize: batches of batch_size per process from the next one on."""
        self.batch_size, self._steps, self._iter = batch_size, {}, None
        self.position.images_per_step = batch_size * self.world_size
        self.steps_per_epoch(self.position.epoch)

    @property
    def batches_per_epoch(self) -> int:
        return self.steps_per_epoch(self.position.epoch)

    def rank_shards(self, epoch: int) -> list[int]:
        return shard_order(len(self.index.shards), self.seed, epoch)[self.rank :: self.world_size]

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state, self.steps_per_epoch)
        self._iter = None

    def _samples(self, epoch: int, start: int, stop: int):
        """This rank's (image, label) number start to stop - 1 of the epoch. Shards wholly
        before start are not downloaded; while one is read, the next one needed is fetched
        ahead (after the last one the epoch uses, the next epoch's first)."""
        mine, position = self.rank_shards(epoch), 0
        for k, i in enumerate(mine):
            count = self.index.shards[i].count
            if position + count <= start:
                position += count
                continue
            samples = self.shards.read(i)
            last = position + count >= stop or k + 1 == len(mine)
            following = self.rank_shards(epoch + 1)[0] if last else mine[k + 1]
            self.shards.cache.prefetch(self.index.shards[following].name)
            for j in sample_order(count, self.seed, epoch, i)[max(start - position, 0) :]:
                yield samples[j]
            position += count
            if position >= stop:
                return

    def _batches(self, epoch: int, first: int):
        steps, b = self.steps_per_epoch(epoch), self.batch_size
        samples = self._samples(epoch, first * b, steps * b)
        for _ in range(first, steps):
            batch = [next(samples) for _ in range(b)]
            yield torch.stack([x[0] for x in batch]), torch.tensor([x[1] for x in batch])

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.monotonic()
        pos = self.position
        if pos.next_epoch_if_done(self.batches_per_epoch):
            self._iter = None
        if self._iter is None:
            self._iter = self._batches(pos.epoch, pos.batch_index)
        x, y = next(self._iter)
        x = resize_images(x, self.data.image_size).to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        pos.batch_index += 1
        self.delivered += len(y)
        self.busy_seconds += time.monotonic() - started
        return x.float().div_(127.5).sub_(1.0), y

    def stats(self) -> dict:
        """Data throughput for the log record (this rank's): images per second the source
        delivered while the loop waited on it, bytes downloaded so far, the cache's size."""
        cache = self.shards.cache
        stats = {
            "data_images_per_s": round(self.delivered / max(self.busy_seconds, 1e-9), 1),
            "data_downloaded_bytes": cache.downloaded_bytes,
            "data_download_bytes_per_s": round(
                cache.downloaded_bytes / max(cache.download_seconds, 1e-9)
            ),
            "data_cache_bytes": cache.used_bytes,
        }
        self.delivered, self.busy_seconds = 0, 0.0
        return stats
