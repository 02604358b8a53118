"""Lazy against every-step R1 + R2 penalties on the R3GAN objective, side by side:
`python benchmarks/bench_penalties.py`.

One process trains a small r3gan (32 px, RGB, random images: the cost of a step does not depend
on what the images show) with GAN_LOSS=rpgan and both penalties, once per GAN_R1_EVERY value
(and once without penalties, the floor), in alternating timed windows so that every variant sees
the same machine load. Reported per variant: steps per second of wall time, and steps and
images per CPU minute (process CPU time, all threads), with the ratio to every-step penalties.
docs/training.md ("The R3GAN objective") reads the output.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from job.gan.models import Arch
from job.gan.networks import Networks
from job.gan.step import GanStep, Recipe

CPU = torch.device("cpu")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--every", type=int, nargs="+", default=[1, 16], help="GAN_R1_EVERY values")
    p.add_argument("--gamma", type=float, default=0.05, help="GAN_R1_GAMMA = GAN_R2_GAMMA")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=16, help="steps per timed window")
    p.add_argument("--repeats", type=int, default=3, help="timed windows per variant")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args()


def make_step(args: argparse.Namespace, every: int, gamma: float) -> GanStep:
    arch = Arch(model="r3gan", channels=3, image_size=args.image_size, latent_dim=64,
                width=args.width, num_classes=0, blocks=args.blocks)  # fmt: skip
    nets = Networks(arch, CPU, seed=0, lr_g=2e-4, lr_d=2e-4, betas=(0.0, 0.9), ema_decay=0.999,
                    channels_last=False, fused_adam=True)  # fmt: skip
    recipe = Recipe(loss="rpgan", label_smoothing=0.0, r1_gamma=gamma, r1_every=every,
                    diffaugment="", amp=False, r2_gamma=gamma)  # fmt: skip
    return GanStep(nets, recipe, device=CPU)


def window(step: GanStep, start: int, args: argparse.Namespace) -> tuple[float, float]:
    """Wall and CPU seconds of args.steps steps from step number start; every window of a lazy
    variant holds the same share of penalised steps when args.steps is a multiple of it."""
    real = torch.rand(args.batch_size, 3, args.image_size, args.image_size) * 2 - 1
    labels = torch.zeros(args.batch_size, dtype=torch.long)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(start, start + args.steps):
        stats = step.train(real, labels, i)
    float(stats["d_loss"])  # the only read of the losses, as at a log step
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    variants = {f"r1_every={e}": make_step(args, e, args.gamma) for e in args.every}
    variants["no penalties"] = make_step(args, 1, 0.0)
    for step in variants.values():
        window(step, 0, argparse.Namespace(**{**vars(args), "steps": 2}))  # warm-up
    times = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, step in variants.items():
            times[name].append(window(step, (r + 1) * args.steps, args))
    print(f"r3gan {args.image_size} px, width {args.width}, {args.blocks} block(s), batch "
          f"{args.batch_size}, rpgan, gamma {args.gamma}, {args.threads} thread(s), "
          f"{args.repeats} windows of {args.steps} steps; medians")  # fmt: skip
    base = None
    for name, runs in times.items():
        wall = statistics.median(w for w, _ in runs) / args.steps
        cpu = statistics.median(c for _, c in runs) / args.steps
        base = base or cpu
        print(f"  {name:>14}: {1 / wall:6.2f} steps/s, {60 / cpu:7.1f} steps and "
              f"{60 * args.batch_size / cpu:8.0f} images per CPU minute "
              f"(x{base / cpu:.2f} of the first)")  # fmt: skip


if __name__ == "__main__":
    main()
