import itertools

import pytest
import torch

from job.models import Arch, build_discriminator, build_generator

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
