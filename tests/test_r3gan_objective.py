"""The R3GAN objective: the relativistic pairing loss, the R1 and R2 penalties and the R3GAN
schedule, in-process and in real runs (a resume, two ranks under torchrun)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from job.gan import losses
from job.gan.models import Arch
from job.gan.networks import Networks
from job.gan.r3schedule import BETA2_END, R3Schedule, ema_beta, half_life
from job.gan.step import GanStep, Recipe
from job.infra.errors import SettingsError
from job.settings import load_settings
from tests.helpers import REPO, job_env, run_job, write_idx

CPU = torch.device("cpu")
ARCH = Arch(model="dcgan", channels=1, image_size=28, latent_dim=16, width=8, num_classes=0)
OBJECTIVE = dict(GAN_LOSS="rpgan", GAN_R1_GAMMA=0.1, GAN_R2_GAMMA=0.1, GAN_R1_EVERY=2,
                 GAN_SCHEDULE="r3gan", GAN_BETA1=0, GAN_BETA2=0.9)  # fmt: skip


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def test_rpgan_losses_pair_real_and_fake_by_index():
    real, fake = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0])
    d = (softplus(0.0 - 2.0) + softplus(1.0 - 0.0)) / 2
    g = (softplus(2.0 - 0.0) + softplus(0.0 - 1.0)) / 2
    assert losses.d_loss("rpgan", real, fake).item() == pytest.approx(d)
    assert losses.g_loss("rpgan", fake, real).item() == pytest.approx(g)
    # paired, not all against all: swapping the fakes changes the loss
    assert losses.d_loss("rpgan", real, fake.flip(0)).item() != pytest.approx(d)


def test_rpgan_d_loss_falls_as_d_scores_real_above_fake_and_g_loss_rises():
    zero = torch.zeros(1)
    worse, even, better = (torch.tensor([v]) for v in (-3.0, 0.0, 3.0))
    d_losses = [losses.d_loss("rpgan", real, zero).item() for real in (worse, even, better)]
    g_losses = [losses.g_loss("rpgan", zero, real).item() for real in (worse, even, better)]
    assert d_losses[0] > d_losses[1] > d_losses[2]
    assert g_losses[0] < g_losses[1] < g_losses[2]
    assert d_losses[1] == pytest.approx(math.log(2))


def test_rpgan_g_loss_without_real_logits_is_refused():
    with pytest.raises(ValueError, match="real"):
        losses.g_loss("rpgan", torch.zeros(2))


def test_r2_penalty_of_a_linear_discriminator_is_gamma_over_2_times_the_weight_norm_on_fakes():
    d = torch.nn.Linear(12, 1)
    fake = torch.randn(5, 12, requires_grad=True)
    penalty = losses.r2_penalty(d(fake).squeeze(1), fake, gamma=4.0)
    assert penalty.item() == pytest.approx(2.0 * d.weight.square().sum().item(), rel=1e-5)
    penalty.backward()  # the graph reaches D's weights
    assert d.weight.grad is not None and d.weight.grad.abs().sum() > 0


def one_step(recipe: Recipe, step: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    nets = Networks(ARCH, CPU, seed=0, lr_g=2e-4, lr_d=2e-4, betas=(0.0, 0.9), ema_decay=0.9,
                    channels_last=False, fused_adam=False)  # fmt: skip
    torch.manual_seed(1)
    real = torch.rand(8, 1, 28, 28) * 2 - 1
    GanStep(nets, recipe, device=CPU, **kwargs).train(real, torch.zeros(8, dtype=torch.long), step)
    return {k: v.clone() for k, v in nets.d.state_dict().items()}


def recipe(**fields) -> Recipe:
    base = dict(loss="rpgan", label_smoothing=0.0, r1_gamma=0.0, r1_every=2, diffaugment="",
                amp=False, r2_gamma=0.0)  # fmt: skip
    return Recipe(**{**base, **fields})


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def test_r2_changes_d_on_due_steps_only_and_zero_gamma_trains_as_no_penalty():
    plain = one_step(recipe())
    assert differs(one_step(recipe(r2_gamma=10.0)), plain)
    assert not differs(one_step(recipe(r2_gamma=10.0), step=1), one_step(recipe(), step=1))
    assert differs(one_step(recipe(r1_gamma=10.0, r2_gamma=10.0)), one_step(recipe(r1_gamma=10.0)))


@pytest.mark.parametrize("amp", [False, True])
def test_micro_batches_train_rpgan_with_both_penalties(amp):
    plain = one_step(recipe(r1_every=1, amp=amp), micro_batches=2)
    weights = one_step(recipe(r1_gamma=1.0, r2_gamma=1.0, r1_every=1, amp=amp), micro_batches=2)
    assert all(torch.isfinite(v).all() for v in weights.values()) and differs(weights, plain)


def test_schedule_runs_from_its_starts_to_its_ends_at_the_horizon_and_stays():
    s = R3Schedule(horizon=1000, beta2=0.9, ema_half_life=500.0)
    start, end, after = s.at(0), s.at(1000), s.at(5000)
    assert (start.lr_factor, start.beta2, start.gamma_factor, start.ema_half_life) == (
        1.0, 0.9, 1.0, 0.0)  # fmt: skip
    assert end.lr_factor == pytest.approx(0.25) and end.gamma_factor == pytest.approx(0.1)
    assert end.beta2 == pytest.approx(BETA2_END) and end.ema_half_life == pytest.approx(500.0)
    assert after == end
    mid = s.at(500)
    assert mid.lr_factor == pytest.approx(0.625) and mid.ema_half_life == pytest.approx(250.0)
    points = [s.at(i) for i in range(0, 1001, 50)]
    for a, b in zip(points, points[1:], strict=False):
        assert b.lr_factor < a.lr_factor and b.gamma_factor < a.gamma_factor
        assert b.beta2 > a.beta2 and b.ema_half_life > a.ema_half_life


def test_ema_half_life_and_beta_are_inverse():
    h = half_life(0.999, 64)
    assert ema_beta(h, 64) == pytest.approx(0.999)
    assert ema_beta(h, 64) ** (h / 64) == pytest.approx(0.5)
    assert ema_beta(0.0, 64) == 0.0 and half_life(0.0, 64) == 0.0  # the EMA is G itself


def test_schedule_factor_composes_with_the_budgets_in_either_order():
    nets = Networks(ARCH, CPU, seed=0, lr_g=2e-4, lr_d=1e-4, betas=(0.0, 0.9), ema_decay=0.9,
                    channels_last=False, fused_adam=False)  # fmt: skip
    nets.scale_learning_rates(0.5)
    nets.follow(0.25, 0.95, 0.7)
    assert nets.learning_rates() == pytest.approx({"lr_g": 2e-4 / 8, "lr_d": 1e-4 / 8})
    nets.scale_learning_rates(1.0)  # a rollback's factor changes, the schedule's stays
    assert nets.learning_rates() == pytest.approx({"lr_g": 2e-4 / 4, "lr_d": 1e-4 / 4})
    assert nets.opt_g.param_groups[0]["betas"] == (0.0, 0.95) and nets.ema_beta == 0.7


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"GAN_LR_DECAY": "cosine", "GAN_BETA2": "0.9"}, "GAN_LR_DECAY=cosine"),
        ({"GAN_BETA2": "0.999"}, "GAN_BETA2=0.999"),
        ({"GAN_SCHEDULE": "none", "GAN_SCHEDULE_IMAGES": "100"}, "GAN_SCHEDULE_IMAGES=100"),
    ],
)
def test_settings_that_do_not_go_together_exit_2(settings, message):
    env = {"GAN_DATASET": "mnist", "GAN_SCHEDULE": "r3gan", **settings}
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.exit_code == 2 and message in str(caught.value)


def test_schedule_keeps_the_fast28_recipe_from_filling_in_its_lr_decay():
    s = load_settings({"GAN_DATASET": "mnist", "GAN_SCHEDULE": "r3gan", "GAN_BETA2": "0.9"})
    assert s.recipe == "fast28" and s.lr_decay == "none"


def test_resumed_run_with_the_r3gan_objective_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    write_idx(tmp_path / "data", n=256)
    common = dict(GAN_DATASET="mnist", GAN_CHECKPOINT_EVERY=5, GAN_CONDITIONAL="true",
                  GAN_SCHEDULE_IMAGES=160, GAN_LOG_EVERY=1, **OBJECTIVE)  # fmt: skip
    straight = job_env(tmp_path, GAN_RUN_ID="straight", GAN_MAX_STEPS=10, **common)
    assert run_job(straight).returncode == 0
    split = job_env(tmp_path, GAN_RUN_ID="split", GAN_MAX_STEPS=5, **common)
    assert run_job(split).returncode == 0
    split["GAN_MAX_STEPS"] = "10"
    result = run_job(split)
    assert result.returncode == 0, result.stdout + result.stderr
    a, b = (torch.load(tmp_path / f"runs/{r}/checkpoints/step-00000010/state.pt",
                       weights_only=False) for r in ("straight", "split"))  # fmt: skip
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"
    assert a["nets"]["opt_d"]["param_groups"][0]["betas"][1] > 0.9  # the schedule moved beta2
    rates = [json.loads(line)["lr_g"] for line in (tmp_path / "runs/split/metrics.jsonl").open()]
    assert len(rates) == 10 and rates == sorted(rates, reverse=True) and rates[0] > rates[-1]


def test_two_ranks_with_the_r3gan_objective_keep_identical_weights(tmp_path):
    write_idx(tmp_path / "data", n=256)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_MAX_STEPS=4, GAN_DEVICE="cpu",
                  GAN_RUN_ID="ddp", GAN_CONDITIONAL="false", **OBJECTIVE)  # fmt: skip
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "tests/ddp_worker.py", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    r0, r1 = (torch.load(tmp_path / f"rank{r}-of-2.pt", weights_only=False) for r in (0, 1))
    for net in ("g", "d", "g_ema"):
        for key, value in r0[net].items():
            if "running_" in key or "num_batches" in key:
                continue  # BatchNorm statistics stay per rank (broadcast_buffers=False)
            assert torch.equal(value, r1[net][key]), f"{net}.{key} differs between ranks"
