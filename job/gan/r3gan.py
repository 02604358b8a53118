"""GAN_MODEL=r3gan: a plain residual G and D after the R3GAN baseline (Huang, Gokaslan,
Kuleshov and Tompkin, NeurIPS 2024, "The GAN is dead; long live the GAN!"), written here.

Each stage holds `blocks` residual blocks x + conv1x1(act(grouped conv3x3(act(conv1x1(x)))))
(expansion 2, 16 channels per group), with leaky ReLU 0.2 after a learned bias and no
normalization of any kind. Fix-up initialization: the first two convolutions of a block are
scaled by L^-1/4 for the L blocks of the network and the last is zero, so every block starts as
the identity. Resolution changes by 2 with a [1,3,3,1] low-pass filter applied depthwise.

Stages run from the image size down to 4 x 4 (7 x 7 for 28 px); the stage k halvings below the
image has min(width * 2^k, 8 * width) channels. G: linear(z [+ label embedding]) reshaped to the
first stage plus a learned constant, the stages upwards, a 1x1 convolution to the image and tanh
(images in [-1, 1], as the other generators). D: a 1x1 convolution from the image, the stages
downwards, a linear layer to features phi and one logit per image: linear(phi), plus
<embed(label), phi> for a conditional model (a projection head, whatever GAN_CONDITIONING says).

Under autocast (GAN_AMP=bf16) the layers of the stages below max(image size / 8, 8) pixels run
in float32, as StyleGAN2 and R3GAN keep all but the four highest resolutions (num_fp16_res=4)
out of reduced precision: G's input and first stages, D's last stages and its head (so D's
logits are float32); the higher stages, the resampling into them and the 1x1 convolutions to
and from the image run in bf16. Without autocast nothing changes.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 2
GROUP_CHANNELS = 16
SLOPE = 0.2
CAP = 8  # the widest stage: 8 x width
SIZES = (16, 28, 32, 64, 128, 256)  # powers of two, and 28 (a 7 x 7 start) for MNIST
REDUCED_STAGES = 4  # StyleGAN2's and R3GAN's num_fp16_res: the highest resolutions in bf16


def plan(image_size: int, width: int) -> tuple[int, list[int]]:
    """(base size, channels of each stage from the base up to the image size)."""
    if image_size not in SIZES:
        raise ValueError(f"r3gan supports 16, 28, 32, 64, 128 and 256 pixels, not {image_size}")
    base = 7 if image_size == 28 else 4
    ups = round(math.log2(image_size / base))
    return base, [min(width * 2**k, CAP * width) for k in range(ups, -1, -1)]


def float32_below(image_size: int) -> int:
    """Under autocast, the stages at resolutions below this run in float32 (StyleGAN2's
    fp16_resolution: the REDUCED_STAGES highest resolutions, and never 4 x 4, in bf16)."""
    return max(image_size >> (REDUCED_STAGES - 1), 8)


def _float32(x: torch.Tensor):
    """A region in float32 while autocast is on for x's device (else no region at all)."""
    kind = x.device.type
    if torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def _run(body: nn.Sequential, float32: list[bool], x: torch.Tensor) -> torch.Tensor:
    """body's layers in turn, those flagged in float32 under autocast (their input cast)."""
    if not torch.is_autocast_enabled(x.device.type):
        return body(x)
    for layer, full in zip(body, float32, strict=True):
        if full:
            with _float32(x):
                x = layer(x.float())
        else:
            x = layer(x)
    return x


