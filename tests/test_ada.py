"""GAN_AUGMENT=ada: the per-image augmentations, the controller that moves p, and real runs where
D overfits a tiny dataset (p rises) or not a large one (p stays near 0), under two ranks
(the same p on each) and across a resume (bit for bit)."""

import gzip
import json
import struct
import subprocess
import sys

import pytest
import torch

from job.gan.ada import AdaptiveAugment
from job.gan.augment import adaptive_augment
from job.gan.models import Arch, build_generator
from job.infra import distributed
from job.infra.errors import SettingsError
from job.infra.metrics import Metrics
from job.settings import load_settings
from tests.helpers import REPO, job_env, run_job, write_extractor

ONE = distributed.World(0, 1, 0, torch.device("cpu"))


# ------------------------------------------------------------------------ the augmentations


@pytest.mark.parametrize("channels", [1, 3])
def test_p_zero_returns_the_input_and_draws_nothing(channels):
    x = torch.rand(4, channels, 16, 16)
    before = torch.get_rng_state()
    assert adaptive_augment(x, 0.0) is x
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("channels", [1, 3])
def test_p_one_changes_every_image_keeps_shapes_and_passes_gradients(channels):
    x = torch.rand(32, channels, 16, 16, requires_grad=True)
    y = adaptive_augment(x, 1.0)
    assert y.shape == x.shape
    assert (y != x).flatten(1).any(1).all()
    y.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_each_image_is_augmented_with_probability_p_and_repeats_under_a_seed():
    x = torch.rand(4000, 1, 8, 8)  # no pixel 0: a cutout changes any image it covers
    torch.manual_seed(1)
    y = adaptive_augment(x, 0.05)
    torch.manual_seed(1)
    assert torch.equal(adaptive_augment(x, 0.05), y)
    changed = (y != x).flatten(1).any(1).float().mean().item()
    # six transforms at 5 %: 26 % of the images get at least one (a few change nothing)
    assert 0.18 < changed < 0.30, changed


# ------------------------------------------------------------------------ the controller


def controller(**kw) -> AdaptiveAugment:
    return AdaptiveAugment(ONE, **{"target": 0.6, "interval": 4, "speed_images": 1000, **kw})


def steps(ada: AdaptiveAugment, sign: float, n: int, first: int = 1, batch: int = 10) -> None:
    """n steps whose D outputs on a batch of real images all have this sign."""
    for step in range(first, first + n):
        ada.observe(torch.full((batch, 1), sign * 2.5))
        ada.step_done(step)


def test_p_rises_at_most_by_the_images_seen_over_speed_every_interval_steps():
    ada = controller()
    steps(ada, +1, 3)
    assert ada.p == 0  # not yet the interval's step
    steps(ada, +1, 1, first=4)
    assert ada.p == pytest.approx(40 / 1000)
    steps(ada, +1, 400, first=5)
    assert ada.p == 1.0  # clamped


def test_p_falls_when_d_is_unsure_and_stays_at_zero():
    ada = controller()
    steps(ada, +1, 8)
    assert ada.p == pytest.approx(0.08)
    steps(ada, -1, 4, first=9)
    assert ada.p == pytest.approx(0.04)
    steps(ada, -1, 40, first=13)
    assert ada.p == 0.0


def test_p_moves_by_the_sign_of_the_mean_sign_against_the_target():
    ada = controller()
    for signs in ([1] * 7 + [-1] * 3, [1] * 8 + [-1] * 2):  # mean 0.4, then 0.6
        ada.observe(torch.tensor(signs, dtype=torch.float32))
        ada.step_done(4)
        assert ada.p == 0.0
    ada.observe(torch.tensor([1.0] * 9 + [-1.0]))  # 0.8
    ada.step_done(4)
    assert ada.p == pytest.approx(0.01)


def test_state_round_trip_keeps_p_and_the_unused_sums():
    a, b = controller(), controller()
    steps(a, +1, 6)  # step 4 moved p; steps 5 and 6 are in the sums
    b.load_state_dict(a.state_dict())
    steps(a, +1, 2, first=7)
    steps(b, +1, 2, first=7)
    assert a.p == b.p == pytest.approx(0.08)
    b.start_fresh()
    assert b.p == 0 and not b.sums.any()


def test_augment_p_is_a_gauge_that_starts_at_zero():
    metrics = Metrics()
    assert "gan_augment_p 0.0" in metrics.render().decode()
    metrics.observe_record({"step": 1, "augment_p": 0.25})
    assert "gan_augment_p 0.25" in metrics.render().decode()


def test_ada_with_diffaugment_is_refused():
    with pytest.raises(SettingsError) as e:
        load_settings({"GAN_AUGMENT": "ada", "GAN_DIFFAUGMENT": "cutout"})
    (line,) = e.value.problems
    assert "GAN_AUGMENT=ada" in line and "GAN_DIFFAUGMENT=cutout" in line
    assert load_settings({"GAN_AUGMENT": "ada"}).ada_speed_images == 500_000


