"""`gan-job sample`: images from a trained generator, as a .npy of uint8 pixels or a PNG grid."""

from __future__ import annotations

import argparse
import io
import math
import os
from pathlib import Path

import numpy as np
import torch

from job import checkpoint, evaluate
from job.errors import CheckpointError, SettingsError
from job.models import Arch, build_generator
from job.storage import open_store


def load_generator(path: str, endpoint_url: str | None = None) -> tuple[torch.nn.Module, Arch]:
    """The EMA generator of a checkpoint, a final/generator.pt, or a run folder's newest checkpoint."""
    if path.endswith(".pt"):
        parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
        try:
            raw = open_store(parent, endpoint_url).get_bytes(name)
        except FileNotFoundError as exc:
            raise CheckpointError(f"--checkpoint {path}: no such file") from exc
        state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
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
    found = checkpoint.generator_state(state)
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: not a gan-job checkpoint or generator export")
    arch = Arch(**found[0])
    g = build_generator(arch)
    g.load_state_dict(found[1])
    return g.eval(), arch


def sample(g: torch.nn.Module, arch: Arch, num: int, seed: int, label: int | None) -> np.ndarray:
    """num images as uint8, N x H x W (one channel) or N x H x W x 3."""
    z, labels = evaluate.fixed_inputs(
        arch.latent_dim, num, arch.num_classes, seed, torch.device("cpu")
    )
    if label is not None:
        labels = torch.full((num,), label, dtype=torch.int64)
    images = evaluate.to_uint8(evaluate.generate(g, z, labels)).permute(0, 2, 3, 1).numpy()
    return images[..., 0] if arch.channels == 1 else images


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gan-job sample", description=__doc__)
    parser.add_argument(
        "--checkpoint", required=True, help="checkpoint, final/generator.pt, or run folder/URI"
    )
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--out", required=True, help="output .npy (uint8 images) or .png (a grid)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    parser.add_argument("--label", type=int, default=None, help="class for conditional models")
    args = parser.parse_args(argv)
    problems = []
    if args.num < 1:
        problems.append(f"--num {args.num}: expected an integer >= 1")
    if Path(args.out).suffix not in (".npy", ".png"):
        problems.append(f"--out {args.out}: expected a .npy or .png file name")
    if problems:
        raise SettingsError(problems)
    # the same endpoint setting as training; unset: boto3's AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL
    g, arch = load_generator(args.checkpoint, os.environ.get("GAN_S3_ENDPOINT_URL") or None)
    if args.label is not None and not 0 <= args.label < arch.num_classes:
        expected = (
            f"0..{arch.num_classes - 1}" if arch.num_classes else "no label (unconditional model)"
        )
        raise SettingsError([f"--label {args.label}: expected {expected}"])
    images = sample(g, arch, args.num, args.seed, args.label)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, images)
    else:
        tensor = torch.from_numpy(images).float() / 255
        tensor = tensor.unsqueeze(1) if arch.channels == 1 else tensor.permute(0, 3, 1, 2)
        out.write_bytes(evaluate.grid_png(tensor, nrow=math.ceil(math.sqrt(args.num))))
    print(f"wrote {args.num} images to {out}")
    return 0
