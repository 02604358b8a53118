"""Training recipes beyond the seeds' BCE GAN: hinge loss, spectral norm, R1, DiffAugment,
projection discriminator, GAN_RECIPE presets."""

import itertools

import pytest
import torch
from torch import nn

from job.gan import losses
from job.gan.augment import POLICIES, diff_augment
from job.gan.models import Arch, arch_changes, build_discriminator
from job.infra.errors import SettingsError
from job.run import checkpoint
from job.settings import DIFFAUGMENT_POLICIES, RECIPES, load_settings
from tests.helpers import job_env, run_job, write_idx

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def test_hinge_losses_on_known_logits():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2], relu(1 + fake) = [0, 1, 2]
    assert losses.d_loss("hinge", real, fake) == pytest.approx(2.5 / 3 + 1.0)
    assert losses.d_loss("hinge", real, fake, smoothing=0.2) == pytest.approx(2.5 / 3 + 1.0)
    assert losses.g_loss("hinge", fake) == pytest.approx(1 / 3)
    assert losses.d_loss("bce", real, fake, 0.1) == losses.d_loss_bce(real, fake, 0.1)
    assert losses.g_loss("bce", fake) == losses.g_loss_bce(fake)


@pytest.mark.parametrize("model", ["mlp", "dcgan"])
def test_spectral_norm_keeps_the_largest_singular_value_at_one_and_drops_batchnorm(model):
    torch.manual_seed(0)
    d = build_discriminator(Arch(model, 1, 28, 16, width=8, num_classes=0, spectral_norm=True))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    for _ in range(3):  # power iterations, one per forward in training mode
        d(torch.randn(4, 1, 28, 28))
    layers = [m for m in d.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert layers and all(hasattr(m, "parametrizations") for m in layers)
    d.eval()
    for m in layers:
        sigma = torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2)
        assert sigma == pytest.approx(1.0, abs=0.05)
    plain = build_discriminator(Arch("dcgan", 1, 28, 16, width=8, num_classes=0))
    assert any(isinstance(m, nn.BatchNorm2d) for m in plain.modules())


def test_r1_penalty_of_a_linear_discriminator_is_gamma_over_2_times_the_weight_norm():
    d = nn.Sequential(nn.Flatten(), nn.Linear(4, 1))
    with torch.no_grad():
        d[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    x = torch.randn(5, 1, 2, 2).requires_grad_(True)
    penalty = losses.r1_penalty(d(x).squeeze(1), x, gamma=10.0)
    assert penalty.item() == pytest.approx(10.0 / 2 * (1 + 4 + 0.25 + 9))  # grad_x D = w
    penalty.backward()  # the graph was kept: the penalty trains D (d/dw = gamma * w)
    assert torch.allclose(d[1].weight.grad, 10.0 * d[1].weight.detach())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(4, 1, 28, 28), (3, 3, 32, 32), (2, 3, 64, 64), (2, 1, 20, 13)])
def test_diffaugment_keeps_shapes_passes_gradients_and_repeats_under_a_seed(shape, device):
    policy = "color,translation,cutout"
    x = (torch.rand(shape, device=device) * 2 - 1).requires_grad_(True)
    torch.manual_seed(1)
    a = diff_augment(x, policy)
    assert a.shape == x.shape and a.device == x.device
    a.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.manual_seed(1)
    assert torch.equal(diff_augment(x, policy), a)
    torch.manual_seed(2)
    assert not torch.equal(diff_augment(x, policy), a)
    assert diff_augment(x, "") is x


def test_cutout_zeroes_a_square_and_translation_moves_pixels():
    torch.manual_seed(0)
    ones = torch.ones(8, 1, 28, 28)
    zeroed = (diff_augment(ones, "cutout") == 0).flatten(1).sum(1)
    assert ((zeroed > 0) & (zeroed <= 14 * 14)).all()
    x = torch.arange(28.0).view(1, 1, 1, 28).expand(16, 1, 28, 28)
    moved = diff_augment(x, "translation")
    assert (moved != x).flatten(1).any(1).sum() > 8  # most of 16 images were shifted
    assert set(moved.unique().tolist()) <= set(range(28)) | {0.0}


CASES = list(itertools.product(["mlp", "dcgan"], [28, 32, 64], [1, 3]))


@pytest.mark.parametrize("model,size,channels", CASES)
def test_projection_discriminator_shapes_and_label_dependence(model, size, channels):
    torch.manual_seed(0)
    arch = Arch(model, channels, size, 16, width=8, num_classes=10, projection=True,
                spectral_norm=size == 32)  # fmt: skip
    d = build_discriminator(arch).eval()
    x = torch.randn(1, channels, size, size).repeat(4, 1, 1, 1)
    out = d(x, torch.tensor([0, 1, 2, 0]))
    assert out.shape == (4,)
    assert out[0] == out[3] and out[0] != out[1] and out[1] != out[2]


