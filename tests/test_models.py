import copy
import itertools

import pytest
import torch

from job.gan.models import Arch, build_discriminator, build_generator

CASES = list(itertools.product(["mlp", "dcgan"], [28, 32, 64], [1, 3], [0, 10]))


@pytest.mark.parametrize("model,size,channels,classes", CASES)
def test_generator_and_discriminator_shapes(model, size, channels, classes):
    arch = Arch(model, channels, size, latent_dim=16, width=8, num_classes=classes)
    g, d = build_generator(arch), build_discriminator(arch)
    z = torch.randn(4, 16)
    labels = torch.tensor([0, 3, 9, 1]) if classes else None
    images = g(z, labels)
    assert images.shape == (4, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1
    assert d(images, labels).shape == (4,)


def test_conditional_generator_depends_on_the_label():
    arch = Arch("dcgan", 1, 28, latent_dim=16, width=8, num_classes=10)
    g = build_generator(arch).eval()
    z = torch.randn(1, 16).repeat(2, 1)
    a, b = g(z, torch.tensor([0, 1]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("size,channels,classes", [(28, 1, 0), (64, 3, 10)])
def test_channels_last_models_compute_what_contiguous_ones_do(size, channels, classes):
    arch = Arch("dcgan", channels, size, latent_dim=16, width=8, num_classes=classes)
    torch.manual_seed(0)
    g, d = build_generator(arch), build_discriminator(arch)
    g_cl = copy.deepcopy(g).to(memory_format=torch.channels_last)
    d_cl = copy.deepcopy(d).to(memory_format=torch.channels_last)
    z = torch.randn(8, 16)
    labels = torch.arange(8) % classes if classes else None
    images, images_cl = g(z, labels), g_cl(z, labels)
    assert images_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(images_cl, images, atol=1e-5, rtol=1e-4)
    d(images, labels).sum().backward()
    d_cl(images_cl, labels).sum().backward()
    for (name, p), p_cl in zip(g.named_parameters(), g_cl.parameters(), strict=True):
        torch.testing.assert_close(p_cl.grad, p.grad, atol=1e-5, rtol=1e-3, msg=name)


@pytest.mark.parametrize("size,projection", [(28, False), (32, True), (64, False)])
def test_deeper_dcgan_keeps_its_shapes_and_adds_a_block_per_resolution(size, projection):
    base = Arch("dcgan", 1, size, latent_dim=16, width=8, num_classes=10, projection=projection)
    deep = Arch(**{**base.to_dict(), "depth": 2})
    resolutions = {28: 2, 32: 3, 64: 4}[size]  # between G's input and its output
    g, d = build_generator(deep), build_discriminator(deep)
    assert _convs(g) - _convs(build_generator(base)) == 2 * resolutions
    assert _convs(d) - _convs(build_discriminator(base)) == 2 * resolutions
    labels = torch.tensor([0, 3, 9, 1])
    images = g(torch.randn(4, 16), labels)
    assert images.shape == (4, 1, size, size) and d(images, labels).shape == (4,)
    assert Arch(**deep.to_dict()) == deep and "depth" not in base.to_dict()


def _convs(net: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
