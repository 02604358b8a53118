"""DiffAugment (Zhao et al. 2020, "Differentiable Augmentation for Data-Efficient GAN Training").

The same random, differentiable transformations are applied to real and generated images before
every forward of D (in D's step and in G's step), so D never sees an un-augmented image and G's
gradients flow back through the augmentation. Policies, as in the paper's reference code:

- color: random brightness (+-0.5), saturation (x0..2) and contrast (x0.5..1.5), per image
- translation: a random shift of up to 1/8 of the size per axis, zero padded
- cutout: a zeroed square of half the size, at a random position

Works for any number of channels (saturation does nothing to one channel) and any size. All
randomness comes from torch's global generator for the tensor's device, so a run seeded and
resumed from a checkpointed RNG state repeats its augmentations exactly.

adaptive_augment is GAN_AUGMENT=ada's version (Karras et al. 2020, StyleGAN2-ADA): a horizontal
flip, the translation, brightness, saturation, contrast and the cutout above, each applied to
each image with probability p (job/gan/ada.py moves p). An image goes un-augmented (1 - p) ** 6
of the time, which is why, for p below about 0.8, G does not learn to make augmented images
(the paper's "non-leaking" augmentations).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F


def parse_policy(text: str) -> tuple[str, ...]:
    """'translation, cutout' -> ('translation', 'cutout'); '' -> (); ValueError if unknown."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown DiffAugment policy {', '.join(unknown)}")
    return parts


def diff_augment(x: torch.Tensor, policy: str | tuple[str, ...]) -> torch.Tensor:
    """x (N x C x H x W) augmented by each policy in turn; x itself when the policy is empty."""
    if isinstance(policy, str):
        policy = parse_policy(policy)
    for name in policy:
        for fn in _FUNCTIONS[name]:
            x = fn(x)
    return x


def adaptive_augment(x: torch.Tensor, p: float) -> torch.Tensor:
    """x (N x C x H x W) with each of ADA_TRANSFORMS applied to each image with probability p,
    differentiable w.r.t. x; x itself when p is 0 (nothing drawn)."""
    if p <= 0:
        return x
    for fn in ADA_TRANSFORMS:
        chosen = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < p  # fp32 even under bf16
        x = torch.where(chosen, fn(x), x)
    return x


def _flip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(3)


def _per_image(x: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) numbers, one per image, shaped to broadcast over C x H x W."""
    return torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)


def _brightness(x: torch.Tensor) -> torch.Tensor:
    return x + (_per_image(x) - 0.5)


def _saturation(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (_per_image(x) * 2) + mean


def _contrast(x: torch.Tensor) -> torch.Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_per_image(x) + 0.5) + mean


def _translation(x: torch.Tensor, ratio: float = 0.125) -> torch.Tensor:
    n, _, h, w = x.shape
    sh, sw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    dy = torch.randint(-sh, sh + 1, (n, 1, 1), device=x.device)
    dx = torch.randint(-sw, sw + 1, (n, 1, 1), device=x.device)
    rows, cols = _grid(n, h, w, x.device)
    # pad by one zero pixel and clamp the shifted indices onto it: outside the image reads 0
    rows = torch.clamp(rows + dy + 1, 0, h + 1)
    cols = torch.clamp(cols + dx + 1, 0, w + 1)
    padded = F.pad(x, [1, 1, 1, 1]).permute(0, 2, 3, 1)  # N x H+2 x W+2 x C
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded[batch, rows, cols].permute(0, 3, 1, 2)


def _cutout(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    n, _, h, w = x.shape
    ch, cw = int(h * ratio + 0.5), int(w * ratio + 0.5)
    oy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=x.device)
    ox = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=x.device)
    rows, cols = _grid(n, ch, cw, x.device)
    rows = torch.clamp(rows + oy - ch // 2, 0, h - 1)
    cols = torch.clamp(cols + ox - cw // 2, 0, w - 1)
    mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
    mask[torch.arange(n, device=x.device)[:, None, None], rows, cols] = 0
    return x * mask.unsqueeze(1)


def _grid(n: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column indices of an h x w grid, broadcast to N x h x w."""
    rows = torch.arange(h, device=device)[None, :, None].expand(n, h, w)
    cols = torch.arange(w, device=device)[None, None, :].expand(n, h, w)
    return rows, cols


_FUNCTIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], ...]] = {
    "color": (_brightness, _saturation, _contrast),
    "translation": (_translation,),
    "cutout": (_cutout,),
}
POLICIES = tuple(_FUNCTIONS)  # GAN_DIFFAUGMENT's choices (job/settings.py checks them)
ADA_TRANSFORMS = (_flip, _translation, _brightness, _saturation, _contrast, _cutout)