# ------------------------------------------------------------------------ real runs


def write_generated(folder, n: int) -> None:
    """n images (IDX, as the mnist dataset reads them) from the run's own generator at its first
    weights (GAN_SEED=0): G starts where the data is, so D can grow sure of the real images only
    by memorising them, which 16 images allow within a few hundred steps and 4096 do not."""
    torch.manual_seed(0)  # as Networks does before building G
    g = build_generator(Arch("dcgan", channels=1, image_size=28, latent_dim=16, width=16,
                             num_classes=0))  # fmt: skip
    z = torch.randn(n, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        x = torch.cat([g(part, None) for part in z.split(16)])  # batches of 16, in train mode
    pixels = ((x[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    folder.mkdir(parents=True)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBIII", 0, 0, 8, 3, n, 28, 28) + pixels.tobytes())
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(struct.pack(">BBBBI", 0, 0, 8, 1, n) + bytes(n))


def ada_env(tmp_path, **settings):
    """A fast D (2e-3) that can memorise, and a p that can move 0.032 in 4 steps of 16 images."""
    return job_env(tmp_path, **{
        "GAN_DATASET": "mnist", "GAN_RECIPE": "custom", "GAN_WIDTH": 16, "GAN_LR_D": 2e-3,
        "GAN_CONDITIONAL": "false", "GAN_AUGMENT": "ada", "GAN_ADA_SPEED_IMAGES": 2000,
        "GAN_LOG_EVERY": 10, "GAN_CHECKPOINT_EVERY": 1000, **settings,
    })  # fmt: skip


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize(("images", "rises"), [(16, True), (4096, False)])
def test_p_rises_when_d_overfits_a_tiny_dataset_and_stays_near_zero_on_a_large_one(
    tmp_path, images, rises
):
    write_generated(tmp_path / "data", images)
    # with an evaluation at the end: eval.jsonl rows hold p too
    features = write_extractor(tmp_path / "f.pt")
    env = ada_env(tmp_path, GAN_MAX_STEPS=200, GAN_RUN_ID="r", GAN_FID_FEATURES=features,
                  GAN_FID_EVERY=1000, GAN_FID_NUM_SAMPLES=32)  # fmt: skip
    result = run_job(env)
    assert result.returncode == 0, result.stdout + result.stderr
    p = [row["augment_p"] for row in read_jsonl(tmp_path / "runs/r/metrics.jsonl")]
    assert len(p) == 20
    later = sum(p[10:]) / 10  # measured: 0.17 on 16 images, 0.013 on 4096
    if rises:
        assert later >= 0.1, p
    else:
        assert later <= 0.04 and max(p) <= 0.1, p
    (evaluation,) = read_jsonl(tmp_path / "runs/r/eval.jsonl")
    assert evaluation["step"] == 200 and evaluation["augment_p"] == p[-1]


def test_two_ranks_hold_the_same_p_moved_by_the_images_of_both(tmp_path):
    write_generated(tmp_path / "data", 16)
    env = ada_env(tmp_path, GAN_MAX_STEPS=60, GAN_BATCH_SIZE=8, GAN_DEVICE="cpu", GAN_RUN_ID="two")
    env["PYTHONPATH"] = str(REPO)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "tests/ada_worker.py", str(tmp_path)]  # fmt: skip
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    p0, p1 = (json.loads((tmp_path / f"p-rank{r}.json").read_text()) for r in (0, 1))
    assert p0 == p1
    # each move: 4 steps of 2 ranks x 8 real images over 2000 (but for a clamp at 0)
    moves = [after - before for before, after in zip([0.0, *p0[:-1]], p0, strict=True)]
    assert any(moves)
    for move, after in zip(moves, p0, strict=True):
        assert move == 0 or abs(move) == pytest.approx(0.032) or after == 0, moves


def test_resumed_ada_run_matches_an_uninterrupted_one_bit_for_bit(tmp_path):
    write_generated(tmp_path / "data", 16)
    straight = ada_env(tmp_path, GAN_RUN_ID="straight", GAN_MAX_STEPS=30, GAN_CHECKPOINT_EVERY=10)
    assert run_job(straight).returncode == 0
    split = ada_env(tmp_path, GAN_RUN_ID="split", GAN_MAX_STEPS=10, GAN_CHECKPOINT_EVERY=10)
    assert run_job(split).returncode == 0  # step 10: two steps into an interval of 4
    split["GAN_MAX_STEPS"] = "30"
    assert run_job(split).returncode == 0
    a, b = (torch.load(tmp_path / f"runs/{r}/checkpoints/step-00000030/state.pt",
                       weights_only=False) for r in ("straight", "split"))  # fmt: skip
    assert a["augment"]["p"] > 0
    assert a["augment"]["p"] == b["augment"]["p"]
    assert torch.equal(a["augment"]["sums"], b["augment"]["sums"])
    for net in ("g", "d", "g_ema"):
        for key in a["nets"][net]:
            assert torch.equal(a["nets"][net][key], b["nets"][net][key]), f"{net}.{key} differs"