def test_arch_dicts_of_older_checkpoints_still_match():
    old = {"model": "dcgan", "channels": 1, "image_size": 28, "latent_dim": 16, "width": 8,
           "num_classes": 10}  # fmt: skip
    assert Arch(**old).to_dict() == old
    sn = Arch(**old, spectral_norm=True, projection=True)
    assert Arch(**sn.to_dict()) == sn and sn.to_dict()["projection"] is True


def test_arch_changes_name_each_field_reading_missing_ones_at_their_defaults():
    old = {"model": "dcgan", "channels": 1, "image_size": 28, "latent_dim": 16, "width": 32,
           "num_classes": 0}  # fmt: skip
    now = Arch(**{**old, "width": 24, "depth": 1}).to_dict()
    assert arch_changes(old, now) == [
        "width 32 in the checkpoint, 24 now",
        "depth 0 in the checkpoint, 1 now",
    ]
    assert arch_changes(old, Arch(**old).to_dict()) == []


def test_a_projection_checkpoint_from_before_the_whole_map_head_is_refused_by_name(tmp_path):
    """Such a D summed its last block over space (a head of C features, not C x 7 x 7):
    resuming it exits 5 saying so, not with a size mismatch, and its generator still samples."""
    write_idx(tmp_path / "data", n=64)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_CONDITIONAL="true", GAN_DEPTH=0,
                  GAN_CONDITIONING="projection", GAN_MAX_STEPS=2, GAN_RUN_ID="old")  # fmt: skip
    assert run_job(env).returncode == 0
    folder = tmp_path / "runs/old/checkpoints/step-00000002"
    state = torch.load(folder / "state.pt", weights_only=False)
    d = state["nets"]["d"]
    for key in ("head.linear.weight", "head.embed.weight"):
        d[key] = d[key][:, :: 7 * 7].clone()
    parts = {checkpoint.STATE: checkpoint.serialize(state)}
    (folder / checkpoint.STATE).write_bytes(parts[checkpoint.STATE])
    (folder / checkpoint.MARKER).write_bytes(checkpoint.marker_for(2, parts))

    env["GAN_MAX_STEPS"] = "4"
    result = run_job(env)
    assert result.returncode == 5, result.stdout + result.stderr
    assert (
        "checkpoint at step 2: its d.head.linear.weight is (1, 16), this model's is (1, 784)"
        in result.stdout
    )
    assert "projection discriminator sums its last block over space" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    out = tmp_path / "grid.png"
    result = run_job(env, "sample", "--checkpoint", str(tmp_path / "runs/old"), "--num", "4",
                     "--out", str(out))  # fmt: skip
    assert result.returncode == 0 and out.read_bytes()[:4] == b"\x89PNG", result.stdout


def test_recipes_fill_in_what_was_not_set_and_explicit_settings_win():
    seed = load_settings({"GAN_RECIPE": "seed"})
    assert (seed.model, seed.loss, seed.lr_g, seed.lr_d) == ("dcgan", "bce", 2e-4, 2e-4)
    assert (seed.beta1, seed.beta2, seed.ema_decay) == (0.5, 0.999, 0.0)
    assert not seed.spectral_norm and seed.r1_gamma == 0 and seed.diffaugment == ""
    fast = load_settings({"GAN_RECIPE": "fast28", "GAN_CONDITIONAL": "true"})
    for name, value in RECIPES["fast28"].items():
        assert getattr(fast, name) == value, name
    mine = load_settings({"GAN_RECIPE": "fast28", "GAN_LR_D": "1e-3", "GAN_WIDTH": "64"})
    assert mine.lr_d == 1e-3 and mine.width == 64 and mine.lr_g == fast.lr_g
    custom = load_settings({"GAN_RECIPE": "custom"})
    assert (custom.recipe, custom.loss, custom.lr_d, custom.width) == ("custom", "bce", 2e-4, 64)
    assert custom.ema_decay == 0.999 and not custom.spectral_norm


def test_a_recipe_sets_the_conditioning_of_conditional_models_only():
    assert RECIPES["fast28"]["conditioning"] == "projection"
    assert load_settings({"GAN_CONDITIONAL": "true"}).conditioning == "projection"
    plain = load_settings({})  # projection without labels would be a settings error
    assert plain.conditioning == "concat" and "conditioning" not in plain.recipe_filled
    mine = load_settings({"GAN_CONDITIONAL": "1", "GAN_CONDITIONING": "concat"})
    assert mine.conditioning == "concat"


def test_a_recipe_gives_its_dcgan_depth_to_dcgan_only():
    assert load_settings({}).depth == RECIPES["fast28"]["depth"] > 0
    mlp = load_settings({"GAN_RECIPE": "fast28", "GAN_MODEL": "mlp"})  # not refused
    assert mlp.depth == 0 and "depth" not in mlp.recipe_filled
    assert problems({"GAN_MODEL": "mlp", "GAN_DEPTH": "1"})  # asked for: refused


