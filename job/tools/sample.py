"""`gan-job sample`: images from a trained generator, as a .npy of uint8 pixels or a PNG grid:
from --num/--seed noise or one per --seeds seed, truncated (--truncation), or along the slerp
between seeds (--interpolate; also as an animated GIF)."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from job.gan import sampling
from job.gan.models import Arch
from job.gan.truncation import TRUNCATION_HELP, truncate
from job.infra.errors import DiskFullError, SettingsError
from job.run import outputs
from job.run.generator_file import load_generator

BATCH = 512  # images generated and written at a time
MAX_GRID = 1024  # images in a .png grid (32 x 32)
MAX_SEEDS = 1_000_000  # seeds in one --seeds
MAX_SEED = 2**64 - 1  # the largest torch.Generator seed
DEFAULT_STEPS = 8  # --interpolate: images per row
MAX_STEPS = 1000  # --interpolate: images per row at most
MAX_INTERPOLATED = 100_000  # --interpolate: images in all (their z are held at once)
FRAME_MS = 100  # --interpolate into a .gif: time per frame

Inputs = tuple[torch.Tensor, torch.Tensor | None]  # z (n x latent_dim) and labels (n) or None


def parse_seeds(text: str) -> list[int]:
    """'0-63,100': seeds and inclusive ranges, comma-separated, in the order given."""
    seeds: list[int] = []
    for part in text.split(","):
        found = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if found is None:
            raise ValueError(f"{part.strip()!r} is neither a seed nor a range FIRST-LAST")
        first, last = int(found[1]), int(found[2] or found[1])
        if last < first:
            raise ValueError(f"the range {part.strip()} goes down: FIRST-LAST needs FIRST <= LAST")
        if last > MAX_SEED:
            raise ValueError(f"{last}: seeds go up to {MAX_SEED}")
        if len(seeds) + last - first + 1 > MAX_SEEDS:
            raise ValueError(f"more than {MAX_SEEDS:,} seeds")
        seeds.extend(range(first, last + 1))
    return seeds


def seed_z(latent_dim: int, seed: int) -> torch.Tensor:
    """The z of seed: drawn from torch.Generator().manual_seed(seed) alone."""
    return torch.randn(latent_dim, generator=torch.Generator().manual_seed(seed))


def _labels(arch: Arch, label: int | None, classes: list[int]) -> torch.Tensor | None:
    """--label for every image, else each image's own class (conditional models only)."""
    if not arch.num_classes:
        return None
    if label is not None:
        return torch.full((len(classes),), label, dtype=torch.int64)
    return torch.tensor([c % arch.num_classes for c in classes], dtype=torch.int64)


def noise_inputs(arch: Arch, num: int, seed: int, label: int | None) -> Iterator[Inputs]:
    """--num/--seed: noise drawn BATCH at a time from one generator seeded with seed, labels
    cycling through the classes."""
    noise = torch.Generator().manual_seed(seed)
    for start in range(0, num, BATCH):
        n = min(BATCH, num - start)
        z = torch.randn(n, arch.latent_dim, generator=noise)
        yield z, _labels(arch, label, list(range(start, start + n)))


