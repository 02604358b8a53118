"""GAN_AUGMENT=ada: the augmentation probability p of StyleGAN2-ADA (Karras et al. 2020), moved
by how sure D is of the real images it trains on.

The overfitting heuristic r_t = E[sign(D(real))] is 0 when D cannot tell the training images
from fakes and 1 when it is sure of every one, as it comes to be when it memorises a small
dataset. Every `interval` steps p moves toward r_t = target: up while r_t is above the target,
down while below, by the real images seen since the last move over speed_images (so p takes at
least speed_images images to go from 0 to 1), and stays within [0, 1].
"""

from __future__ import annotations

import torch

from job.gan import augment
from job.infra import distributed


class AdaptiveAugment:
    """The checkpoint's `augment`. observe() adds up D's signs on the device (no host sync per
    step); step_done() sums them over the ranks in one collective before moving p, so every rank
    holds the same p. The state is p and the sums not yet used, so a resumed run moves p as an
    uninterrupted one would."""

    def __init__(
        self, world: distributed.World, *, target: float, interval: int, speed_images: int
    ):
        self.world, self.target = world, target
        self.interval, self.speed_images = interval, speed_images
        self.p = 0.0
        # since the last move: the sum of sign(D(real)) and the number of real images
        self.sums = torch.zeros(2, dtype=torch.float64, device=world.device)

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of x (real or fake) at the current p."""
        return augment.adaptive_augment(x, self.p)

    def observe(self, d_real: torch.Tensor) -> None:
        """D's outputs (logits) on one forward's augmented real images."""
        self.sums[0] += torch.sign(d_real.detach()).sum()
        self.sums[1] += d_real.shape[0]

    def step_done(self, steps: int) -> None:
        """After each training step, on every rank (steps: the run's steps done): every
        interval steps, p moves."""
        if steps % self.interval == 0:
            self._adjust(*distributed.sum_over_ranks(self.sums, self.world).tolist())
            self.sums.zero_()

    def _adjust(self, signs: float, images: float) -> None:
        if images == 0:
            return
        rt = signs / images
        direction = (rt > self.target) - (rt < self.target)
        self.p = min(max(self.p + direction * images / self.speed_images, 0.0), 1.0)

    def record(self) -> dict[str, float]:
        """The fields of a metrics.jsonl or eval.jsonl row."""
        return {"augment_p": round(self.p, 6)}

    def state_dict(self) -> dict:
        """p and the sums over all ranks (a collective: every rank calls it)."""
        return {"p": self.p, "sums": distributed.sum_over_ranks(self.sums, self.world).cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the saved sums, the others none: the next move sums to the same totals,
        under any world size."""
        self.p = float(state["p"])
        sums = state["sums"] if self.world.is_main else torch.zeros(2, dtype=torch.float64)
        self.sums = sums.to(self.world.device, torch.float64).clone()

    def start_fresh(self) -> None:
        self.p = 0.0
        self.sums.zero_()
