"""GanStep in-process: what one D/G step does to the weights and gradients, and its
non-finite flag."""

from __future__ import annotations

import torch

from job.gan.models import Arch
from job.gan.networks import Networks
from job.gan.step import GanStep, Recipe
from job.infra.distributed import World

CPU = torch.device("cpu")
ONE_PROCESS = World(0, 1, 0, CPU)
ARCH = Arch(model="dcgan", channels=1, image_size=28, latent_dim=16, width=8, num_classes=0)
RECIPE = Recipe(loss="bce", label_smoothing=0.0, r1_gamma=0.1, r1_every=1, diffaugment="",
                amp=False)  # fmt: skip


def gan_step(arch: Arch = ARCH, recipe: Recipe = RECIPE) -> GanStep:
    nets = Networks(arch, CPU, seed=0, lr_g=2e-4, lr_d=2e-4, betas=(0.5, 0.999), ema_decay=0.9,
                    channels_last=False, fused_adam=False)  # fmt: skip
    return GanStep(nets, recipe, device=CPU)


def real_batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.rand(n, 1, 28, 28) * 2 - 1, torch.zeros(n, dtype=torch.long)


def test_generator_step_leaves_discriminator_gradients_as_its_own_loss_made_them():
    step = gan_step()
    after_d_step = {}
    d_step = step.nets.opt_d.step

    def step_and_remember():
        d_step()
        after_d_step.update({n: p.grad.clone() for n, p in step.nets.d.named_parameters()})

    step.nets.opt_d.step = step_and_remember
    step.train(*real_batch(), step=0)
    assert after_d_step, "D's optimizer did not step"
    for name, p in step.nets.d.named_parameters():
        assert p.requires_grad, f"{name} stayed frozen after G's step"
        assert torch.equal(p.grad, after_d_step[name]), f"G's step changed {name}.grad"
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in step.nets.g.parameters())


def test_a_step_updates_g_d_and_the_ema_generator_and_reports_finite_losses():
    step = gan_step(Arch(**{**ARCH.to_dict(), "num_classes": 10}))
    before = {n: {k: v.clone() for k, v in getattr(step.nets, n).state_dict().items()}
              for n in ("g", "d", "g_ema")}  # fmt: skip
    stats = step.train(*real_batch(), step=3)
    assert set(stats) == {"d_loss", "g_loss", "d_real", "d_fake"}
    assert all(torch.isfinite(v) for v in stats.values())
    for name, saved in before.items():
        now = getattr(step.nets, name).state_dict()
        assert any(not torch.equal(now[k], v) for k, v in saved.items()), f"{name} unchanged"
    norms = step.grad_norms()
    assert norms["grad_norm_d"] > 0 and norms["grad_norm_g"] > 0
    assert not step.nonfinite_on_any_rank(ONE_PROCESS)


def test_a_non_finite_loss_is_flagged_once_and_the_flag_starts_again():
    step = gan_step()
    with torch.no_grad():
        next(step.nets.d.parameters()).fill_(float("nan"))
    step.train(*real_batch(), step=0)
    assert step.nonfinite_on_any_rank(ONE_PROCESS)
    assert not step.nonfinite_on_any_rank(ONE_PROCESS)


def test_micro_batches_accumulate_into_one_optimizer_step_and_one_ema_update():
    step = gan_step()
    step.micro_batches = 4
    calls = {"opt_d": 0, "opt_g": 0, "ema": 0, "d": 0}

    def counted(name, method):
        def call(*args, **kwargs):
            calls[name] += 1
            return method(*args, **kwargs)

        return call

    nets = step.nets
    nets.opt_d.step = counted("opt_d", nets.opt_d.step)
    nets.opt_g.step = counted("opt_g", nets.opt_g.step)
    nets.update_ema = counted("ema", nets.update_ema)
    nets.d.register_forward_hook(lambda module, args, out: calls.update(d=calls["d"] + 1))
    stats = step.train(*real_batch(16), step=0)
    assert calls == {"opt_d": 1, "opt_g": 1, "ema": 1, "d": 4 * 3}  # real, fake, G's fake
    assert all(torch.isfinite(v) and v.shape == () for v in stats.values())
