"""Generators and discriminators: the MLP GAN, DCGAN, and their class-conditional variants;
R3GAN's residual networks live in job/gan/r3gan.py and are built here too.

Discriminators return logits (one per image); the losses apply the sigmoid. Conditional models
take integer labels: G appends a label embedding to z, D appends one to its input (the MLP) or
as extra constant image planes (DCGAN) -- or, with `projection`, D projects its features onto a
label embedding (Miyato & Koyama 2018). With `spectral_norm`, every Conv/Linear of D (and the
projection embedding) is spectrally normalised and D has no BatchNorm (SN-GAN).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from functools import partial

import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from job.gan.r3gan import R3GANDiscriminator, R3GANGenerator


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild a generator or discriminator; saved with every export."""

    model: str  # mlp | dcgan | r3gan
    channels: int
    image_size: int
    latent_dim: int
    width: int
    num_classes: int  # 0: unconditional
    spectral_norm: bool = False  # D: spectral norm on every Conv/Linear, no BatchNorm
    projection: bool = False  # conditional D: projection instead of concatenated labels
    depth: int = 0  # DCGAN: 3x3 stride-1 blocks added at each resolution between the ends
    blocks: int = 0  # r3gan: residual blocks per stage

    def to_dict(self) -> dict:
        """The fields, leaving out later additions at their defaults, so that the dicts of
        checkpoints made before those fields existed still equal the dict of the same model."""
        return {k: v for k, v in asdict(self).items() if k not in _ADDED or v != _ADDED[k]}


# fields added later, and their defaults
_ADDED = {"spectral_norm": False, "projection": False, "depth": 0, "blocks": 0}


def arch_changes(saved: dict, now: dict) -> list[str]:
    """How two to_dict() outputs differ, field by field, in words."""
    a, b = {**_ADDED, **saved}, {**_ADDED, **now}
    names = [f.name for f in fields(Arch)]
    return [
        f"{k} {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
        for k in names
        if a.get(k) != b.get(k)
    ]


