"""The GPU path with the job's own parts (GanStep, Networks, BatchSource, the Trainer and its
checkpoints): every test is marked `gpu` and its CUDA variant skips where no GPU is visible;
scripts/gpu_check.py runs them on a GPU. Where the same check means something on the CPU too,
a CPU variant runs everywhere, so that the test code itself is proven in CI."""

from __future__ import annotations

import json
import logging
import signal
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from job.data import datasets as data
from job.data.source import BatchSource
from job.gan import losses
from job.gan.models import Arch
from job.gan.networks import Networks, unwrap
from job.gan.step import GanStep, Recipe
from job.infra import distributed
from job.infra.errors import EXIT_OK
from job.infra.launcher import STOP_SIGNALS
from job.infra.local_store import LocalStore
from job.run.build import build
from job.run.checkpoint import complete_steps, load_verified
from job.run.train import Trainer
from job.settings import Settings, load_settings
from tests.helpers import job_env, run_job, write_idx

pytestmark = pytest.mark.gpu
NO_CUDA = (
    "no CUDA GPU visible (torch.cuda.is_available() is false): scripts/gpu_check.py runs it on one"
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
CUDA = pytest.param("cuda", marks=needs_cuda)
DEVICES = ["cpu", CUDA]

MODELS = {
    "mlp": Arch("mlp", 1, 28, 16, 8, 0),
    "dcgan28": Arch("dcgan", 1, 28, 16, 8, 0, depth=1),
    "dcgan32": Arch("dcgan", 1, 32, 16, 8, 0),
    "dcgan64": Arch("dcgan", 1, 64, 16, 8, 0),
    "conditional": Arch("dcgan", 1, 28, 16, 8, 10, projection=True, depth=1),
    "r3gan32": Arch("r3gan", 3, 32, 16, 8, 0, blocks=1),
    "r3gan16-conditional": Arch("r3gan", 3, 16, 16, 8, 10, blocks=1),
}
DCGAN28, R3GAN32 = MODELS["dcgan28"], MODELS["r3gan32"]


def recipe(amp: bool, loss: str = "bce") -> Recipe:
    """fast28's step (lazy R1, due at step 0) with bf16 autocast on or off."""
    return Recipe(loss=loss, label_smoothing=0.0, r1_gamma=0.1, r1_every=16, diffaugment="",
                  amp=amp)  # fmt: skip


def r3gan_recipe(amp: bool) -> Recipe:
    """R3GAN's objective: rpgan with R1 and R2 every step."""
    return Recipe(loss="rpgan", label_smoothing=0.0, r1_gamma=0.05, r1_every=1, diffaugment="",
                  amp=amp, r2_gamma=0.05)  # fmt: skip


def steps_to_update_all(arch: Arch) -> int:
    """r3gan's blocks start as the identity (a zero last convolution): the first step moves
    only those convolutions, the second every weight before them."""
    return 2 if arch.model == "r3gan" else 1


def networks(arch: Arch, device: str, *, channels_last: bool = True, fused_adam: bool = True):
    return Networks(arch, torch.device(device), seed=0, lr_g=8e-4, lr_d=8e-4, betas=(0.5, 0.999),
                    ema_decay=0.999, channels_last=channels_last, fused_adam=fused_adam)  # fmt: skip


def real_batch(arch: Arch, device: str, n: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, arch.channels, arch.image_size, arch.image_size, generator=g) * 2 - 1
    return x.to(device), (torch.arange(n) % max(arch.num_classes, 1)).to(device)


def parameters(nets: Networks) -> dict[str, torch.Tensor]:
    named = [("g", nets.g), ("d", nets.d)]
    return {f"{k}.{n}": p.detach().clone() for k, m in named for n, p in m.named_parameters()}


# ---------------------------------------------------------------- one step


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_one_step_gives_finite_losses_and_updates_every_parameter(device, model, amp):
    arch = MODELS[model]
    nets = networks(arch, device)
    before = parameters(nets)
    gan_step = GanStep(nets, recipe(amp), device=torch.device(device))
    for step in range(steps_to_update_all(arch)):
        stats = gan_step.train(*real_batch(arch, device, seed=step), step=step)
        assert all(torch.isfinite(v).all() for v in stats.values()), stats
    after = parameters(nets)
    assert all(p.device.type == device for p in after.values())
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    assert not unchanged, f"not updated by one step: {unchanged}"
    assert all(torch.isfinite(p).all() for p in after.values())


# the dtype of D's own output under bf16 autocast: DCGAN's last convolution runs in bf16;
# r3gan's head, at 4 x 4, in float32 (job/gan/r3gan.py)
D_OUTPUT_UNDER_BF16 = {"dcgan28": torch.bfloat16, "r3gan32": torch.float32}


@pytest.mark.parametrize("loss", ["bce", "hinge"])
@pytest.mark.parametrize("model", D_OUTPUT_UNDER_BF16)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_d_logits_and_losses_in_fp32(device, model, loss, monkeypatch):
    arch = MODELS[model]
    nets = networks(arch, device)
    step = GanStep(nets, recipe(amp=True, loss=loss), device=torch.device(device))
    d_outputs, loss_inputs = [], []
    nets.d.register_forward_hook(lambda module, args, out: d_outputs.append(out.dtype))
    for name in ("d_loss", "g_loss"):
        monkeypatch.setattr(losses, name, recording(getattr(losses, name), loss_inputs))
    stats = step.train(*real_batch(arch, device), step=1)
    # D runs under autocast: on real, fake, G's fake
    assert d_outputs == [D_OUTPUT_UNDER_BF16[model]] * 3
    assert loss_inputs == [torch.float32] * 3, "D's logits as the losses get them"
    assert {k: v.dtype for k, v in stats.items()} == dict.fromkeys(stats, torch.float32)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_an_r3gan_step_with_rpgan_and_both_penalties_trains_every_parameter(
    device, amp, monkeypatch
):
    """R1's and R2's double backward through the float32 and bf16 stages, rpgan's paired
    logits in fp32, every parameter moved within two steps."""
    nets = networks(R3GAN32, device)
    before = parameters(nets)
    penalties = []
    for name in ("r1_penalty", "r2_penalty"):
        monkeypatch.setattr(losses, name, noting(getattr(losses, name), penalties))
    gan_step = GanStep(nets, r3gan_recipe(amp), device=torch.device(device))
    loss_inputs = []
    monkeypatch.setattr(losses, "g_loss", recording(losses.g_loss, loss_inputs))
    for step in range(2):
        stats = gan_step.train(*real_batch(R3GAN32, device, seed=step), step=step)
        assert all(torch.isfinite(v).all() for v in stats.values()), stats
    assert len(penalties) == 4 and all(p.dtype == torch.float32 for p in penalties)
    assert all(torch.isfinite(p) and p > 0 for p in penalties), penalties
    assert loss_inputs == [torch.float32] * 4, "D's logits of fakes and reals, in G's loss"
    after = parameters(nets)
    unchanged = [name for name, p in after.items() if torch.equal(p, before[name])]
    # rpgan sees D(fake) - D(real) only, and the penalties D's gradients: the logit's bias
    # cancels out of every loss
    assert unchanged == ["d.out.bias"], f"not updated by two steps: {unchanged}"
    assert all(torch.isfinite(p).all() for p in after.values())


def noting(penalty_fn, values: list):
    """penalty_fn, keeping each penalty it returns."""

    def wrapper(*args, **options):
        penalty = penalty_fn(*args, **options)
        values.append(penalty.detach())
        return penalty

    return wrapper


def recording(loss_fn, dtypes: list):
    """loss_fn, noting the dtype of every logits tensor it is given."""

    def wrapper(kind, *logits, **options):
        dtypes.extend(t.dtype for t in logits if isinstance(t, torch.Tensor))
        return loss_fn(kind, *logits, **options)

    return wrapper


# reference optimizer of the fused-Adam test: foreach on a GPU (the comparison); on the
# CPU, where the job's "fused" is foreach, the single-tensor loop
REFERENCE_ADAM = {"cuda": "foreach", "cpu": "for-loop"}


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adam_matches_the_reference_adam_over_a_few_steps(device):
    fast, ref = networks(DCGAN28, device), networks(DCGAN28, device, fused_adam=False)
    if device == "cuda":
        assert fast.opt_g.defaults["fused"] and fast.opt_d.defaults["fused"]
    for group in ref.opt_g.param_groups + ref.opt_d.param_groups:
        group["foreach"] = REFERENCE_ADAM[device] == "foreach"
    start = parameters(ref)
    gan_steps = [
        GanStep(nets, recipe(amp=False), device=torch.device(device)) for nets in (fast, ref)
    ]
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        for i in range(4):
            batch = real_batch(DCGAN28, device, seed=i)
            for gan_step in gan_steps:
                torch.manual_seed(i)  # the same noise for both
                gan_step.train(*batch, step=i)
    moved_fast, moved_ref = parameters(fast), parameters(ref)
    for name, p in moved_ref.items():
        update_ref, update_fast = p - start[name], moved_fast[name] - start[name]
        assert update_ref.norm() > 0, name
        gap = (update_fast - update_ref).norm() / update_ref.norm()
        assert gap < 1e-3, f"{name}: fused and {REFERENCE_ADAM[device]} Adam differ by {gap:.2e}"


# ---------------------------------------------------------------- batches and memory layout


@pytest.mark.parametrize("on_device", [True, False], ids=["data-on-device", "data-on-host"])
@pytest.mark.parametrize("device", DEVICES)
def test_batches_on_the_device_are_the_cpu_batches(tmp_path, device, on_device):
    images = data.load_idx_dataset("mnist", write_idx(tmp_path, n=96), conditional=False)
    here = BatchSource(images, 16, seed=3, device=torch.device(device), on_device=on_device)
    cpu = BatchSource(images, 16, seed=3, device=torch.device("cpu"))
    for _ in range(8):  # past the end of the first epoch (6 batches)
        (x, y), (x_cpu, y_cpu) = here.next(), cpu.next()
        assert x.device.type == y.device.type == device
        # the same images; CUDA divides by a scalar as a product with its reciprocal (1 ulp)
        assert torch.allclose(x.cpu(), x_cpu, rtol=0, atol=1e-6) and torch.equal(y.cpu(), y_cpu)
    assert here.position == cpu.position


@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_nets_compute_what_contiguous_nets_do(device):
    last, plain = networks(DCGAN28, device), networks(DCGAN28, device, channels_last=False)
    assert last.channels_last and not plain.channels_last
    conv = next(m for m in last.d.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    real, labels = real_batch(DCGAN28, device)
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                    allow_tf32=False):  # fmt: skip
        z = torch.randn(len(real), DCGAN28.latent_dim, device=device)
        assert torch.allclose(last.g(z), plain.g(z), rtol=1e-4, atol=1e-5)
        assert torch.allclose(last.d(real), plain.d(real), rtol=1e-4, atol=1e-5)
        stats = []
        for nets in (last, plain):
            torch.manual_seed(0)
            stats.append(GanStep(nets, recipe(amp=False), device=torch.device(device)).train(
                real, labels, step=0
            ))  # fmt: skip
    for key in ("d_loss", "g_loss", "d_real", "d_fake"):
        assert torch.allclose(stats[0][key], stats[1][key], rtol=1e-4, atol=1e-6), key


# ---------------------------------------------------------------- the Trainer on the device


def settings_for(tmp: Path, device: str, **more: object) -> Settings:
    """Small run settings on write_idx images (written once per tmp folder)."""
    if not (tmp / "data").exists():
        write_idx(tmp / "data", n=128)
    env = job_env(tmp, GAN_DATASET="mnist", GAN_DEVICE=device, GAN_RUN_ID="gpu",
                  GAN_SAMPLE_EVERY=1000, **more)  # fmt: skip
    return load_settings({k: v for k, v in env.items() if k.startswith("GAN_")})


def started(settings: Settings) -> Trainer:
    """A Trainer built in this process and resumed (or started fresh), not yet run."""
    trainer = Trainer(build(settings, distributed.setup(settings.device)))
    trainer.resume()
    return trainer


def trained(trainer: Trainer) -> int:
    """Run a started Trainer to its end, then close it; its exit status. The stop-signal
    handlers its budget installs are taken back off afterwards."""
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        trainer.wrap()
        return trainer.run()
    finally:
        trainer.close()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run_dir(tmp: Path) -> Path:
    return tmp / "runs" / "gpu"


@pytest.mark.parametrize(
    "devices",
    [("cpu", "cpu", "cpu"), pytest.param(("cuda", "cpu", "cuda"), marks=needs_cuda)],
    ids=["cpu-cpu-cpu", "cuda-cpu-cuda"],
)
def test_a_checkpoint_written_on_one_device_resumes_on_the_other(tmp_path, devices):
    for leg, device in enumerate(devices):
        steps = 4 * (leg + 1)
        trainer = started(settings_for(tmp_path, device, GAN_MAX_STEPS=steps,
                                       GAN_CHECKPOINT_EVERY=4))  # fmt: skip
        if leg:  # resumed where the last leg, on the other device, left off
            assert trainer.budget.step == steps - 4
            saved = load_verified(LocalStore(run_dir(tmp_path)), steps - 4)["nets"]
            for name in ("g", "d"):
                own = unwrap(getattr(trainer.nets, name)).state_dict()
                assert own.keys() == saved[name].keys()
                assert all(torch.equal(own[k].cpu(), saved[name][k]) for k in own), name
            adam = next(iter(trainer.nets.opt_d.state.values()))
            assert adam["exp_avg"].device.type == device
        assert trained(trainer) == EXIT_OK
        assert trainer.budget.step == steps
        assert all(p.device.type == device for p in trainer.nets.g_ema.parameters())
    assert complete_steps(LocalStore(run_dir(tmp_path)))[-1] == 12


@pytest.mark.parametrize("device", DEVICES)
def test_progress_records_report_cuda_memory_on_a_gpu_only(tmp_path, device):
    trainer = started(settings_for(tmp_path, device, GAN_MAX_STEPS=4, GAN_LOG_EVERY=2))
    assert trained(trainer) == EXIT_OK
    rows = [json.loads(line) for line in (run_dir(tmp_path) / "metrics.jsonl").open()]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        if device == "cpu":
            assert "gpu_memory_bytes" not in row and "gpu_memory_peak_bytes" not in row
        else:
            assert row["gpu_memory_peak_bytes"] >= row["gpu_memory_bytes"] > 0


@pytest.mark.parametrize("device", DEVICES)
def test_the_startup_block_names_the_device(tmp_path, device, caplog):
    caplog.set_level(logging.INFO, logger="job.run.artifacts")
    started(settings_for(tmp_path, device)).close()
    (block,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("starting")]
    (line,) = [line.strip() for line in block.splitlines() if line.strip().startswith("device:")]
    if device == "cpu":
        assert line.startswith("device: cpu"), line
        return
    p = torch.cuda.get_device_properties(0)
    assert p.name in line and f"{p.total_memory / 2**30:.1f} GiB" in line, line
    assert f"compute capability {p.major}.{p.minor}" in line, line


@needs_cuda
def test_compile_trains_and_checkpoints_on_the_gpu(tmp_path):
    write_idx(tmp_path / "data", n=128)
    env = job_env(tmp_path, GAN_DATASET="mnist", GAN_DEVICE="cuda", GAN_COMPILE="true",
                  GAN_RUN_ID="gpu", GAN_CHECKPOINT_EVERY=3, GAN_SAMPLE_EVERY=1000)  # fmt: skip
    first = run_job(env | {"GAN_MAX_STEPS": "6"}, timeout=240)
    assert first.returncode == EXIT_OK, first.stderr[-3000:]
    store = LocalStore(run_dir(tmp_path))
    assert complete_steps(store) == [3, 6]
    saved = load_verified(store, 6)["nets"]
    assert not [k for k in saved["g"] if "_orig_mod" in k], "compile's wrapper in the checkpoint"
    again = run_job(env | {"GAN_MAX_STEPS": "8"}, timeout=240)
    assert again.returncode == EXIT_OK, again.stderr[-3000:]
    assert "resumed from step 6" in again.stderr and complete_steps(store)[-1] == 8


# ---------------------------------------------------------------- the process group


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device", DEVICES)
def test_a_one_process_group_initialises_and_all_reduces(device):
    """NCCL on a GPU, gloo on the CPU, joined as distributed.setup() joins them (two NCCL
    processes cannot share one GPU)."""
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{free_port()}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        device_id=torch.device(device, 0) if device == "cuda" else None,
    )
    try:
        assert dist.get_backend() == backend
        t = torch.tensor([1.0, -2.5], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        assert t.tolist() == [1.0, -2.5]
        objects = [None]
        dist.all_gather_object(objects, {"rank": 0})
        assert objects == [{"rank": 0}]
        dist.barrier()
    finally:
        dist.destroy_process_group()
