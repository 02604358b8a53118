"""GAN_MODEL=r3gan: shapes at every size, identity blocks at initialization, gradients, no
normalization, its settings, and a real run that gan-job sample and export read."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from job.gan import losses
from job.gan.models import Arch, build_discriminator, build_generator
from job.gan.r3gan import LowPass, ResidualBlock, plan
from job.infra.errors import SettingsError
from job.settings import load_settings
from tests.helpers import job_env, run_job, write_extractor, write_image_folder

SIZES = [16, 28, 32, 64, 128, 256]


def arch(size=16, channels=3, classes=0, width=8, blocks=1) -> Arch:
    return Arch("r3gan", channels, size, latent_dim=16, width=width, num_classes=classes,
                blocks=blocks)  # fmt: skip


@pytest.mark.parametrize("size,channels,classes", list(itertools.product(SIZES, [1, 3], [0, 10])))
def test_shapes_at_every_size(size, channels, classes):
    a = arch(size, channels, classes)
    g, d = build_generator(a), build_discriminator(a)
    z = torch.randn(2, 16)
    labels = torch.tensor([0, 9]) if classes else None
    with torch.no_grad():
        images = g(z, labels)
        assert images.shape == (2, channels, size, size)
        assert images.abs().max() <= 1  # tanh, as the other generators
        assert d(images, labels).shape == (2,)


def test_sizes_it_refuses():
    for size in (8, 24, 48, 512):
        with pytest.raises(ValueError, match="r3gan supports 16, 28, 32, 64, 128 and 256"):
            plan(size, 8)
    assert plan(28, 8) == (7, [32, 16, 8])  # 7, 14, 28 px
    assert plan(256, 8) == (4, [64, 64, 64, 64, 32, 16, 8])  # 4 px up to 256 px, capped at 8x


def test_every_block_is_the_identity_at_initialization():
    torch.manual_seed(0)
    for model in (build_generator(arch(32, blocks=2)), build_discriminator(arch(32, blocks=2))):
        blocks = [m for m in model.modules() if isinstance(m, ResidualBlock)]
        assert len(blocks) == 2 * 4  # 4, 8, 16, 32 px stages
        for block in blocks:
            x = torch.randn(3, block.conv1.in_channels, 8, 8)
            assert torch.equal(block(x), x)


def test_fixup_scales_the_branch_by_the_number_of_blocks():
    torch.manual_seed(0)
    few = ResidualBlock(64, 1).conv1.weight.std().item()
    torch.manual_seed(0)
    many = ResidualBlock(64, 16).conv1.weight.std().item()
    assert many / few == pytest.approx(16**-0.25, rel=1e-4)


def test_low_pass_resampling():
    x = torch.ones(1, 5, 8, 8)
    up, down = LowPass(up=True)(x), LowPass(up=False)(x)
    assert up.shape == (1, 5, 16, 16) and down.shape == (1, 5, 4, 4)
    # a constant stays constant away from the zero-padded border
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.ones(1, 5, 12, 12))
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.ones(1, 5, 2, 2))


@pytest.mark.parametrize("classes", [0, 10])
def test_gradients_reach_every_parameter(classes):
    """At initialization the zero last convolutions block the gradient of the layers before
    them (each block is the identity); after one step every parameter gets one."""
    torch.manual_seed(0)
    a = arch(32, 3, classes)
    g, d = build_generator(a), build_discriminator(a)
    params = [*g.parameters(), *d.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    z = torch.randn(4, 16)
    labels = torch.arange(4) if classes else None
    for step in range(2):
        opt.zero_grad()
        loss = d(g(z, labels), labels).square().mean() + d(torch.rand(4, 3, 32, 32), labels).mean()
        loss.backward()
        named = [*g.named_parameters(), *d.named_parameters()]
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in named)
        if step == 1:
            zero = [n for n, p in named if not p.grad.abs().sum() > 0]
            assert zero == []
        opt.step()


def test_the_projection_head_depends_on_the_label():
    torch.manual_seed(0)
    d = build_discriminator(arch(32, 3, classes=10))
    x = torch.randn(1, 3, 32, 32).repeat(4, 1, 1, 1)
    out = d(x, torch.tensor([0, 1, 2, 0]))
    assert out[0] == out[3] and out[0] != out[1] and out[1] != out[2]


def test_r1_penalty_trains_the_discriminator():
    """R1's double backward goes through the low-pass filters and the biased activations."""
    torch.manual_seed(0)
    d = build_discriminator(arch(16, 3))
    x = torch.randn(4, 3, 16, 16).requires_grad_(True)
    penalty = losses.r1_penalty(d(x), x, gamma=1.0)
    penalty.backward()
    assert penalty.item() > 0 and d.body[0].weight.grad.abs().sum() > 0


