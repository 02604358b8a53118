"""One training step of the GAN: D's update, then G's, then the EMA generator's.

The step owns what it computes (the recipe: loss, label smoothing, lazy R1, DiffAugment, bf16
autocast), the gradient norms it leaves behind, and the non-finite flag: set on the device
inside the step and read only where the loop syncs anyway, so no step waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from job import augment, distributed, losses
from job.networks import Networks, no_sync


@dataclass(frozen=True)
class Recipe:
    """What one training step computes."""

    loss: str  # bce | hinge
    label_smoothing: float
    r1_gamma: float  # 0: no R1 penalty
    r1_every: int
    diffaugment: str  # DiffAugment policy before every D forward ("": none)
    amp: bool  # bf16 autocast


class GanStep:
    def __init__(self, nets: Networks, recipe: Recipe, *, device: torch.device):
        self.nets, self.recipe, self.device = nets, recipe, device
        self.latent_dim, self.num_classes = nets.arch.latent_dim, nets.arch.num_classes
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def train(self, real: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One D and one G update on a batch of real images at the run's step; the losses and
        D's outputs, still on the device."""
        r, nets, b = self.recipe, self.nets, real.shape[0]
        g, d = nets.g, nets.d
        if nets.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(b, self.latent_dim, device=self.device)
        fake_labels = self._random_labels(b)
        # lazy R1 (StyleGAN2): every r1_every steps, scaled by the interval; in this same
        # backward, so that DDP sees one backward per set of forwards
        r1_now = r.r1_gamma > 0 and step % r.r1_every == 0
        with self._autocast():
            fake = g(z, fake_labels)
            real_in = augment.diff_augment(real, r.diffaugment)
            if r1_now:
                real_in = real_in.detach().requires_grad_(True)
            d_real = d(real_in, labels if self.num_classes else None)
            d_fake = d(augment.diff_augment(fake.detach(), r.diffaugment), fake_labels)
            loss_d = losses.d_loss(r.loss, d_real, d_fake, r.label_smoothing)
            if r1_now:
                loss_d = loss_d + r.r1_every * losses.r1_penalty(d_real, real_in, r.r1_gamma)
        nets.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        nets.opt_d.step()

        # G's step needs gradients through D but not D's own (half of D's backward), and
        # must not average D's gradients over ranks
        d.requires_grad_(False)
        with no_sync(d), self._autocast():
            loss_g = losses.g_loss(
                r.loss, d(augment.diff_augment(fake, r.diffaugment), fake_labels)
            )
        nets.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        d.requires_grad_(True)
        nets.opt_g.step()
        nets.update_ema(step)
        self.nonfinite |= ~(torch.isfinite(loss_d) & torch.isfinite(loss_g))
        return {
            "d_loss": loss_d.detach(),
            "g_loss": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach()).mean(),
        }

    def nonfinite_on_any_rank(self, world: distributed.World) -> bool:
        """Whether a loss was NaN or infinite on any rank since the last call (a collective;
        the flag starts again from false)."""
        (bad,) = distributed.any_rank_each([bool(self.nonfinite)], world)
        self.nonfinite.zero_()
        return bad

    def grad_norms(self) -> dict[str, float]:
        """The gradient norms the last step left, for the log record."""
        return {
            "grad_norm_d": round(grad_norm(self.nets.d), 5),
            "grad_norm_g": round(grad_norm(self.nets.g), 5),
        }

    def _random_labels(self, n: int) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.amp)


def amp_enabled(setting: str, device: torch.device) -> bool:
    """GAN_AMP: auto is bf16 on a GPU that supports it."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "bf16"


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