class BiasedLeakyReLU(nn.Module):
    """leaky_relu(x + b, 0.2) with a learned bias b per channel (the convolutions have none)."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return F.leaky_relu(x + self.bias.to(x.dtype).view(shape), SLOPE)  # bf16 stays bf16


def _groups(channels: int) -> int:
    """About 16 channels per group, a divisor of channels."""
    groups = max(1, channels // GROUP_CHANNELS)
    while channels % groups:
        groups -= 1
    return groups


def _he(weight: torch.Tensor, scale: float = 1.0) -> None:
    nn.init.kaiming_normal_(weight, a=SLOPE, nonlinearity="leaky_relu")
    with torch.no_grad():
        weight.mul_(scale)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, num_blocks: int):
        super().__init__()
        hidden = channels * EXPANSION
        self.conv1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.act1 = BiasedLeakyReLU(hidden)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, groups=_groups(hidden), bias=False)
        self.act2 = BiasedLeakyReLU(hidden)
        self.conv3 = nn.Conv2d(hidden, channels, 1, bias=False)
        scale = num_blocks**-0.25  # fix-up: L^(-1/(2m-2)) for m = 3 layers in the branch
        _he(self.conv1.weight, scale)
        _he(self.conv2.weight, scale)
        nn.init.zeros_(self.conv3.weight)  # the block starts as the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv3(self.act2(self.conv2(self.act1(self.conv1(x)))))


class LowPass(nn.Module):
    """x2 up- or down-sampling through the [1,3,3,1] filter, applied depthwise."""

    def __init__(self, up: bool):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = torch.outer(k, k)
        k = k / k.sum() * (4 if up else 1)  # zero-stuffing keeps a quarter of the samples
        self.register_buffer("kernel", k[None, None], persistent=False)
        self.up = up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        k = self.kernel.to(x.dtype).expand(c, 1, 4, 4)
        if self.up:
            return F.conv_transpose2d(x, k, stride=2, padding=1, groups=c)
        return F.conv2d(x, k, stride=2, padding=1, groups=c)


def _stage(channels: int, blocks: int, total: int) -> list[nn.Module]:
    return [ResidualBlock(channels, total) for _ in range(blocks)]


class R3GANGenerator(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        c = arch.num_classes
        self.embed = nn.Embedding(c, c) if c else None
        base, chans = plan(arch.image_size, arch.width)
        self.base, self.first = base, chans[0]
        total = arch.blocks * len(chans)
        self.linear = nn.Linear(arch.latent_dim + c, chans[0] * base * base)
        self.const = nn.Parameter(torch.randn(chans[0], base, base))
        layers: list[nn.Module] = [BiasedLeakyReLU(chans[0]), *_stage(chans[0], arch.blocks, total)]
        sizes = [base] * len(layers)  # the stage each layer belongs to, by its resolution
        for k, (c_in, c_out) in enumerate(zip(chans, chans[1:], strict=False), start=1):
            stage = [nn.Conv2d(c_in, c_out, 1, bias=False), LowPass(up=True)]
            stage += _stage(c_out, arch.blocks, total)
            layers += stage
            sizes += [base << k] * len(stage)
        self.body = nn.Sequential(*layers)
        self.float32_layers = [size < float32_below(arch.image_size) for size in sizes]
        self.to_image = nn.Conv2d(chans[-1], arch.channels, 1)
        for m in self.body:
            if isinstance(m, nn.Conv2d):
                _he(m.weight)

    def forward(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        with _float32(z):
            if self.embed is not None:
                z = torch.cat([z, self.embed(labels)], dim=1)
            x = self.linear(z).view(-1, self.first, self.base, self.base) + self.const
        return torch.tanh(self.to_image(_run(self.body, self.float32_layers, x)))


class R3GANDiscriminator(nn.Module):
    def __init__(self, arch):
        super().__init__()
        self.arch = arch
        c = arch.num_classes
        base, chans = plan(arch.image_size, arch.width)
        chans = chans[::-1]  # from the image down to the base
        total = arch.blocks * len(chans)
        layers: list[nn.Module] = [
            nn.Conv2d(arch.channels, chans[0], 1, bias=False),
            BiasedLeakyReLU(chans[0]),
        ]
        sizes = [arch.image_size] * len(layers)  # the stage each layer belongs to
        for k, (c_in, c_out) in enumerate(zip(chans, chans[1:], strict=False)):
            stage = _stage(c_in, arch.blocks, total)
            stage += [LowPass(up=False), nn.Conv2d(c_in, c_out, 1, bias=False)]
            layers += stage
            sizes += [arch.image_size >> k] * len(stage)
        layers += _stage(chans[-1], arch.blocks, total)
        sizes += [base] * arch.blocks
        self.body = nn.Sequential(*layers)
        self.float32_layers = [size < float32_below(arch.image_size) for size in sizes]
        features = chans[-1]
        self.features = nn.Linear(features * base * base, features, bias=False)
        self.act = BiasedLeakyReLU(features)
        self.out = nn.Linear(features, 1)
        self.embed = nn.Embedding(c, features) if c else None  # the projection head
        if self.embed is not None:
            nn.init.xavier_uniform_(self.embed.weight)
        for m in [*self.body, self.features]:
            if isinstance(m, nn.Conv2d | nn.Linear):
                _he(m.weight)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        x = _run(self.body, self.float32_layers, x)
        with _float32(x):  # the head, at the base resolution (the body ends in float32)
            phi = self.act(self.features(x.flatten(1)))
            logits = self.out(phi).squeeze(1)
            if self.embed is not None:
                logits = logits + (self.embed(labels) * phi).sum(1)
        return logits