def test_no_normalization_anywhere():
    norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d,
             nn.LocalResponseNorm)  # fmt: skip
    a = arch(64, 3, 10)
    for model in (build_generator(a), build_discriminator(a)):
        for m in model.modules():
            assert not isinstance(m, norms), m
            assert not type(m).__name__.lower().endswith("norm"), m
            assert not getattr(m, "parametrizations", None), m  # no spectral norm
            assert not any("spectral" in k or "weight_g" in k for k in m._forward_pre_hooks)
    with pytest.raises(ValueError, match="no spectral norm"):
        build_discriminator(Arch(**{**a.to_dict(), "spectral_norm": True}))


def test_parameter_count_is_reasonable():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    g, d = build_generator(arch(32, 3, width=16)), build_discriminator(arch(32, 3, width=16))
    assert 50_000 < count(g) < 1_000_000 and 50_000 < count(d) < 1_000_000
    wide = build_generator(Arch("r3gan", 3, 256, 128, 64, 0, blocks=2))
    assert count(wide) < 50_000_000


def test_settings():
    s = load_settings({"GAN_MODEL": "r3gan", "GAN_IMAGE_SIZE": "256", "GAN_BLOCKS": "2"})
    assert (s.model, s.resolved_image_size, s.blocks) == ("r3gan", 256, 2)
    for size in SIZES:
        load_settings({"GAN_MODEL": "r3gan", "GAN_IMAGE_SIZE": str(size)})
    bad = [
        ({"GAN_MODEL": "r3gan", "GAN_IMAGE_SIZE": "48"}, "not supported by GAN_MODEL=r3gan"),
        ({"GAN_IMAGE_SIZE": "128"}, "GAN_MODEL=dcgan: expected one of 28, 32, 64"),
        ({"GAN_MODEL": "r3gan", "GAN_SPECTRAL_NORM": "true"}, "GAN_SPECTRAL_NORM=true"),
        ({"GAN_BLOCKS": "2"}, "GAN_BLOCKS=2 needs GAN_MODEL=r3gan"),
        ({"GAN_MODEL": "r3gan", "GAN_DEPTH": "1"}, "GAN_DEPTH=1 needs GAN_MODEL=dcgan"),
    ]
    for environ, message in bad:
        with pytest.raises(SettingsError) as info:
            load_settings(environ)
        assert message in str(info.value), (environ, str(info.value))


@pytest.mark.e2e
def test_a_real_run_that_sample_export_and_evaluate_read(tmp_path: Path):
    folder = write_image_folder(tmp_path / "images", per_class=8)
    features = write_extractor(tmp_path / "features.pt", channels=3)
    env = job_env(tmp_path, GAN_MODEL="r3gan", GAN_IMAGE_SIZE=32, GAN_DATASET=f"folder:{folder}",
                  GAN_MAX_STEPS=3, GAN_BATCH_SIZE=8, GAN_RUN_ID="r3", GAN_CONDITIONAL="true",
                  GAN_FID_FEATURES=features, GAN_FID_EVERY=3, GAN_FID_NUM_SAMPLES=16)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "runs" / "r3"
    assert (run / "final" / "generator.pt").is_file()
    out = tmp_path / "grid.png"
    result = run_job(env, "sample", "--checkpoint", str(run), "--num", "4", "--out", str(out))
    assert result.returncode == 0 and out.is_file(), result.stdout + result.stderr
    exported = tmp_path / "g.pt"
    result = run_job(env, "export", str(run), "--out", str(exported))
    assert result.returncode == 0, result.stdout + result.stderr
    g = torch.jit.load(str(exported))
    images = g(torch.randn(2, 16), torch.tensor([0, 1]))
    assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    scores = tmp_path / "scores.json"
    result = run_job(env, "evaluate", str(run), "--num", "16", "--out", str(scores))
    assert result.returncode == 0, result.stdout + result.stderr
    values = json.loads(scores.read_text())
    assert values["step"] == 3 and values["num_samples"] == 16 and math.isfinite(values["fid"])