def _dcgan_plan(image_size: int) -> tuple[int, int]:
    """(base spatial size, number of x2 up/down-samplings) for 28, 32 and 64 pixels."""
    base = 7 if image_size % 7 == 0 else 4
    ups = int(math.log2(image_size // base))
    if base * 2**ups != image_size:
        raise ValueError(
            f"DCGAN supports 28, 32 and 64 pixels, not {image_size} (GAN_MODEL=r3gan: 16 to 256)"
        )
    return base, ups


class MLPGenerator(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        c = arch.num_classes
        self.embed = nn.Embedding(c, c) if c else None
        h = arch.width * 2  # 128 at the default width, as in the classic MLP GAN
        dims = [arch.latent_dim + c, h, h * 2, h * 4, h * 8]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims, dims[1:], strict=False)):
            layers.append(nn.Linear(d_in, d_out))
            if i > 0:
                layers.append(nn.BatchNorm1d(d_out))
            layers.append(nn.LeakyReLU(0.2))
        out = arch.channels * arch.image_size**2
        self.net = nn.Sequential(*layers, nn.Linear(dims[-1], out), nn.Tanh())

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        a = self.arch
        return self.net(z).view(-1, a.channels, a.image_size, a.image_size)


class Projection(nn.Module):
    """Projection head (Miyato & Koyama 2018): linear(phi) + <embed(y), phi>."""

    def __init__(self, features: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)
        self.embed = nn.Embedding(num_classes, features)
        nn.init.xavier_uniform_(self.embed.weight)  # N(0, 1) would swamp linear(phi) at first

    def forward(self, phi: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.linear(phi).squeeze(1) + (self.embed(labels) * phi).sum(1)


class MLPDiscriminator(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        c = arch.num_classes
        self.project = arch.projection and c > 0
        self.embed = nn.Embedding(c, c) if c and not self.project else None
        h = arch.width * 2
        d_in = arch.channels * arch.image_size**2 + (c if self.embed is not None else 0)
        body = [
            nn.Linear(d_in, h * 4),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
            nn.Linear(h * 4, h * 2),
            nn.LeakyReLU(0.2),
            nn.Dropout(0.3),
        ]
        if self.project:  # phi: the last hidden layer
            self.net = nn.Sequential(*body)
            self.head = Projection(h * 2, c)
        else:
            self.net = nn.Sequential(*body, nn.Linear(h * 2, 1))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = x.flatten(1)
        if self.project:
            return self.head(self.net(x), labels)
        if self.embed is not None:
            x = torch.cat([x, self.embed(labels)], dim=1)
        return self.net(x).squeeze(1)


def _same_size_blocks(
    ch: int, depth: int, batchnorm: bool, act: Callable[[], nn.Module]
) -> list[nn.Module]:
    """depth 3x3 convolutions that keep the resolution and the channels (GAN_DEPTH)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Conv2d(ch, ch, 3, 1, 1, bias=False))
        if batchnorm:
            layers.append(nn.BatchNorm2d(ch))
        layers.append(act())
    return layers


class DCGANGenerator(nn.Module):
    """Radford et al.: a projection to base x base, then stride-2 transposed convolutions."""

    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        c = arch.num_classes
        self.embed = nn.Embedding(c, c) if c else None
        base, ups = _dcgan_plan(arch.image_size)
        ch = arch.width * 2 ** (ups - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(arch.latent_dim + c, ch, base, 1, 0, bias=False),
            nn.BatchNorm2d(ch),
            nn.ReLU(True),
        ]
        layers += _same_size_blocks(ch, arch.depth, True, partial(nn.ReLU, True))
        for _ in range(ups - 1):
            layers += [
                nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(ch // 2),
                nn.ReLU(True),
            ]
            ch //= 2
            layers += _same_size_blocks(ch, arch.depth, True, partial(nn.ReLU, True))
        layers += [nn.ConvTranspose2d(ch, arch.channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = torch.cat([z, self.embed(labels)], dim=1)
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        c = arch.num_classes
        self.project = arch.projection and c > 0
        self.embed = nn.Embedding(c, c) if c and not self.project else None
        base, downs = _dcgan_plan(arch.image_size)
        bn, act = not arch.spectral_norm, partial(nn.LeakyReLU, 0.2, inplace=True)
        ch = arch.width
        layers: list[nn.Module] = [
            nn.Conv2d(
                arch.channels + (c if self.embed is not None else 0), ch, 4, 2, 1, bias=False
            ),
            act(),
        ]
        layers += _same_size_blocks(ch, arch.depth, bn, act)
        for _ in range(downs - 1):
            layers.append(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False))
            if bn:
                layers.append(nn.BatchNorm2d(ch * 2))
            layers.append(act())
            ch *= 2
            layers += _same_size_blocks(ch, arch.depth, bn, act)
        if self.project:
            # phi: all of the last block's activations, as the unconditional head sees them
            # (summed over space, as in Miyato & Koyama's ResNets, D learns far slower here)
            self.net = nn.Sequential(*layers)
            self.head = Projection(ch * base * base, c)
        else:
            layers.append(nn.Conv2d(ch, 1, base, 1, 0, bias=False))
            self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.project:
            return self.head(self.net(x).flatten(1), labels)
        if self.embed is not None:
            planes = self.embed(labels)[:, :, None, None].expand(-1, -1, *x.shape[2:])
            x = torch.cat([x, planes], dim=1)
        return self.net(x).flatten()


def _dcgan_init(module: nn.Module) -> None:
    """Weights from N(0, 0.02), BatchNorm scales from N(1, 0.02), as the DCGAN paper prescribes."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def build_generator(arch: Arch) -> nn.Module:
    if arch.model == "mlp":
        return MLPGenerator(arch)
    if arch.model == "r3gan":
        return R3GANGenerator(arch)  # its own (fix-up) initialization
    g = DCGANGenerator(arch)
    g.apply(_dcgan_init)
    return g


def build_discriminator(arch: Arch) -> nn.Module:
    if arch.model == "r3gan":
        if arch.spectral_norm:
            raise ValueError("r3gan has no normalization of any kind: no spectral norm")
        return R3GANDiscriminator(arch)
    if arch.model == "mlp":
        d = MLPDiscriminator(arch)
    else:
        d = DCGANDiscriminator(arch)
        d.apply(_dcgan_init)
    if arch.spectral_norm:
        apply_spectral_norm(d)
    return d


def apply_spectral_norm(module: nn.Module) -> nn.Module:
    """Spectral norm (one power iteration per forward) on every Conv/Linear and on the
    projection embedding; concatenated label embeddings are inputs, not layers, and stay as
    they are."""
    for m in list(module.modules()):
        if isinstance(m, nn.Conv2d | nn.Linear):
            _spectral_norm(m)
        elif isinstance(m, Projection):
            _spectral_norm(m.embed)
    return module
