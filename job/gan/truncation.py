"""The truncation trick: z drawn from N(0, 1) truncated to [-t, t] (BigGAN's distribution),
made from standard-normal z by a monotone map, so that a seed's image moves smoothly with psi."""

from __future__ import annotations

import math

import torch

TRUNCATION_HELP = (
    "truncation trick, 0 < PSI <= 1 (default 1: off): every component of z is drawn from "
    "N(0, 1) truncated to [-t, t], t = the (1 + PSI)/2 quantile of N(0, 1), i.e. PSI is the "
    "share of the normal's mass kept (0.9: |z_i| <= 1.645; 0.7: 1.036; 0.5: 0.674): the "
    "distribution of BigGAN's trick (|z_i| > t drawn again), made by mapping each drawn z_i "
    "to Phi^-1((1 - PSI)/2 + PSI Phi(z_i)) (Phi: the normal CDF), so a seed's image changes "
    "smoothly with PSI"
)


def truncation_bound(psi: float) -> float:
    """t with P(|z_i| <= t) = psi for z_i ~ N(0, 1): every truncated component lies in [-t, t]."""
    return math.inf if psi >= 1 else float(torch.special.ndtri(torch.tensor((1 + psi) / 2.0)))


def truncate(z: torch.Tensor, psi: float) -> torch.Tensor:
    """Standard-normal z, each component moved onto N(0, 1) truncated to [-t, t] (the
    distribution of BigGAN's truncation trick, |z_i| > t resampled), t = truncation_bound(psi):
    z_i -> inverse-CDF((1 - psi) / 2 + psi CDF(z_i)), monotone in z_i, so a seed's image moves
    smoothly with psi. psi = 1: z itself."""
    if psi >= 1:
        return z
    u = torch.special.ndtr(z.double())
    return torch.special.ndtri((1 - psi) / 2 + psi * u).to(z.dtype)


class Truncated(torch.nn.Module):
    """A generator fed truncate(z, psi) instead of z."""

    def __init__(self, g: torch.nn.Module, psi: float):
        super().__init__()
        self.g, self.psi = g, psi

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        return self.g(truncate(z, self.psi), labels)