# ---------------------------------------------------------------- precision under autocast

FLOAT32_STAGES = {32: {4}, 256: {4, 8, 16}}  # StyleGAN2's num_fp16_res=4, never 4 x 4 in bf16


@pytest.mark.parametrize("size", [32, 256])
def test_under_bf16_autocast_the_low_resolution_stages_run_in_float32(size):
    """The four highest resolutions in bf16, the stages below them in float32, as StyleGAN2
    and R3GAN do with num_fp16_res=4; D's logits in float32."""
    torch.manual_seed(0)
    a = arch(size, 3, classes=10, width=8 if size == 32 else 1)
    g, d = build_generator(a), build_discriminator(a)
    found = {"g": [], "d": []}  # (resolution, dtype) of each residual block's output, in order
    for name, model in (("g", g), ("d", d)):
        for block in model.body:
            if isinstance(block, ResidualBlock):
                block.register_forward_hook(
                    lambda m, args, out, n=name: found[n].append((out.shape[-1], out.dtype))
                )
    layers = {"g": [], "d": []}  # the dtype of every layer's output
    for name, model in (("g", g), ("d", d)):
        for layer in model.body:
            layer.register_forward_hook(lambda m, a, out, n=name: layers[n].append(out.dtype))
    labels = torch.tensor([3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = g(torch.randn(1, 16), labels)
        logits = d(images, labels)
    for name in ("g", "d"):
        assert found[name], name
        for resolution, dtype in found[name]:
            low = resolution in FLOAT32_STAGES[size]
            assert dtype == (torch.float32 if low else torch.bfloat16), (name, resolution)
    # one switch of precision in each: G from float32 up to bf16, D from bf16 down to float32
    g32, d32 = ([t == torch.float32 for t in layers[n]] for n in ("g", "d"))
    assert g32 == sorted(g32, reverse=True) and d32 == sorted(d32)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images).all()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


def previous_forward_g(g, z, labels):
    """R3GANGenerator.forward before mixed precision: one nn.Sequential call."""
    if g.embed is not None:
        z = torch.cat([z, g.embed(labels)], dim=1)
    x = g.linear(z).view(-1, g.first, g.base, g.base) + g.const
    return torch.tanh(g.to_image(g.body(x)))


def previous_forward_d(d, x, labels):
    phi = d.act(d.features(d.body(x).flatten(1)))
    logits = d.out(phi).squeeze(1)
    return logits + (d.embed(labels) * phi).sum(1) if d.embed is not None else logits


@pytest.mark.parametrize("size", [28, 32])
def test_without_autocast_the_outputs_are_those_of_the_plain_forward_bit_for_bit(size):
    torch.manual_seed(0)
    a = arch(size, 3, classes=10)
    g, d = build_generator(a), build_discriminator(a)
    for p in d.parameters():  # no zero last convolutions: every branch counts
        p.data.add_(torch.randn_like(p) * 0.05)
    z, labels = torch.randn(3, 16), torch.tensor([0, 4, 9])
    with torch.no_grad():
        images = g(z, labels)
        assert torch.equal(images, previous_forward_g(g, z, labels))
        assert torch.equal(d(images, labels), previous_forward_d(d, images, labels))
    keys = {k.split(".")[0] for k in [*g.state_dict(), *d.state_dict()]}
    assert keys == {"embed", "linear", "const", "body", "to_image", "features", "act", "out"}


def test_mixed_precision_traces_and_compiles_without_graph_breaks():
    """torch.jit.trace and torch.export (gan-job export) see no autocast region; dynamo
    (GAN_COMPILE) follows the float32 regions under autocast in one graph."""
    torch.manual_seed(0)
    g = build_generator(arch(32, 3))
    z = torch.randn(2, 16)
    with torch.no_grad():
        expected = g(z)
        assert torch.equal(torch.jit.trace(g, (z,))(z), expected)
        assert torch.equal(torch.export.export(g, (z,)).module()(z), expected)
    compiled = torch.compile(g, backend="eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(compiled(z), g(z))