def seed_inputs(arch: Arch, seeds: list[int], label: int | None) -> Iterator[Inputs]:
    """--seeds: image i from seed i alone (its z; its label seed % num_classes)."""
    for start in range(0, len(seeds), BATCH):
        chunk = seeds[start : start + BATCH]
        yield torch.stack([seed_z(arch.latent_dim, s) for s in chunk]), _labels(arch, label, chunk)


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from a (t = 0) to b (t = 1), one row per t:
    (sin((1 - t) omega) a + sin(t omega) b) / sin(omega), omega the angle between a and b
    (a straight line where they are parallel)."""
    a64, b64, t = a.double(), b.double(), t.double()[:, None]
    omega = torch.acos((a64 @ b64 / (a64.norm() * b64.norm())).clamp(-1, 1))
    if torch.sin(omega) < 1e-6:
        return torch.lerp(a64, b64, t).to(a.dtype)
    mixed = torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64
    return (mixed / torch.sin(omega)).to(a.dtype)


def interpolation_inputs(
    arch: Arch, seeds: list[int], steps: int, label: int | None, path: bool
) -> Inputs:
    """Rows of steps images from seed k to seed k + 1 along slerp(z_k, z_k+1), each row with
    seed k's label (or --label); path: one sequence through every seed instead (each seed's
    image once, the last with its own label)."""
    zs = [seed_z(arch.latent_dim, s) for s in seeds]
    t = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    rows = [slerp(a, b, t) for a, b in itertools.pairwise(zs)]
    if not path:
        return torch.cat(rows), _labels(arch, label, [s for s in seeds[:-1] for _ in range(steps)])
    frames = torch.cat([row[:-1] for row in rows] + [zs[-1][None]])
    classes = [s for s in seeds[:-1] for _ in range(steps - 1)] + seeds[-1:]
    return frames, _labels(arch, label, classes)


def render(
    g: torch.nn.Module, arch: Arch, inputs: Iterable[Inputs], psi: float = 1.0, batch: int = BATCH
) -> Iterator[np.ndarray]:
    """uint8 images of truncate(z, psi), batch at a time: n x H x W (one channel) or
    n x H x W x 3."""
    for z, labels in inputs:
        for start in range(0, len(z), batch):
            zb = truncate(z[start : start + batch], psi)
            lb = labels[start : start + batch] if labels is not None else None
            images = sampling.to_uint8(sampling.generate(g, zb, lb)).permute(0, 2, 3, 1).numpy()
            yield images[..., 0] if arch.channels == 1 else images


def check_out(out: str, count: int | None, what: str, gif: bool = False) -> list[str]:
    """What is wrong with --out (a path or s3:// URI) for count images (what: the flags that
    asked for them), before any work. A missing folder is created."""
    uri, out = out, Path(out)
    kinds = (".npy", ".png", ".gif") if gif else (".npy", ".png")
    if out.suffix == ".gif" and not gif:
        return [f"--out {out}: a .gif is written by --interpolate only"]
    if out.suffix not in kinds:
        return [f"--out {out}: expected a {', '.join(kinds[:-1])} or {kinds[-1]} file name"]
    if out.is_dir():
        return [f"--out {out}: is a folder: expected a file name ending in {' or '.join(kinds)}"]
    if out.suffix != ".npy" and count is not None and count > MAX_GRID:
        holder = "a .png grid" if out.suffix == ".png" else "a .gif"
        return [f"{what}: {holder} holds at most {MAX_GRID} images: write a .npy"]
    return outputs.out_file_problems(uri)


def write_npy(out: Path, shape: tuple[int, ...], batches: Iterator[np.ndarray]) -> None:
    """A .npy of uint8 images written batch by batch, complete or not at all (outputs.replacing);
    DiskFullError, before any image is written, when they cannot fit in the space left."""
    with outputs.replacing(out) as f:
        free = shutil.disk_usage(out.parent).free
        if (size := math.prod(shape)) > free:
            raise DiskFullError(f"--out {out}: {_mb(size)} of images, {_mb(free)} free")
        header = {"descr": "|u1", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for images in batches:
            f.write(np.ascontiguousarray(images).tobytes())


def _mb(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def write_png(out: Path, batches: Iterable[np.ndarray], arch: Arch, nrow: int) -> None:
    """A grid of the images, nrow to a row."""
    images = torch.from_numpy(np.concatenate(list(batches))).float() / 255
    images = images.unsqueeze(1) if arch.channels == 1 else images.permute(0, 3, 1, 2)
    with outputs.replacing(out) as f:
        f.write(sampling.grid_png(images, nrow=nrow))


def write_gif(out: Path, batches: Iterable[np.ndarray]) -> None:
    """An animated GIF, one image a frame, FRAME_MS each, looping."""
    from PIL import Image

    frames = [Image.fromarray(image) for images in batches for image in images]
    with outputs.replacing(out) as f:
        frames[0].save(
            f, format="GIF", save_all=True, append_images=frames[1:], duration=FRAME_MS, loop=0
        )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-job sample", description=__doc__)
    p.add_argument(
        "--checkpoint", required=True, help="checkpoint, final/generator.pt, or run folder/URI"
    )
    p.add_argument(
        "--which",
        choices=("final", "best"),
        default="final",
        help="of a run folder: final (its newest checkpoint, else final/generator.pt; the "
        "default) or best (best/generator.pt, the generator of its best evaluation)",
    )
    p.add_argument("--num", type=int, default=None, help="number of images (from --seed)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="with --num: the same seed gives the same images; 0 to 2**64-1",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="instead of --num/--seed: one image per seed, e.g. 0-63,100 (ranges inclusive), "
        "in that order; image i comes from seed i alone (z and, for conditional models, "
        "label seed %% classes), so it is the same in any list and batch size",
    )
    p.add_argument(
        "--out",
        required=True,
        help=f"output .npy (uint8 images) or .png (a grid of at most {MAX_GRID}); "
        "with --interpolate also .gif; a missing folder is created; an s3://bucket/key is "
        "written locally, then uploaded (endpoint: GAN_S3_ENDPOINT_URL)",
    )
    p.add_argument("--label", type=int, default=None, help="class for conditional models")
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help=TRUNCATION_HELP)
    p.add_argument(
        "--interpolate",
        action="store_true",
        help="a row per pair of consecutive --seeds, --steps images along the slerp of their z "
        "(a conditional row keeps its first seed's label, or --label); a .gif: one frame a "
        "step along the path through all the seeds",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"with --interpolate: images per row, 2 to {MAX_STEPS} (default {DEFAULT_STEPS}); "
        f"{MAX_INTERPOLATED:,} images in all at most",
    )
    p.add_argument(
        "--batch-size", type=int, default=BATCH, help=f"images generated at a time ({BATCH})"
    )
    return p


def _check_images(args: argparse.Namespace) -> tuple[list[str], list[int] | None]:
    """Problems with --num/--seed/--seeds, and the seeds."""
    if args.seeds is None:
        if args.num is None:
            return ["--num or --seeds: one of them is needed"], None
        problems = [f"--num {args.num}: expected an integer >= 1"] if args.num < 1 else []
        if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
            problems.append(f"--seed {args.seed}: expected an integer from 0 to {MAX_SEED}")
        return problems, None
    problems = []
    if args.num is not None or args.seed is not None:
        problems.append("--seeds: not with --num or --seed (--seeds names each image's seed)")
    try:
        return problems, parse_seeds(args.seeds)
    except ValueError as e:
        return [*problems, f"--seeds {args.seeds}: {e}"], None


def _check_options(args: argparse.Namespace, seeds: list[int] | None) -> list[str]:
    problems = []
    if args.interpolate and seeds is not None and len(seeds) < 2:
        problems.append(f"--interpolate: needs at least two --seeds, got {args.seeds}")
    if args.interpolate and args.seeds is None:
        problems.append("--interpolate: needs --seeds (at least two)")
    if args.steps is not None and not args.interpolate:
        problems.append(f"--steps {args.steps}: only with --interpolate")
    if args.steps is not None and not 2 <= args.steps <= MAX_STEPS:
        problems.append(f"--steps {args.steps}: expected an integer from 2 to {MAX_STEPS}")
    if not 0 < args.truncation <= 1:
        problems.append(f"--truncation {args.truncation}: expected 0 < PSI <= 1")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: expected an integer >= 1")
    if args.which == "best" and args.checkpoint.endswith(".pt"):
        problems.append(
            f"--which best: --checkpoint {args.checkpoint} is a file: give its run folder"
        )
    return problems


def image_count(args: argparse.Namespace, seeds: list[int] | None) -> tuple[int | None, str]:
    """How many images the flags ask for (None: not known), and the flags that say so."""
    if seeds is None:
        return args.num, f"--num {args.num}"
    if not args.interpolate:
        return len(seeds), f"--seeds: {len(seeds)} images"
    rows, steps = len(seeds) - 1, args.steps or DEFAULT_STEPS
    count = rows * (steps - 1) + 1 if Path(args.out).suffix == ".gif" else rows * steps
    return count, f"--seeds/--steps: {count} images"


def check_args(args: argparse.Namespace) -> list[int] | None:
    """SettingsError naming every bad flag, before any work; the --seeds given."""
    problems, seeds = _check_images(args)
    problems += _check_options(args, seeds)
    count, what = image_count(args, seeds)
    if args.interpolate and count is not None and count > MAX_INTERPOLATED:
        problems.append(f"{what}: --interpolate makes at most {MAX_INTERPOLATED:,}")
    problems += check_out(args.out, count, what, gif=args.interpolate)
    if problems:
        raise SettingsError(problems)
    return seeds


def _check_label(label: int | None, arch: Arch) -> None:
    if label is not None and not 0 <= label < arch.num_classes:
        expected = (
            f"0..{arch.num_classes - 1}" if arch.num_classes else "no label (unconditional model)"
        )
        raise SettingsError([f"--label {label}: expected {expected}"])


def _make_folder(out: Path) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SettingsError([f"--out {out}: cannot create {out.parent} ({e.strerror})"]) from e


def _inputs(args: argparse.Namespace, arch: Arch, seeds: list[int] | None) -> Iterable[Inputs]:
    if seeds is None:
        return noise_inputs(arch, args.num, args.seed or 0, args.label)
    if not args.interpolate:
        return seed_inputs(arch, seeds, args.label)
    path = Path(args.out).suffix == ".gif"
    steps = args.steps or DEFAULT_STEPS
    return [interpolation_inputs(arch, seeds, steps, args.label, path)]


def _write(out: Path, count: int, batches: Iterator[np.ndarray], arch: Arch, nrow: int) -> None:
    if out.suffix == ".npy":
        first = next(batches)
        write_npy(out, (count, *first.shape[1:]), itertools.chain([first], batches))
    elif out.suffix == ".gif":
        write_gif(out, batches)
    else:
        write_png(out, batches, arch, nrow)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    seeds = check_args(args)
    # the same endpoint setting as training; unset: boto3's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    endpoint = os.environ.get("GAN_S3_ENDPOINT_URL") or None
    g, arch = load_generator(args.checkpoint, endpoint, args.which)
    _check_label(args.label, arch)
    count = image_count(args, seeds)[0]
    nrow = (args.steps or DEFAULT_STEPS) if args.interpolate else math.ceil(math.sqrt(count))
    batches = render(g, arch, _inputs(args, arch, seeds), args.truncation, args.batch_size)
    folder, name = outputs.split(args.out)
    with outputs.local_folder(folder, endpoint) as local:
        out = local / name
        _make_folder(out)
        _write(out, count, batches, arch, nrow)
    print(f"wrote {count} images to {args.out}")
    return 0
