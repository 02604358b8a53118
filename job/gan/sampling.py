"""Images from a generator: the fixed noise (and labels) of a seed, the generator's images in
[0, 1], uint8 pixels and PNG grids of them."""

from __future__ import annotations

import io

import torch
import torchvision
from torch import nn


def fixed_inputs(
    latent_dim: int, num: int, num_classes: int, seed: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (and labels cycling through the classes) that are the same for a given seed."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(num, latent_dim, generator=g).to(device)
    labels = torch.arange(num, device=device) % num_classes if num_classes else None
    return z, labels


@torch.no_grad()
def generate(g: nn.Module, z: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Images in [0, 1] from a generator in eval mode (restoring its mode afterwards)."""
    was_training = g.training
    g.eval()
    try:
        return (g(z, labels).float() + 1) / 2
    finally:
        g.train(was_training)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats to uint8 pixels."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def grid_png(images: torch.Tensor, nrow: int) -> bytes:
    """A PNG grid of images in [0, 1]."""
    grid = torchvision.utils.make_grid(images.cpu(), nrow=nrow, padding=2, pad_value=1.0)
    from PIL import Image

    array = to_uint8(grid).permute(1, 2, 0).numpy()
    img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
