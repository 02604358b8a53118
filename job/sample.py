"""`gan-job sample`: images from a trained generator, as a .npy of uint8 pixels or a PNG grid."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import itertools
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from job import checkpoint, evaluate
from job.errors import CheckpointError, DiskFullError, SettingsError, StorageError
from job.models import Arch, build_generator
from job.storage import open_store

BATCH = 512  # images generated and written at a time
MAX_GRID = 1024  # images in a .png grid (32 x 32)
EXPECTED = "gan-job checkpoint or generator export (final/generator.pt)"
BEST_EXPORT = "best/generator.pt"  # the EMA generator of a run's best evaluation (job/best.py)


def load_generator(
    path: str, endpoint_url: str | None = None, which: str = "final"
) -> tuple[torch.nn.Module, Arch]:
    """The EMA generator of a checkpoint, a generator export (final/ or best/generator.pt), or
    a run folder: which="final", its newest checkpoint (else final/generator.pt); which="best",
    its best/generator.pt (the best evaluated step)."""
    if path.endswith(".pt"):
        state = _load_pt(path, endpoint_url)
    elif which == "best":
        if not open_store(path, endpoint_url).exists(BEST_EXPORT):
            raise CheckpointError(
                f"--checkpoint {path}: no {BEST_EXPORT} (a run keeps one only when it is "
                "evaluated: GAN_FID_FEATURES)"
            )
        return load_generator(path.rstrip("/") + "/" + BEST_EXPORT, endpoint_url)
    else:
        found = checkpoint.load_from(path, endpoint_url)
        if found is None:
            final = open_store(path, endpoint_url)
            if not final.exists("final/generator.pt"):
                raise CheckpointError(
                    f"--checkpoint {path}: no complete checkpoint or final/generator.pt"
                )
            return load_generator(path.rstrip("/") + "/final/generator.pt", endpoint_url)
        state = found[1]
    found = checkpoint.generator_state(state) if isinstance(state, dict) else None
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: {_what(state)}, not a {EXPECTED}")
    arch = Arch(**found[0])
    g = build_generator(arch)
    g.load_state_dict(found[1])
    return g.eval(), arch


def _load_pt(path: str, endpoint_url: str | None) -> object:
    """What a .pt file holds; CheckpointError naming it when it is missing or no torch.save file."""
    parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    try:
        raw = open_store(parent, endpoint_url).get_bytes(name)
    except FileNotFoundError as exc:
        raise CheckpointError(f"--checkpoint {path}: no such file") from exc
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - garbage, truncated or empty: unpickling fails anyhow
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"--checkpoint {path}: unreadable ({why}): expected a {EXPECTED}"
        ) from exc


def _what(state: object) -> str:
    if isinstance(state, torch.jit.ScriptModule):
        return "a TorchScript module"
    if isinstance(state, dict):
        return "a dict without a generator"
    return f"a saved {type(state).__name__}"


def sample(
    g: torch.nn.Module, arch: Arch, num: int, seed: int, label: int | None
) -> Iterator[np.ndarray]:
    """num images as uint8, in batches of at most BATCH (memory stays bounded for any num):
    n x H x W (one channel) or n x H x W x 3. The same seed gives the same images."""
    noise = torch.Generator().manual_seed(seed)
    for start in range(0, num, BATCH):
        n = min(BATCH, num - start)
        z = torch.randn(n, arch.latent_dim, generator=noise)
        labels = None
        if label is not None:
            labels = torch.full((n,), label, dtype=torch.int64)
        elif arch.num_classes:
            labels = torch.arange(start, start + n) % arch.num_classes
        images = evaluate.to_uint8(evaluate.generate(g, z, labels)).permute(0, 2, 3, 1).numpy()
        yield images[..., 0] if arch.channels == 1 else images


def check_out(out: Path, num: int) -> list[str]:
    """What is wrong with --out and --num, before any work. A missing folder is created."""
    if out.suffix not in (".npy", ".png"):
        return [f"--out {out}: expected a .npy or .png file name"]
    if out.is_dir():
        return [f"--out {out}: is a folder: expected a file name ending in .npy or .png"]
    if out.suffix == ".png" and num > MAX_GRID:
        return [f"--num {num}: a .png grid holds at most {MAX_GRID} images: write a .npy"]
    folder = next(p for p in out.absolute().parents if p.exists())  # nearest existing folder
    if not folder.is_dir():
        return [f"--out {out}: {folder} is a file, not a folder"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"--out {out}: cannot write in {folder} (permission denied)"]
    return []


def write_npy(out: Path, shape: tuple[int, ...], batches: Iterator[np.ndarray]) -> None:
    """A .npy of uint8 images written batch by batch, complete or not at all (_replacing);
    DiskFullError, before any image is written, when they cannot fit in the space left."""
    with _replacing(out) as f:
        free = shutil.disk_usage(out.parent).free
        if (size := math.prod(shape)) > free:
            raise DiskFullError(f"--out {out}: {_mb(size)} of images, {_mb(free)} free")
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for images in batches:
            f.write(np.ascontiguousarray(images).tobytes())


@contextlib.contextmanager
def _replacing(out: Path) -> Iterator[BinaryIO]:
    """A temporary file beside out, renamed to out once the block has written it, removed
    otherwise: out is complete or absent. DiskFullError when the disk fills, StorageError when
    it cannot be written at all."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(f"--out {out}: {e.strerror}") from e
        raise StorageError(f"--out {out}: cannot write in {out.parent} ({e.strerror})") from e
    finally:
        tmp.unlink(missing_ok=True)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gan-job sample", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint, final/generator.pt, or run folder/URI"
    )
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument(
        "--out",
        required=True,
        help=f"output .npy (uint8 images) or .png (a grid of at most {MAX_GRID}); "
        "a missing folder is created",
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    parser.add_argument("--label", type=int, default=None, help="class for conditional models")
    args = parser.parse_args(argv)
    out = Path(args.out)
    problems = [f"--num {args.num}: expected an integer >= 1"] if args.num < 1 else []
    problems += check_out(out, args.num)
    if problems:
        raise SettingsError(problems)
    # the same endpoint setting as training; unset: boto3's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    g, arch = load_generator(args.checkpoint, os.environ.get("GAN_S3_ENDPOINT_URL") or None)
    if args.label is not None and not 0 <= args.label < arch.num_classes:
        expected = (
            f"0..{arch.num_classes - 1}" if arch.num_classes else "no label (unconditional model)"
        )
        raise SettingsError([f"--label {args.label}: expected {expected}"])
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SettingsError([f"--out {out}: cannot create {out.parent} ({e.strerror})"]) from e
    batches = sample(g, arch, args.num, args.seed, args.label)
    if out.suffix == ".npy":
        first = next(batches)
        write_npy(out, (args.num, *first.shape[1:]), itertools.chain([first], batches))
    else:
        images = torch.from_numpy(np.concatenate(list(batches))).float() / 255
        images = images.unsqueeze(1) if arch.channels == 1 else images.permute(0, 3, 1, 2)
        with _replacing(out) as f:
            f.write(evaluate.grid_png(images, nrow=math.ceil(math.sqrt(args.num))))
    print(f"wrote {args.num} images to {out}")
    return 0
