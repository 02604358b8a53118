"""`gan-job features`: train a small CNN classifier and save its penultimate layer as a
TorchScript FID feature extractor (GAN_FID_FEATURES=FILE), for when InceptionV3 is unavailable.

The saved module maps N x C x H x W images in [0, 1] (any H x W: it resizes to its training
size) to N x D features. Its test accuracy, dataset, image size, epochs and class count travel
in the file as the extra file meta.json and are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from job.data import datasets as datamod
from job.data.folder import RGB, WHITE, FolderDataset, background_rgb, folder_batches
from job.data.naming import NATIVE_SIZE
from job.infra.errors import DataError, SettingsError

log = logging.getLogger(__name__)

META_FILE = "meta.json"
FOLDER_TEST_FRACTION = 0.1


# ---------------------------------------------------------------- model


class FeatureNet(nn.Module):
    """Conv blocks (conv-BN-ReLU-maxpool, doubling width) down to <= 8 px, 4 x 4 average pool,
    a D-wide linear layer (the features) and the class logits.

    forward() gives the features, as the FID extractor; logits() is for training. Inputs are
    images in [0, 1]; resizing to the training size and normalising happen inside.
    """

    def __init__(
        self,
        channels: int,
        image_size: int,
        num_classes: int,
        width: int = 32,
        feature_dim: int = 128,
        mean: list[float] | None = None,
        std: list[float] | None = None,
    ):
        super().__init__()
        self.channels, self.image_size = channels, image_size
        self.register_buffer("mean", torch.tensor(mean or [0.5] * channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or [0.5] * channels).view(1, -1, 1, 1))
        layers: list[nn.Module] = []
        c_in, c_out, size = channels, width, image_size
        while True:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in, size = c_out, size // 2
            if size <= 8:
                break
            c_out = min(c_out * 2, 256)
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.body = nn.Sequential(*layers)
        self.embed = nn.Linear(c_in * 16, feature_dim)
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            if x.shape[1] == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif self.channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        if x.shape[-2] != self.image_size or x.shape[-1] != self.image_size:
            size = [self.image_size, self.image_size]
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N x C x H x W in [0, 1] -> N x D features (the pre-activation penultimate layer)."""
        return self.embed(self.body(self.prepare(x)).flatten(1))

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(x))


# ---------------------------------------------------------------- data


class Split:
    """Some images of a dataset (by index), batched as uint8 N x C x H x W and int64 labels."""

    def __init__(self, data: datamod.ImageData, index: torch.Tensor, workers: int = 0):
        self.data, self.index, self.workers = data, index, workers

    def __len__(self) -> int:
        return len(self.index)

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index = self.index
        if generator is not None:
            index = index[torch.randperm(len(index), generator=generator)]
        chunks = list(index.split(batch_size))
        if self.data.images is not None:
            for idx in chunks:
                yield self.data.images[idx], self.data.labels[idx]
        else:
            batches = [c.tolist() for c in chunks]
            yield from folder_batches(self.data.folder, batches, self.workers)


def _check_labels(data: datamod.ImageData, what: str) -> int:
    classes = int(data.labels.max()) + 1 if len(data.labels) else 0
    if classes < 2:
        raise DataError(f"{what}: a classifier needs at least 2 classes, found {classes}")
    return classes


