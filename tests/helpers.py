"""Small real inputs for the tests: IDX files, image folders, a TorchScript extractor, the job."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def write_idx(folder: Path, n: int = 256, size: int = 28, classes: int = 10, gz: bool = True,
              prefix: str = "train", seed: int = 0) -> Path:  # fmt: skip
    """<prefix>-images/labels IDX files (train or t10k) of n images: class k is a bright square
    at position k."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % classes).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, size, size), dtype=np.uint8)
    for i, k in enumerate(labels):
        r = (int(k) * 2) % (size - 8)
        images[i, r : r + 8, r : r + 8] = 255
    opener = gzip.open if gz else open
    suffix = ".gz" if gz else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, size, size) + images.tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + labels.tobytes())
    return folder


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cats", "dogs"), per_class: int = 6,
                       size: tuple[int, int] = (40, 30)) -> Path:  # fmt: skip
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


class TinyFeatures(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, 8, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(torch.relu(self.conv(x))).flatten(1)


def write_extractor(path: Path, channels: int = 1) -> Path:
    """A small TorchScript feature extractor (N x C x H x W in [0,1] -> N x 32)."""
    torch.manual_seed(0)
    torch.jit.script(TinyFeatures(channels)).save(str(path))
    return path


def job_env(tmp: Path, **settings: object) -> dict[str, str]:
    """The parent environment without GAN_* variables, plus small, fast settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAN_")}
    base = {
        "GAN_ARTIFACT_URI": str(tmp / "runs"),
        "GAN_DATA_DIR": str(tmp / "data"),
        "GAN_METRICS_PORT": 0,
        "GAN_WIDTH": 8,
        "GAN_LATENT_DIM": 16,
        "GAN_BATCH_SIZE": 16,
        "GAN_LOG_EVERY": 5,
        "GAN_FID_FEATURES": "none",
        # resumed runs in tests often change GAN_MAX_STEPS, which moves a decay's end
        "GAN_LR_DECAY": "none",
    }
    base.update(settings)
    env.update({k if k.startswith("GAN_") else f"GAN_{k.upper()}": str(v) for k, v in base.items()})
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    env["OMP_NUM_THREADS"] = "1"  # tiny models: threads only contend with each other
    return env


def run_job(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "job", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class SquareClassifier(torch.nn.Module):
    """A TorchScript-able extractor with a classifier head for write_idx images: feature k is
    the mean brightness of class k's square, so logits() is right for every such image."""

    def __init__(self, size: int = 28, classes: int = 10):
        super().__init__()
        masks = torch.zeros(classes, size, size)
        for k in range(classes):
            r = (k * 2) % (size - 8)
            masks[k, r : r + 8, r : r + 8] = 1 / 64
        self.register_buffer("masks", masks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nhw,khw->nk", x[:, 0], self.masks)

    @torch.jit.export
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x) * 50


def write_classifier(path: Path, classes: int = 10) -> Path:
    torch.jit.script(SquareClassifier(classes=classes)).save(str(path))
    return path


class Painter(torch.nn.Module):
    """A stand-in generator (G's call signature, [-1, 1] output) that returns real images: of the
    asked class, of one class (collapsed), or of a class drawn from the noise (ignoring labels)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mode: str = "obey"):
        super().__init__()
        self.classes = int(labels.max()) + 1
        per_class = min(int((labels == k).sum()) for k in range(self.classes))
        bank = [images[labels == k][:per_class] for k in range(self.classes)]
        self.register_buffer("bank", torch.stack(bank).float() / 127.5 - 1)
        self.per_class, self.mode = per_class, mode

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        pick = (z[:, 0].abs() * 1e4).long()
        if self.mode == "obey":
            k = labels
        elif self.mode == "collapse":
            k = torch.zeros_like(pick)
        else:
            k = (z[:, 1].abs() * 1e4).long() % self.classes
        return self.bank[k, pick % self.per_class]


def idx_images(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """write_idx's images (uint8, N x 1 x 28 x 28) and labels, in memory."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        folder = write_idx(Path(tmp), n=n, gz=False, seed=seed)
        from job.data.datasets import read_idx

        images = torch.from_numpy(read_idx(folder / "train-images-idx3-ubyte").copy()).unsqueeze(1)
        labels = torch.from_numpy(read_idx(folder / "train-labels-idx1-ubyte").copy()).long()
    return images, labels