def test_a_compiled_run_keeps_the_recipes_r1_penalty():
    assert RECIPES["fast28"]["r1_gamma"] > 0
    compiled = load_settings({"GAN_COMPILE": "true"})  # D stays eager for it (Networks.wrap)
    assert (
        compiled.r1_gamma == RECIPES["fast28"]["r1_gamma"] and "r1_gamma" in compiled.recipe_filled
    )
    assert load_settings({"GAN_COMPILE": "true", "GAN_R2_GAMMA": "0.1"}).r2_gamma == 0.1


def test_auto_recipe_is_fast28_only_for_28px_grayscale_dcgan():
    assert load_settings({}).recipe == "fast28"  # the default: Fashion-MNIST, 28 px, dcgan
    assert load_settings({"GAN_DATASET": "kmnist"}).recipe == "fast28"
    for other in ({"GAN_IMAGE_SIZE": "64"}, {"GAN_MODEL": "mlp"}, {"GAN_IMAGE_SIZE": "32"}):
        assert load_settings(other).recipe == "custom", other


def test_auto_recipe_is_color32_for_color_data_at_32px_with_dcgan(tmp_path):
    folder = {"GAN_DATASET": f"folder:{tmp_path}"}
    color = load_settings({**folder, "GAN_IMAGE_SIZE": "32"})
    assert color.recipe == "color32"
    for name, value in RECIPES["color32"].items():
        assert getattr(color, name) == value or name == "conditioning", name
    assert load_settings({"GAN_DATASET": "cifar10"}).recipe == "color32"  # its own 32 px
    assert load_settings({}).recipe == "fast28"  # 28 px grayscale keeps its own
    mine = load_settings({**folder, "GAN_IMAGE_SIZE": "32", "GAN_WIDTH": "48"})
    assert (mine.recipe, mine.width) == ("color32", 48)
    others = (
        folder,  # folders default to 64 px
        {**folder, "GAN_IMAGE_SIZE": "64"},
        {**folder, "GAN_IMAGE_SIZE": "32", "GAN_MODEL": "r3gan"},
        {"GAN_DATASET": "cifar10", "GAN_IMAGE_SIZE": "64"},
        {"GAN_DATASET": "mnist", "GAN_IMAGE_SIZE": "32"},  # grayscale at 32 px
    )
    for other in others:
        assert load_settings(other).recipe == "custom", other
    assert load_settings({**folder, "GAN_IMAGE_SIZE": "32", "GAN_RECIPE": "custom"}).width == 64


def problems(env):
    with pytest.raises(SettingsError) as info:
        load_settings(env)
    return info.value.problems


def test_projection_needs_a_conditional_model_and_bad_policies_are_named():
    (line,) = problems({"GAN_CONDITIONING": "projection"})
    assert "GAN_CONDITIONING" in line and "GAN_CONDITIONAL=true" in line
    (line,) = problems({"GAN_DIFFAUGMENT": "translation,flip"})
    assert "GAN_DIFFAUGMENT='translation,flip'" in line and "cutout" in line
    assert load_settings({"GAN_DIFFAUGMENT": " cutout, color"}).diffaugment == "cutout,color"
    assert DIFFAUGMENT_POLICIES == POLICIES
    (line,) = problems({"GAN_MODEL": "mlp", "GAN_DEPTH": "2"})
    assert "GAN_DEPTH=2" in line and "GAN_MODEL=dcgan" in line


def test_a_run_with_every_recipe_feature_resumes_exactly_and_samples(tmp_path):
    write_idx(tmp_path / "data", n=64)
    common = dict(GAN_DATASET="mnist", GAN_CONDITIONAL="true", GAN_CONDITIONING="projection",
                  GAN_LOSS="hinge", GAN_SPECTRAL_NORM="true", GAN_R1_GAMMA=1, GAN_R1_EVERY=2,
                  GAN_DEPTH=1, GAN_DIFFAUGMENT="color,translation,cutout",
                  GAN_CHECKPOINT_EVERY=2)  # fmt: skip
    straight = job_env(tmp_path, GAN_RUN_ID="straight", GAN_MAX_STEPS=4, **common)
    result = run_job(straight)
    assert result.returncode == 0, result.stdout + result.stderr
    split = job_env(tmp_path, GAN_RUN_ID="split", GAN_MAX_STEPS=2, **common)
    assert run_job(split).returncode == 0
    split["GAN_MAX_STEPS"] = "4"
    assert run_job(split).returncode == 0
    a, b = (torch.load(tmp_path / f"runs/{r}/checkpoints/step-00000004/state.pt",
                       weights_only=False) for r in ("straight", "split"))  # fmt: skip
    arch = a["meta"]["arch"]
    assert arch["spectral_norm"] and arch["projection"] and arch["depth"] == 1
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"
    out = tmp_path / "grid.png"
    result = run_job(straight, "sample", "--checkpoint", str(tmp_path / "runs/straight"),
                     "--num", "4", "--out", str(out), "--label", "3")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"
