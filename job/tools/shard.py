"""`gan-job shard SOURCE s3://bucket/prefix`: packs any GAN_DATASET into the WebDataset tar
shards that GAN_DATASET=shards:s3://bucket/prefix streams (job/data/shards.py), one shard at a
time through a local temporary folder, and writes their index.json last."""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from webdataset import ShardWriter

from job.data.datasets import NUM_CLASSES, ImageData, load_dataset
from job.data.folder import background_rgb
from job.data.naming import NATIVE_SIZE, SHARDS_PREFIX, dataset_kind, dataset_problem
from job.data.shards import INDEX, Shard, ShardIndex
from job.infra.errors import SettingsError
from job.infra.s3_store import s3_uri_problem
from job.infra.store import Store
from job.infra.stores import open_store

log = logging.getLogger(__name__)

SHARD_PATTERN = "shard-%06d.tar"


def write_shards(
    data: ImageData, store: Store, shard_size: int, source: str, force: bool = False
) -> ShardIndex:
    """Every image of data as tar shards of shard_size samples under store, index.json last.

    One shard at a time is written to a local temporary folder and uploaded, so the local
    disk holds one shard whatever the dataset's size. With force, an existing index is
    deleted first (a half-rewritten prefix is no dataset) and stale shards after it.
    """
    if store.exists(INDEX):
        if not force:
            raise SettingsError(
                [
                    f"{store.uri}: already holds a shards dataset ({INDEX}): add --force to replace it"
                ]
            )
        store.delete(INDEX)
    shards: list[Shard] = []
    with tempfile.TemporaryDirectory(prefix="gan-job-shard-") as tmp:
        writer: ShardWriter | None = None

        def upload(path: str) -> None:
            name = Path(path).name
            size = Path(path).stat().st_size
            store.put_file(name, path)
            os.unlink(path)
            shards.append(Shard(name, writer.count, size))
            log.info("stored %s: %d images, %.1f MB", name, writer.count, size / 1e6)

        pattern = str(Path(tmp) / SHARD_PATTERN)
        writer = ShardWriter(pattern, maxcount=shard_size, post=upload, verbose=0, mtime=0)
        labels = data.labels.tolist()
        for i in range(len(data)):
            image, label = _image(data, i), labels[i]
            writer.write({"__key__": f"{i:09d}", "png": image, "cls": label})
        writer.close()
    known = NUM_CLASSES.get(dataset_kind(source))
    index = ShardIndex(
        dataset=source,
        image_size=data.image_size,
        channels=data.channels,
        num_classes=known or (int(data.labels.max()) + 1 if len(data) else 0),
        classes=len(torch.unique(data.labels)),
        count=len(data),
        shards=shards,
    )
    store.put_bytes(INDEX, index.to_json())
    names = {s.name for s in shards}
    for key in store.list("shard-"):
        if key not in names and "/" not in key:
            store.delete(key)  # left by an earlier, larger dataset (--force)
    return index


def _image(data: ImageData, i: int) -> np.ndarray:
    """Image i as uint8 H x W (one channel) or H x W x 3, what the PNG encoder takes."""
    image = data.images[i] if data.images is not None else data.folder.load(i)[0]
    array = image.permute(1, 2, 0).numpy()
    return array[..., 0] if array.shape[2] == 1 else array


def main(argv: list[str]) -> int:
    """`gan-job shard SOURCE s3://bucket/prefix [--shard-size N] [--image-size PX] [--force]`."""
    parser = argparse.ArgumentParser(
        prog="gan-job shard",
        description="Pack a dataset (anything GAN_DATASET accepts) into WebDataset tar shards "
        "for GAN_DATASET=shards:s3://bucket/prefix.",
    )
    parser.add_argument("source", help="mnist, fashion-mnist, folder:PATH, s3://... ")
    parser.add_argument("dest", help="s3://bucket/prefix to write the shards and index.json to")
    parser.add_argument("--shard-size", default="1000", help="images per shard (default 1000)")
    parser.add_argument(
        "--image-size", default=None, help="pixels per side; default: as GAN_IMAGE_SIZE's default"
    )
    parser.add_argument("--force", action="store_true", help="replace an existing shards dataset")
    parser.add_argument(
        "--data-dir", default=os.environ.get("GAN_DATA_DIR", "./data"), help="as GAN_DATA_DIR"
    )
    parser.add_argument(
        "--background",
        default=os.environ.get("GAN_BACKGROUND", "white"),
        help="images with transparency are laid over it: white, black or #rrggbb (as GAN_BACKGROUND)",
    )
    args, unknown = parser.parse_known_args(argv)
    problems = [f"{a}: unknown argument (see gan-job shard --help)" for a in unknown]
    shard_size = _int_arg("--shard-size", args.shard_size, 1, 10**9, problems)
    image_size = None
    if args.image_size is not None:
        image_size = _int_arg("--image-size", args.image_size, 8, 512, problems)
    if why := dataset_problem(args.source):
        problems.append(f"SOURCE {args.source!r}: {why}")
    elif dataset_kind(args.source) == "shards":
        problems.append(f"SOURCE {args.source!r}: already shards")
    if not args.dest.startswith("s3://") or len(args.dest) <= len("s3://"):
        problems.append(f"DEST {args.dest!r}: expected s3://bucket/prefix")
    elif why := s3_uri_problem(args.dest):
        problems.append(f"DEST {args.dest!r}: expected {why}")
    background = background_rgb(args.background)
    if background is None:
        problems.append(f"--background {args.background!r}: expected white, black or #rrggbb")
    if problems:
        raise SettingsError(problems)
    endpoint = os.environ.get("GAN_S3_ENDPOINT_URL") or None
    store = open_store(args.dest, endpoint)
    kind = dataset_kind(args.source)
    size = image_size or NATIVE_SIZE.get(kind, 64)
    local = None
    if kind == "s3":
        from job.infra.stores import download_prefix

        local = download_prefix(
            args.source, Path(args.data_dir) / "s3" / args.source.removeprefix("s3://"), endpoint
        )
    data = load_dataset(
        args.source, args.data_dir, size, local_s3_copy=local, background=background
    )
    started = time.monotonic()
    index = write_shards(data, store, shard_size, args.source, args.force)
    print(
        f"wrote {index.count} images ({index.channels}x{index.image_size}x{index.image_size}, "
        f"{index.classes} classes) as {len(index.shards)} shards to {store.uri} in "
        f"{time.monotonic() - started:.1f} s; train with GAN_DATASET={SHARDS_PREFIX}{store.uri}"
    )
    return 0


def _int_arg(name: str, value: str, low: int, high: int, problems: list[str]) -> int:
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if not low <= number <= high:
        problems.append(f"{name} {value}: expected an integer from {low} to {high}")
    return number