def load_splits(
    dataset: str, data_dir: Path, image_size: int, seed: int, workers: int, background: RGB = WHITE
) -> tuple[Split, Split, int, int, str]:
    """(train, test, channels, classes, how the test split was made) at image_size; images
    with transparency laid over background, as the job reads them."""
    if dataset.startswith("folder:"):
        root = Path(dataset.removeprefix("folder:"))
        ds = FolderDataset(root, image_size, background=background)
        classes = len(ds.classes)
        if classes < 2:
            raise DataError(
                f"{dataset}: a classifier needs labels: put the images in one subfolder per class"
            )
        folder = datamod.ImageData(dataset, 3, image_size, classes, ds.labels, folder=ds)
        order = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(len(folder) * FOLDER_TEST_FRACTION))
        if len(folder) - n_test < 1:
            raise DataError(f"{dataset}: {len(folder)} images are too few to hold out a test split")
        train = Split(folder, order[n_test:], workers)
        test = Split(folder, order[:n_test], workers)
        return train, test, 3, classes, f"held-out {FOLDER_TEST_FRACTION:.0%} of the images"

    def load(split: str) -> datamod.ImageData:
        if dataset == "cifar10":
            return datamod.load_cifar10(data_dir, True, split=split)
        return datamod.load_idx_dataset(dataset, data_dir, True, split=split)

    train_data = datamod.resize_in_memory(load(split="train"), image_size)
    classes = _check_labels(train_data, dataset)
    try:
        test_data = datamod.resize_in_memory(load(split="test"), image_size)
        how = "test split"
    except DataError as exc:
        log.warning("%s; holding out 10%% of the training images instead", exc)
        test_data, how = None, f"held-out {FOLDER_TEST_FRACTION:.0%} of the training images"
    if test_data is not None:
        if test_data.images.shape[1:] != train_data.images.shape[1:]:
            raise DataError(
                f"{dataset}: test images {tuple(test_data.images.shape[1:])} differ from "
                f"training images {tuple(train_data.images.shape[1:])}"
            )
        if int(test_data.labels.max()) >= classes:
            raise DataError(f"{dataset}: the test split has labels beyond the {classes} classes")
        train = Split(train_data, torch.arange(len(train_data)))
        test = Split(test_data, torch.arange(len(test_data)))
    else:
        order = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(seed))
        n_test = max(1, round(len(train_data) * FOLDER_TEST_FRACTION))
        train, test = Split(train_data, order[n_test:]), Split(train_data, order[:n_test])
    return train, test, train_data.channels, classes, how


def channel_stats(split: Split, channels: int, limit: int = 10_000) -> tuple[list, list]:
    """Per-channel mean and std of (up to limit) training images in [0, 1]."""
    total = torch.zeros(channels, dtype=torch.float64)
    squares = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for x, _ in split.batches(500):
        x = x.double() / 255
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
        if count >= limit * x.shape[2] * x.shape[3]:
            break
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()


# ---------------------------------------------------------------- training


@torch.no_grad()
def accuracy(model: FeatureNet, split: Split, device: torch.device, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for x, y in split.batches(batch):
        pred = model.logits(x.to(device).float() / 255).argmax(dim=1)
        correct += int((pred.cpu() == y).sum())
    return correct / max(1, len(split))


def train_classifier(
    model: FeatureNet,
    train: Split,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
) -> None:
    """Adam with a one-cycle learning rate (short warm-up, cosine decay to ~0) over all epochs."""
    steps = epochs * math.ceil(len(train) / batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=steps, pct_start=0.15, anneal_strategy="cos"
    )
    order = torch.Generator().manual_seed(seed)
    start = time.monotonic()
    for epoch in range(epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in train.batches(batch_size, order):
            x, y = x.to(device).float() / 255, y.to(device)
            logits = model.logits(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        log.info(
            "epoch %d/%d: loss %.4f, train accuracy %.4f, %.0f s",
            epoch + 1,
            epochs,
            loss_sum / max(1, seen),
            correct / max(1, seen),
            time.monotonic() - start,
        )


def save_extractor(model: FeatureNet, out: Path, meta: dict) -> None:
    model = model.cpu().eval()
    with warnings.catch_warnings():  # torch.jit.script is deprecated but still the way to script
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    scripted.save(str(tmp), _extra_files={META_FILE: json.dumps(meta, indent=2)})
    os.replace(tmp, out)


def read_meta(path: Path | str) -> dict:
    """The meta.json stored in an extractor written by `gan-job features`."""
    extra = {META_FILE: ""}
    with warnings.catch_warnings():  # torch.jit.load is deprecated too
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[META_FILE])


# ---------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-job features", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--dataset",
        required=True,
        help="mnist, kmnist, fashion-mnist, cifar10 or folder:/path (one subfolder per class)",
    )
    p.add_argument("--out", required=True, help="the TorchScript file to write (e.g. features.pt)")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("GAN_DATA_DIR", "./data"),
        help="where datasets are read from (default: $GAN_DATA_DIR or ./data)",
    )
    p.add_argument(
        "--epochs", type=int, default=3, help="passes over the training split (default 3)"
    )
    p.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="training size in pixels; default: the dataset's own (28, 32; 64 for folders)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data order")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak Adam learning rate (default 3e-3)")
    p.add_argument(
        "--width", type=int, default=16, help="channels of the first conv block (default 16)"
    )
    p.add_argument("--feature-dim", type=int, default=128, help="D, the feature size (default 128)")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto picks cuda when available",
    )
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers for folders")
    p.add_argument(
        "--background",
        default=os.environ.get("GAN_BACKGROUND", "white"),
        help="images with transparency are laid over it: white, black or #rrggbb "
        "(default: $GAN_BACKGROUND or white, as the job)",
    )
    return p


