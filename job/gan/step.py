"""One training step of the GAN: D's update, then G's, then the EMA generator's.

The step owns what it computes (the recipe: loss, label smoothing, lazy R1, DiffAugment, bf16
autocast), the gradient norms it leaves behind, and the non-finite flag: set on the device
inside the step and read only where the loop syncs anyway, so no step waits on the host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from job.gan import augment, losses, r3schedule
from job.gan.ada import AdaptiveAugment
from job.gan.networks import Networks, no_sync
from job.infra import distributed, watchdog


@dataclass(frozen=True)
class Recipe:
    """What one training step computes."""

    loss: str  # bce | hinge | rpgan
    label_smoothing: float
    r1_gamma: float  # 0: no R1 penalty
    r1_every: int  # R1 and R2 every this many steps (lazy)
    diffaugment: str  # DiffAugment policy before every D forward ("": none)
    amp: bool  # bf16 autocast (r3gan keeps its low-resolution stages in float32 under it)
    r2_gamma: float = 0.0  # 0: no R2 penalty (on fakes)


class GanStep:
    """micro_batches: how many equal parts of a process's batch go through G and D at once;
    each optimizer step accumulates their gradients (job/data/batching.py sets it). Micro-batch i
    of n takes every n-th real image from the i-th, as rank i of n processes would from the
    epoch's order: BatchNorm groups the images as n processes would.

    schedule: the R3GAN schedule (job/gan/r3schedule.py), followed at the start of each step
    at images_seen() (the run's count, over world_size processes)."""

    def __init__(
        self,
        nets: Networks,
        recipe: Recipe,
        *,
        device: torch.device,
        micro_batches: int = 1,
        ada: AdaptiveAugment | None = None,
        schedule: r3schedule.R3Schedule | None = None,
        images_seen: Callable[[], int] = lambda: 0,
        world_size: int = 1,
    ):
        self.nets, self.recipe, self.device = nets, recipe, device
        self.ada = ada  # GAN_AUGMENT=ada: its augmentations instead of DiffAugment's
        self.micro_batches = micro_batches
        self.schedule, self.images_seen, self.world_size = schedule, images_seen, world_size
        self.gamma_factor = 1.0  # the schedule's, on R1's and R2's gammas
        self.latent_dim, self.num_classes = nets.arch.latent_dim, nets.arch.num_classes
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)

    def train(self, real: torch.Tensor, labels: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        """One D and one G update on a batch of real images at the run's step; the losses and
        D's outputs (means over the batch), still on the device."""
        b = real.shape[0]
        self._follow_schedule(b * self.world_size)
        if self.nets.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(b, self.latent_dim, device=self.device)
        fake_labels = self._random_labels(b)
        n = self.micro_batches
        parts = [
            _Micro(
                real[i::n],
                labels[i::n] if self.num_classes else None,
                z.chunk(n)[i],
                None if fake_labels is None else fake_labels.chunk(n)[i],
            )
            for i in range(n)
        ]
        d_stats = self._d_step(parts, step)
        loss_g = self._g_step(parts, step)
        self.nets.update_ema(step)
        if self.ada is not None:
            self.ada.step_done(step + 1)
        self.nonfinite |= ~(torch.isfinite(d_stats["d_loss"]) & torch.isfinite(loss_g))
        return {**d_stats, "g_loss": loss_g}

    def _d_step(self, parts: list[_Micro], step: int) -> dict[str, torch.Tensor]:
        """D's update, its gradients summed over the micro-batches (averaged over ranks on the
        last one only). With one micro-batch G's graph is kept for G's step; with more, G's
        step draws the same fakes again rather than hold every micro-batch's graph."""
        r, nets, n = self.recipe, self.nets, len(parts)
        g, d = nets.g, nets.d
        # lazy R1 and R2 (StyleGAN2): every r1_every steps, scaled by the interval; in this
        # same backward, so that DDP sees one backward per set of forwards
        due = step % r.r1_every == 0
        r1, r2 = (gamma * self.gamma_factor if due else 0.0 for gamma in (r.r1_gamma, r.r2_gamma))
        nets.opt_d.zero_grad(set_to_none=True)
        sums = {"d_loss": 0.0, "d_real": 0.0, "d_fake": 0.0}
        for i, m in enumerate(parts):
            _beat(step, "D", i, n)
            with _sync_on_last(d, i, n):
                with self._autocast():
                    with torch.set_grad_enabled(n == 1):
                        m.fake = g(m.z, m.fake_labels)
                    real_in = self._augment(m.real)
                    if r1:
                        real_in = real_in.detach().requires_grad_(True)
                    d_real = d(real_in, m.labels).float()  # the losses in fp32 under bf16
                    if self.ada is not None:
                        self.ada.observe(d_real)
                    fake_in = self._augment(m.fake.detach())
                    if r2:
                        fake_in = fake_in.detach().requires_grad_(True)
                    d_fake = d(fake_in, m.fake_labels).float()
                    loss_d = losses.d_loss(r.loss, d_real, d_fake, r.label_smoothing)
                    if r1:
                        loss_d = loss_d + r.r1_every * losses.r1_penalty(d_real, real_in, r1)
                    if r2:
                        loss_d = loss_d + r.r1_every * losses.r2_penalty(d_fake, fake_in, r2)
                (loss_d / n).backward()
            sums["d_loss"] = sums["d_loss"] + loss_d.detach() / n
            sums["d_real"] = sums["d_real"] + torch.sigmoid(d_real.detach()).mean() / n
            sums["d_fake"] = sums["d_fake"] + torch.sigmoid(d_fake.detach()).mean() / n
        nets.opt_d.step()
        return sums

    def _g_step(self, parts: list[_Micro], step: int) -> torch.Tensor:
        """G's update: gradients through D but not D's own (half of D's backward), and D's
        never averaged over ranks. rpgan pairs each fake with D's logit of the step's real
        image of the same index: the batch D just trained on, seen by the updated D (R3GAN's
        G phase also pairs with real images), without gradients (they reach no weight of G)."""
        r, nets, n = self.recipe, self.nets, len(parts)
        g, d = nets.g, nets.d
        nets.opt_g.zero_grad(set_to_none=True)
        d.requires_grad_(False)
        total = 0.0
        for i, m in enumerate(parts):
            _beat(step, "G", i, n)
            with _sync_on_last(g, i, n), no_sync(d):
                with self._autocast():
                    fake = m.fake if n == 1 else g(m.z, m.fake_labels)
                    d_out = d(self._augment(fake), m.fake_labels).float()
                    loss_g = losses.g_loss(r.loss, d_out, self._real_logits(m))
                (loss_g / n).backward()
            total = total + loss_g.detach() / n
        d.requires_grad_(True)
        nets.opt_g.step()
        return total

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

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        """What D sees of x, real or fake: ADA's augmentations at its p, or DiffAugment's."""
        if self.ada is not None:
            return self.ada.augment(x)
        return augment.diff_augment(x, self.recipe.diffaugment)

    def _real_logits(self, m: _Micro) -> torch.Tensor | None:
        """D's logits of the micro-batch's real images, for rpgan's G loss (else None)."""
        if self.recipe.loss != "rpgan":
            return None
        with torch.no_grad():
            return self.nets.d(self._augment(m.real), m.labels).float()

    def _follow_schedule(self, images_per_step: int) -> None:
        """The schedule's values at the images seen before this step: a resumed run, whose
        checkpoint restores that count, goes on along the same curves."""
        if self.schedule is None:
            return
        p = self.schedule.at(self.images_seen())
        ema_beta = r3schedule.ema_beta(p.ema_half_life, images_per_step)
        self.nets.follow(p.lr_factor, p.beta2, ema_beta)
        self.gamma_factor = p.gamma_factor

    def _random_labels(self, n: int) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(self.num_classes, (n,), device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.amp)


@dataclass
class _Micro:
    """One micro-batch: real images and labels, noise and the fake labels drawn for it."""

    real: torch.Tensor
    labels: torch.Tensor | None
    z: torch.Tensor
    fake_labels: torch.Tensor | None
    fake: torch.Tensor | None = None


def _beat(step: int, net: str, i: int, n: int) -> None:
    """Progress for the watchdog before each micro-batch's pass: a step longer than the stall
    timeout is not a stall while each pass is shorter, and a stall names its step and pass."""
    watchdog.beat(f"training step {step + 1}: {net}'s update, micro-batch {i + 1} of {n}")


def _sync_on_last(module: nn.Module, i: int, n: int):
    """DDP averages gradients over ranks in the backward of the last micro-batch only."""
    return no_sync(module) if i < n - 1 else contextlib.nullcontext()


def amp_enabled(setting: str, device: torch.device) -> bool:
    """GAN_AMP: auto is bf16 on a GPU that supports it."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "bf16"


def grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0
