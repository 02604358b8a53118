"""The R3GAN schedule (Huang et al. 2024, "The GAN is dead; long live the GAN!"): the learning
rates, Adam's beta2, the R1/R2 gammas and the EMA half-life as functions of the images seen.

Every value follows half a cosine from its start at 0 images to its end at the horizon, and
stays there after it: the learning rates from GAN_LR_G/GAN_LR_D down to a quarter (R3GAN: 2e-4
to 5e-5), beta2 from GAN_BETA2 up to 0.99, the gammas down tenfold, and the EMA generator's
half-life up from 0 (the EMA is G itself at first) to the half-life GAN_EMA_DECAY gives at the
global batch. Being pure functions of the images seen, which a checkpoint restores, a resumed
run goes on along the same curves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_END = 0.25  # of the configured rates
BETA2_END = 0.99
GAMMA_END = 0.1  # of GAN_R1_GAMMA / GAN_R2_GAMMA


@dataclass(frozen=True)
class Point:
    """The schedule's values at some number of images seen."""

    lr_factor: float  # times GAN_LR_G / GAN_LR_D
    beta2: float
    gamma_factor: float  # times GAN_R1_GAMMA / GAN_R2_GAMMA
    ema_half_life: float  # in images


@dataclass(frozen=True)
class R3Schedule:
    horizon: int  # images over which the values move from start to end
    beta2: float  # at the start (GAN_BETA2)
    ema_half_life: float  # in images, at the horizon

    def at(self, images_seen: int) -> Point:
        return Point(
            lr_factor=cosine(1.0, LR_END, images_seen, self.horizon),
            beta2=cosine(self.beta2, BETA2_END, images_seen, self.horizon),
            gamma_factor=cosine(1.0, GAMMA_END, images_seen, self.horizon),
            ema_half_life=cosine(0.0, self.ema_half_life, images_seen, self.horizon),
        )


def cosine(start: float, end: float, at: float, horizon: float) -> float:
    """From start at 0 to end at the horizon along half a cosine; end after it."""
    x = min(1.0, at / horizon)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * x))


def half_life(decay: float, images_per_step: int) -> float:
    """The EMA half-life, in images, of a per-step decay (0: no averaging)."""
    return images_per_step * math.log(0.5) / math.log(decay) if decay > 0 else 0.0


def ema_beta(half_life_images: float, images_per_step: int) -> float:
    """The per-step EMA decay of a half-life in images (StyleGAN2's ema_beta)."""
    return 0.5 ** (images_per_step / half_life_images) if half_life_images > 0 else 0.0
