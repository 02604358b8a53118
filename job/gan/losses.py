"""Adversarial losses on discriminator logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def d_loss_bce(real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0):
    """D's loss: real images toward 1 - smoothing (one-sided label smoothing), fakes toward 0."""
    real = F.binary_cross_entropy_with_logits(
        real_logits, torch.full_like(real_logits, 1 - smoothing)
    )
    fake = F.binary_cross_entropy_with_logits(fake_logits, torch.zeros_like(fake_logits))
    return real + fake


def g_loss_bce(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss: maximise log D(G(z)) rather than minimise log(1 - D(G(z)))."""
    return F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits))


def d_loss_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge D loss (Lim & Ye 2017; SN-GAN, BigGAN): mean(relu(1 - real)) + mean(relu(1 + fake))."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def g_loss_hinge(fake_logits: torch.Tensor) -> torch.Tensor:
    """Hinge G loss: -mean(D(G(z)))."""
    return -fake_logits.mean()


def d_loss_rpgan(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing D loss (Jolicoeur-Martineau 2019; R3GAN, Huang et al. 2024):
    mean(softplus(-(D(x_i) - D(G(z_i))))), real and fake paired index by index."""
    return F.softplus(fake_logits - real_logits).mean()


def g_loss_rpgan(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing G loss: the D loss with real and fake swapped."""
    return F.softplus(real_logits - fake_logits).mean()


def d_loss(
    kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor, smoothing: float = 0.0
) -> torch.Tensor:
    """D's loss of kind bce | hinge | rpgan; label smoothing applies to bce only."""
    if kind == "hinge":
        return d_loss_hinge(real_logits, fake_logits)
    if kind == "rpgan":
        return d_loss_rpgan(real_logits, fake_logits)
    return d_loss_bce(real_logits, fake_logits, smoothing)


def g_loss(
    kind: str, fake_logits: torch.Tensor, real_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """G's loss of kind bce (non-saturating) | hinge | rpgan (which needs D's real logits)."""
    if kind == "hinge":
        return g_loss_hinge(fake_logits)
    if kind == "rpgan":
        if real_logits is None:
            raise ValueError("rpgan's G loss pairs the fakes with real images' logits")
        return g_loss_rpgan(fake_logits, real_logits)
    return g_loss_bce(fake_logits)


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor, gamma: float) -> torch.Tensor:
    """gamma/2 * E ||grad_x D(x)||^2 over the images D was called on: R1 on real images,
    R2 on fakes (Mescheder et al. 2018; both in R3GAN).

    inputs is the tensor D was called on, made with requires_grad_(); the graph is kept
    (create_graph) so that the penalty's own backward reaches D's weights.
    """
    (grad,) = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return gamma / 2 * grad.float().square().flatten(1).sum(1).mean()


r1_penalty = gradient_penalty  # on real images
r2_penalty = gradient_penalty  # on fake images