def _check(args: argparse.Namespace) -> None:
    problems = []
    if args.dataset not in NATIVE_SIZE and not (
        args.dataset.startswith("folder:") and len(args.dataset) > 7
    ):
        known = ", ".join(sorted(NATIVE_SIZE))
        problems.append(f"--dataset {args.dataset}: expected one of {known} or folder:/path")
    checks = [
        ("--epochs", args.epochs, 1, 1000),
        ("--batch-size", args.batch_size, 1, 65536),
        ("--width", args.width, 4, 512),
        ("--feature-dim", args.feature_dim, 2, 8192),
        ("--num-workers", args.num_workers, 0, 64),
    ]
    if args.image_size is not None:
        checks.append(("--image-size", args.image_size, 8, 512))
    for flag, value, low, high in checks:
        if not low <= value <= high:
            problems.append(f"{flag} {value}: expected an integer from {low} to {high}")
    if not 0 < args.lr <= 1:
        problems.append(f"--lr {args.lr}: expected a number in (0, 1]")
    if background_rgb(args.background) is None:
        problems.append(f"--background {args.background}: expected white, black or #rrggbb")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device available")
    if "://" in args.out:
        problems.append(f"--out {args.out}: expected a local file (GAN_FID_FEATURES reads one)")
    elif Path(args.out).is_dir():
        problems.append(f"--out {args.out}: is a folder, expected a file name")
    if problems:
        raise SettingsError(problems)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    started, cpu_started = time.monotonic(), time.process_time()
    torch.manual_seed(args.seed)
    device = torch.device(
        "cuda"
        if args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
        else "cpu"
    )
    size = args.image_size or NATIVE_SIZE.get(args.dataset, 64)
    workers = args.num_workers
    train, test, channels, classes, how = load_splits(
        args.dataset, Path(args.data_dir), size, args.seed, workers, background_rgb(args.background)
    )
    log.info(
        "%s: %d training and %d test images (%s), %d classes, %d px, on %s",
        args.dataset,
        len(train),
        len(test),
        how,
        classes,
        size,
        device,
    )
    mean, std = channel_stats(train, channels)
    model = FeatureNet(channels, size, classes, args.width, args.feature_dim, mean, std).to(device)
    train_classifier(model, train, args.epochs, args.batch_size, args.lr, args.seed, device)
    acc = accuracy(model, test, device)
    seconds, cpu_seconds = time.monotonic() - started, time.process_time() - cpu_started
    meta = {
        "format": "gan-job-features/1",
        "dataset": args.dataset,
        "test_accuracy": round(acc, 4),
        "test_split": how,
        "test_images": len(test),
        "train_images": len(train),
        "image_size": size,
        "channels": channels,
        "num_classes": classes,
        "feature_dim": args.feature_dim,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "width": args.width,
        "seed": args.seed,
        "wall_seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds, 1),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    save_extractor(model, out, meta)
    print(
        f"test accuracy {acc:.4f} on {len(test)} images ({how}) of {args.dataset}: "
        f"{classes} classes, {size} px, {args.epochs} epochs"
    )
    print(
        f"wall time {seconds:.1f} s (CPU time {cpu_seconds:.1f} s on {torch.get_num_threads()} "
        f"threads); wrote {out} (N x {channels} x H x W in [0,1] -> N x {args.feature_dim})"
    )
    print(f"use it: GAN_FID_FEATURES={out}")
    print(json.dumps(meta))
    return 0
