"""`python -m job.bench`: gan-job's training loop against a plain tutorial loop, side by side.

Both loops train the same models (job.models, the same Arch) at the same batch size on the same
device, in one process, in alternating timed windows (R repeats, each loop warmed up before each
of its windows), so the ratio is measured under the same machine load:

- job: a Trainer built from the GAN_* settings (metrics off, artifacts in a temporary folder,
  no FID), timing Trainer.train_step() - the in-memory uint8 BatchSource and the fast-path
  settings (GAN_DATA_ON_DEVICE, GAN_AMP, GAN_CHANNELS_LAST, GAN_FUSED_ADAM, GAN_COMPILE).
- ref: the way tutorials write it (PyTorch's DCGAN tutorial): a torchvision dataset reading the
  same IDX files with Resize + ToTensor + Normalize per image, a DataLoader with 2 worker
  processes and shuffle, .to(device) per batch, plain Adam, labels made per batch with
  torch.ones/zeros, BCE-with-logits, and loss.item() every step.

It also reports the time each loop spent getting batches, peak memory, the cost of one FID
evaluation with the configured extractor, and (from FlopCounterMode) model FLOPs per image and
the achieved fraction of the GPU's peak. Command-line flags override the GAN_* variables.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from job import data as datamod
from job import distributed, evaluate
from job.errors import EXIT_OK, EXIT_UNEXPECTED, FIDError, JobError
from job.models import Arch, build_discriminator, build_generator
from job.settings import Settings, load_settings, public_dict

log = logging.getLogger("job.bench")
STARTED = time.perf_counter()


def _progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


DEFAULTS = {  # flag -> (GAN_* variable, value when neither the flag nor the variable is set)
    "model": ("GAN_MODEL", "dcgan"),
    "image_size": ("GAN_IMAGE_SIZE", "64"),
    "batch_size": ("GAN_BATCH_SIZE", "64"),
    "dataset": ("GAN_DATASET", "fashion-mnist"),
}
REF_WORKERS = 2  # as in PyTorch's DCGAN tutorial

# Dense peak TFLOP/s by device name (substring, first match wins), from NVIDIA's data sheets.
PEAK_TFLOPS: list[tuple[str, str, dict[str, float]]] = [
    ("H100 PCIe", "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", "H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", "H100 SXM", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H200", "H200 (as H100 SXM)", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("A100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


# ---------------------------------------------------------------- settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m job.bench",
        description="gan-job's training loop against a plain tutorial loop, side by side on this "
        "device. Settings come from GAN_* variables; these flags override them.",
    )
    p.add_argument("--steps", type=int, default=50, help="timed steps per window (default 50)")
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps before every window (default 5)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="windows per loop, alternating (default 3)"
    )
    p.add_argument("--model", choices=("mlp", "dcgan"), help="default: $GAN_MODEL or dcgan")
    p.add_argument("--image-size", type=int, help="default: $GAN_IMAGE_SIZE or 64")
    p.add_argument("--batch-size", type=int, help="default: $GAN_BATCH_SIZE or 64")
    p.add_argument(
        "--dataset", help="default: $GAN_DATASET or fashion-mnist (offline from Debian's copy)"
    )
    p.add_argument(
        "--fid-samples", type=int, default=10_000, help="samples of the FID timing (default 10000)"
    )
    p.add_argument("--skip-fid", action="store_true", help="do not time an FID evaluation")
    p.add_argument(
        "--fid-standin",
        metavar="PATH",
        help="a TorchScript extractor to time when GAN_FID_FEATURES is the default inception "
        "and its weights are missing",
    )
    p.add_argument(
        "--threads", type=int, help="torch.set_num_threads for both loops (default: torch's)"
    )
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    return p


def _check(args: argparse.Namespace) -> list[str]:
    problems = []
    for flag, value, low in (
        ("--steps", args.steps, 1),
        ("--warmup", args.warmup, 0),
        ("--repeats", args.repeats, 1),
        ("--fid-samples", args.fid_samples, 2),
    ):
        if value < low:
            problems.append(f"{flag} {value}: expected an integer >= {low}")
    if args.threads is not None and args.threads < 1:
        problems.append(f"--threads {args.threads}: expected an integer >= 1")
    if args.fid_standin and not Path(args.fid_standin).is_file():
        problems.append(f"--fid-standin {args.fid_standin}: no such file")
    return problems


def bench_environ(args: argparse.Namespace, environ: dict[str, str]) -> dict[str, str]:
    """The GAN_* variables of this environment with the flags (and the bench defaults) applied."""
    env = {k: v for k, v in environ.items() if k.startswith("GAN_")}
    for name, (var, default) in DEFAULTS.items():
        value = getattr(args, name)
        if value is not None:
            env[var] = str(value)
        else:
            env.setdefault(var, default)
    return env


def trainer_settings(env: dict[str, str], artifacts: Path) -> Settings:
    """The settings of the timed Trainer: nothing served, pushed, resumed or evaluated."""
    return load_settings(
        env
        | {
            "GAN_ARTIFACT_URI": str(artifacts),
            "GAN_RUN_ID": "bench",
            "GAN_RESUME": "never",
            "GAN_METRICS_PORT": "0",
            "GAN_PUSHGATEWAY_URL": "",
            "GAN_FID_FEATURES": "none",
        }
    )


# ---------------------------------------------------------------- measuring helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_kib(field_name: str, pid: str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _pss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process, from /proc/<pid>/stat (0 if unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


class Memory:
    """Peak memory of one timed window.

    CUDA: torch.cuda.max_memory_allocated (reset before the window). CPU: the process's peak
    resident set (VmHWM), reset before the window by writing 5 to /proc/self/clear_refs; where
    that is not allowed, getrusage's ru_maxrss (the process's lifetime peak, not per window).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = (
            "torch.cuda.max_memory_allocated, reset per window"
            if device.type == "cuda"
            else "peak RSS of the process (VmHWM), reset per window via /proc/self/clear_refs"
        )
        self.start_mib = 0.0

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_mib = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.method = "getrusage ru_maxrss (lifetime peak of the process, not reset per window)"
        self.start_mib = (_proc_kib("VmRSS") or 0) / 1024

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method.startswith("getrusage"):
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return (_proc_kib("VmHWM") or 0) / 1024


@dataclass
class Window:
    images: int
    seconds: float
    data_seconds: float
    peak_mib: float
    start_mib: float
    cpu_seconds: float  # this process's threads plus the loop's worker processes

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


@dataclass
class LoopResult:
    windows: list[Window] = field(default_factory=list)

    @property
    def images_per_s(self) -> list[float]:
        return [w.images_per_s for w in self.windows]

    def summary(self) -> dict:
        ws = self.windows
        return {
            "images_per_s_median": statistics.median(self.images_per_s),
            "images_per_s": [round(x, 3) for x in self.images_per_s],
            "seconds": [round(w.seconds, 4) for w in ws],
            "images_per_window": ws[0].images,
            "data_seconds": [round(w.data_seconds, 4) for w in ws],
            "data_seconds_median": statistics.median(w.data_seconds for w in ws),
            "data_fraction_median": statistics.median(w.data_seconds / w.seconds for w in ws),
            "cpu_seconds": [round(w.cpu_seconds, 3) for w in ws],
            "images_per_cpu_s_median": statistics.median(w.images / w.cpu_seconds for w in ws),
            "cores_used": [round(w.cpu_seconds / w.seconds, 2) for w in ws],
            "peak_memory_mib": round(max(w.peak_mib for w in ws), 1),
            "memory_at_window_start_mib": round(min(w.start_mib for w in ws), 1),
        }


# ---------------------------------------------------------------- gan-job's loop


class JobLoop:
    """A Trainer stepping as Trainer.run() does, with BatchSource.next() timed from outside."""

    name = "job"

    def __init__(self, settings: Settings, world: distributed.World):
        from job.train import Trainer

        self.trainer = Trainer(settings, world)
        self.trainer.resume()
        self.trainer.wrap()
        self.batch = settings.batch_size
        self.data_seconds = 0.0
        source = self.trainer.source
        inner = source.next

        def timed_next():
            t0 = time.perf_counter()
            try:
                return inner()
            finally:
                self.data_seconds += time.perf_counter() - t0

        source.next = timed_next  # this instance only: train_step() calls self.source.next()

    def worker_cpu_seconds(self) -> float:
        return 0.0  # in-memory datasets: no worker processes

    def step(self) -> int:
        self.trainer.train_step()
        st = self.trainer.state
        st.step += 1
        st.images_seen += self.batch
        return self.batch

    def close(self) -> None:
        self.trainer.close()


# ---------------------------------------------------------------- the tutorial loop


def _copy_unzipped(src: Path, dst: Path) -> None:
    opener = gzip.open if src.suffix == ".gz" else open
    with opener(src, "rb") as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)


def reference_dataset(settings: Settings, channels: int, root: Path):
    """The training split as torchvision reads it, transformed per image as tutorials do."""
    import torchvision.datasets as tvd
    import torchvision.transforms as T

    size = settings.resolved_image_size
    normalize = T.Normalize((0.5,) * channels, (0.5,) * channels)
    kind = settings.dataset_kind
    if kind in datamod.IDX_DATASETS:
        # torchvision wants the four unpacked IDX files under <root>/<Name>/raw/
        tv_name = datamod.IDX_DATASETS[kind]
        roots = datamod._idx_roots(kind, Path(settings.data_dir))
        raw = root / tv_name / "raw"
        raw.mkdir(parents=True, exist_ok=True)
        for split in ("train", "test"):
            found = datamod._find_idx(kind, roots, split)
            for src, stem in zip(found or (None, None), datamod.idx_files(split), strict=True):
                if src is not None:
                    _copy_unzipped(src, raw / stem)
                else:  # torchvision checks that the test files exist, but reads only train's
                    (raw / stem).touch()
        cls = {"MNIST": tvd.MNIST, "KMNIST": tvd.KMNIST, "FashionMNIST": tvd.FashionMNIST}[tv_name]
        transform = T.Compose([T.Resize(size), T.ToTensor(), normalize])
        return cls(str(root), train=True, transform=transform)
    if kind == "cifar10":
        transform = T.Compose([T.Resize(size), T.ToTensor(), normalize])
        return tvd.CIFAR10(settings.data_dir, train=True, transform=transform)
    if kind == "folder":
        transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), normalize])
        return tvd.ImageFolder(settings.dataset.removeprefix("folder:"), transform=transform)
    raise JobError(f"GAN_DATASET={settings.dataset}: the reference loop reads local datasets only")


def dataset_bytes(dataset) -> int:
    data = getattr(dataset, "data", None)
    if isinstance(data, torch.Tensor):
        return data.numel() * data.element_size()
    return int(getattr(data, "nbytes", 0))


class ReferenceLoop:
    """PyTorch's DCGAN tutorial loop, with the models of job.models."""

    name = "ref"

    def __init__(self, arch: Arch, settings: Settings, dataset, device: torch.device):
        torch.manual_seed(settings.seed)
        self.arch, self.device = arch, device
        self.g = build_generator(arch).to(device)
        self.d = build_discriminator(arch).to(device)
        betas = (settings.beta1, settings.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=settings.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=settings.lr_d, betas=betas)
        self.criterion = nn.BCEWithLogitsLoss()
        self.loader = DataLoader(
            dataset, batch_size=settings.batch_size, shuffle=True, num_workers=REF_WORKERS
        )
        self.iterator = None
        self.data_seconds = 0.0
        self.worker_cpu: dict[int, float] = {}  # worker pid -> CPU seconds, last reading
        self.losses: tuple[float, float] = (0.0, 0.0)

    def _next_batch(self):
        t0 = time.perf_counter()
        try:
            if self.iterator is None:
                self.iterator = iter(self.loader)
            try:
                return next(self.iterator)
            except StopIteration:  # a new epoch
                self.iterator = iter(self.loader)
                return next(self.iterator)
        finally:
            self.data_seconds += time.perf_counter() - t0

    def step(self) -> int:
        real, labels = self._next_batch()
        self.worker_cpu_seconds()
        real, labels = real.to(self.device), labels.to(self.device)
        b = real.size(0)
        k = self.arch.num_classes
        real_labels = labels if k else None
        real_target = torch.ones(b, device=self.device)
        fake_target = torch.zeros(b, device=self.device)

        # D: maximise log D(x) + log(1 - D(G(z)))
        self.d.zero_grad()
        err_real = self.criterion(self.d(real, real_labels), real_target)
        err_real.backward()
        z = torch.randn(b, self.arch.latent_dim, device=self.device)
        fake_labels = torch.randint(k, (b,), device=self.device) if k else None
        fake = self.g(z, fake_labels)
        err_fake = self.criterion(self.d(fake.detach(), fake_labels), fake_target)
        err_fake.backward()
        loss_d = err_real + err_fake
        self.opt_d.step()

        # G: maximise log D(G(z))
        self.g.zero_grad()
        loss_g = self.criterion(self.d(fake, fake_labels), real_target)
        loss_g.backward()
        self.opt_g.step()
        self.losses = (loss_d.item(), loss_g.item())
        return b

    def _worker_pids(self) -> list[int]:
        return [w.pid for w in getattr(self.iterator, "_workers", None) or [] if w.pid]

    def worker_cpu_seconds(self) -> float:
        """CPU time of every worker this loop started: an epoch's end shuts its workers down,
        so each one's last reading (taken every step) stands for it once it is gone."""
        for pid in self._worker_pids():
            self.worker_cpu[pid] = max(_cpu_seconds(pid), self.worker_cpu.get(pid, 0.0))
        return sum(self.worker_cpu.values())

    def worker_pss_mib(self) -> float | None:
        sizes = [_pss_kib(pid) for pid in self._worker_pids()]
        sizes = [s for s in sizes if s is not None]
        return sum(sizes) / 1024 if sizes else None

    def close(self) -> None:
        shutdown = getattr(self.iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self.iterator = None


# ---------------------------------------------------------------- timing


def timed_window(loop, steps: int, warmup: int, device: torch.device, memory: Memory) -> Window:
    """warmup untimed steps, then steps timed with the device synchronized only at both ends."""
    for _ in range(warmup):
        loop.step()
    _sync(device)
    memory.reset()
    loop.data_seconds = 0.0
    images = 0
    cpu0 = time.process_time() + loop.worker_cpu_seconds()
    t0 = time.perf_counter()
    for _ in range(steps):
        images += loop.step()
    _sync(device)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() + loop.worker_cpu_seconds() - cpu0
    return Window(images, seconds, loop.data_seconds, memory.peak_mib(), memory.start_mib, cpu)


def run_side_by_side(loops, args, device: torch.device, memory: Memory) -> dict[str, LoopResult]:
    """R repeats; the order flips every repeat (ref job, job ref, ...) to cancel drift."""
    results = {loop.name: LoopResult() for loop in loops}
    for r in range(args.repeats):
        order = loops if r % 2 == 0 else loops[::-1]
        line = []
        for loop in order:
            w = timed_window(loop, args.steps, args.warmup, device, memory)
            results[loop.name].windows.append(w)
            line.append(f"{loop.name} {w.images_per_s:.1f} img/s ({w.seconds:.2f} s)")
        _progress(f"repeat {r + 1}/{args.repeats}: " + ", ".join(line))
    return results


# ---------------------------------------------------------------- FLOPs and peak


def flops_per_image(arch: Arch, batch: int, device: torch.device, amp: bool) -> float:
    """Model FLOPs of one D+G training step (forwards and backwards) per image, counted by
    FlopCounterMode on fresh copies of the models (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    g = build_generator(arch).to(device)
    d = build_discriminator(arch).to(device)
    bce = nn.BCEWithLogitsLoss()
    n = max(1, min(batch, 16))  # FLOPs scale with the batch; a small one keeps this cheap
    real = torch.rand(n, arch.channels, arch.image_size, arch.image_size, device=device) * 2 - 1
    z = torch.randn(n, arch.latent_dim, device=device)
    labels = torch.randint(arch.num_classes, (n,), device=device) if arch.num_classes else None
    ones, zeros = torch.ones(n, device=device), torch.zeros(n, device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        fake = g(z, labels)
        loss_d = bce(d(real, labels).float(), ones) + bce(d(fake.detach(), labels).float(), zeros)
        loss_d.backward()
        loss_g = bce(d(fake, labels).float(), ones)
        loss_g.backward()
    return counter.get_total_flops() / n


def device_peak(device: torch.device, amp: bool) -> dict:
    """The assumed dense peak FLOP/s of the precision the job trains in, or unknown."""
    if device.type != "cuda":
        return {"known": False, "assumption": "CPU: no peak FLOP/s assumed (unknown)"}
    name = torch.cuda.get_device_name(device)
    if amp:
        precision = "bf16"
    elif torch.backends.cudnn.allow_tf32:  # torch's default: fp32 convolutions run as TF32
        precision = "tf32"
    else:
        precision = "fp32"
    for key, label, table in PEAK_TFLOPS:
        if key in name:
            return {
                "known": True,
                "precision": precision,
                "tflops": table[precision],
                "table": table,
                "assumption": f"{name}: taken as {label}, dense {precision} peak "
                f"{table[precision]:g} TFLOP/s (bf16 {table['bf16']:g}, tf32 {table['tf32']:g}, "
                f"fp32 {table['fp32']:g})",
            }
    return {
        "known": False,
        "precision": precision,
        "assumption": f"{name}: peak FLOP/s unknown for this device",
    }


# ---------------------------------------------------------------- FID


def fid_cost(args, env: dict[str, str], job: JobLoop, device: torch.device) -> dict:
    """Seconds of one FID evaluation (--fid-samples generated images) with GAN_FID_FEATURES."""
    if args.skip_fid:
        return {"skipped": "--skip-fid"}
    trainer = job.trainer
    channels = trainer.arch.channels
    settings = load_settings(env | {"GAN_FID_NUM_SAMPLES": str(args.fid_samples)})
    note = None
    try:
        extractor = evaluate.load_extractor(settings, channels, device)
        missing = None if extractor is not None else "InceptionV3 weights missing"
    except FIDError as exc:
        if settings.fid_features != "inception":
            return {"skipped": f"extractor unavailable: {exc}"}
        extractor, missing = None, f"InceptionV3 unavailable ({exc})"
    if extractor is None and settings.fid_features == "none":
        return {"skipped": "GAN_FID_FEATURES=none"}
    if extractor is None:  # inception without its weights
        if not args.fid_standin:
            return {
                "skipped": f"{missing}: pass --fid-standin PATH (a TorchScript extractor, e.g. "
                "from `python -m job features`) to time one instead"
            }
        standin = load_settings(env | {"GAN_FID_FEATURES": str(Path(args.fid_standin).resolve())})
        extractor = evaluate.load_extractor(standin, channels, device)
        note = f"{missing}; timed the TorchScript stand-in {args.fid_standin} instead"
    num = args.fid_samples
    seed = settings.seed
    _progress(f"timing one FID evaluation ({extractor.name}, {num} samples)")
    images, _ = datamod.real_images(trainer.data, num, seed)
    _sync(device)
    t0 = time.perf_counter()
    real_state = evaluate.real_statistics(extractor, images, device)
    _sync(device)
    real_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = evaluate.compute_fid(
        extractor, real_state, trainer.g_ema, trainer.arch.latent_dim, trainer.arch.num_classes,
        num, seed + 1, device,
    )  # fmt: skip
    _sync(device)
    seconds = time.perf_counter() - t0
    return {
        "extractor": extractor.name,
        "note": note,
        "samples": num,
        "seconds": seconds,
        "samples_per_s": num / seconds,
        "real_statistics_seconds": real_seconds,
        "real_images": len(images),
        "fid": fid,
    }


# ---------------------------------------------------------------- report


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(report: dict) -> str:
    job, ref = report["job"], report["ref"]
    rows = [
        ("images/s (median)", _fmt(ref["images_per_s_median"]), _fmt(job["images_per_s_median"])),
        (
            "images/s (each window)",
            " ".join(_fmt(x) for x in ref["images_per_s"]),
            " ".join(_fmt(x) for x in job["images_per_s"]),
        ),
        (
            "getting batches, s/window (median)",
            _fmt(ref["data_seconds_median"], ".3f"),
            _fmt(job["data_seconds_median"], ".3f"),
        ),
        (
            "getting batches, share of time",
            f"{ref['data_fraction_median']:.1%}",
            f"{job['data_fraction_median']:.1%}",
        ),
        (
            "CPU cores busy (each window)",
            " ".join(_fmt(x, ".2f") for x in ref["cores_used"]),
            " ".join(_fmt(x, ".2f") for x in job["cores_used"]),
        ),
        (
            "images per CPU-second (median)",
            _fmt(ref["images_per_cpu_s_median"], ".2f"),
            _fmt(job["images_per_cpu_s_median"], ".2f"),
        ),
        ("peak memory, MiB", _fmt(ref["peak_memory_mib"]), _fmt(job["peak_memory_mib"])),
        (
            "memory at window start, MiB",
            _fmt(ref["memory_at_window_start_mib"]),
            _fmt(job["memory_at_window_start_mib"]),
        ),
        ("dataset held, MiB", _fmt(ref["dataset_mib"]), _fmt(job["dataset_mib"])),
    ]
    if ref.get("worker_pss_mib") is not None:
        rows.append(("DataLoader workers' PSS, MiB", _fmt(ref["worker_pss_mib"]), "-"))
    flops = report["flops"]
    if flops.get("achieved_tflops"):
        rows.append(
            (
                "achieved TFLOP/s",
                _fmt(flops["achieved_tflops"]["ref"], ".3f"),
                _fmt(flops["achieved_tflops"]["job"], ".3f"),
            )
        )
    if flops.get("fraction_of_peak"):
        rows.append(
            (
                "fraction of peak",
                f"{flops['fraction_of_peak']['ref']:.2%}",
                f"{flops['fraction_of_peak']['job']:.2%}",
            )
        )
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "ref (tutorial)", "")])
    lines = [
        f"{report['device_name']} | torch {report['torch']} | {report['threads']} threads | "
        f"{report['settings']['model']} {report['arch']['image_size']} px, batch "
        f"{report['settings']['batch_size']}, width {report['settings']['width']}, "
        f"{report['settings']['dataset']}",
        f"{args_line(report['args'])}",
        "",
        f"{'':<{w0}}  {'ref (tutorial)':>{w1}}  gan-job",
    ]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    lines += [
        "",
        f"ratio job/ref (medians): {report['ratio']:.2f}x   "
        f"side-by-side pairs: {' '.join(f'{x:.2f}' for x in report['ratio_pairs'])}",
        f"ratio job/ref in images per CPU-second: {report['ratio_per_cpu_second']:.2f}x "
        "(CPU-seconds: every thread of this process plus the reference loop's DataLoader "
        "workers; steadier than wall time on a shared machine)",
        f"memory: {report['memory_method']}",
        f"job fast path: {report['job_fast_path']}",
    ]
    if flops.get("per_image"):
        lines.append(
            f"model FLOPs per image (one D+G step, fwd+bwd): {flops['per_image'] / 1e9:.3f} GFLOP"
        )
    lines.append(f"peak assumed: {report['peak']['assumption']}")
    fid = report["fid"]
    if "skipped" in fid:
        lines.append(f"FID cost: skipped ({fid['skipped']})")
    else:
        lines.append(
            f"FID cost ({fid['extractor']}, {fid['samples']} samples): {fid['seconds']:.1f} s, "
            f"{fid['samples_per_s']:.0f} samples/s; real statistics (once, cached) "
            f"{fid['real_statistics_seconds']:.1f} s"
            + (f" [{fid['note']}]" if fid.get("note") else "")
        )
    return "\n".join(lines)


def args_line(a: dict) -> str:
    return f"{a['steps']} timed steps after {a['warmup']} warm-up, {a['repeats']} repeats per loop"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if problems := _check(args):
        for p in problems:
            print(p, file=sys.stderr)
        return 2
    try:
        return _bench(args)
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Exception:
        log.exception("unexpected failure")
        return EXIT_UNEXPECTED


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _bench(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    env = bench_environ(args, dict(os.environ))
    with tempfile.TemporaryDirectory(prefix="gan-bench-") as tmp:
        settings = trainer_settings(env, Path(tmp) / "runs")
        world = distributed.setup(settings.device)
        device = world.device
        _progress(f"building gan-job's Trainer on {device}")
        job = JobLoop(settings, world)
        try:
            report = _measure(args, env, settings, job, Path(tmp), device)
        finally:
            job.close()
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return EXIT_OK


def _measure(args, env, settings: Settings, job: JobLoop, tmp: Path, device) -> dict:
    trainer, arch = job.trainer, job.trainer.arch
    _progress("building the reference loop (torchvision dataset, DataLoader)")
    ref_data = reference_dataset(settings, arch.channels, tmp / "torchvision")
    ref = ReferenceLoop(arch, settings, ref_data, device)
    _progress("timing")
    memory = Memory(device)
    try:
        results = run_side_by_side([ref, job], args, device, memory)
        worker_pss = ref.worker_pss_mib()
    finally:
        ref.close()
    report_job, report_ref = results["job"].summary(), results["ref"].summary()
    source = trainer.source
    job_bytes = source.images.numel() * source.images.element_size() if source.in_memory else 0
    report_job["dataset_mib"] = job_bytes / 2**20
    report_ref["dataset_mib"] = dataset_bytes(ref_data) / 2**20
    report_ref["worker_pss_mib"] = worker_pss
    job_ips, ref_ips = results["job"].images_per_s, results["ref"].images_per_s
    pairs = [j / r for j, r in zip(job_ips, ref_ips, strict=True)]
    ratio = report_job["images_per_s_median"] / report_ref["images_per_s_median"]
    ratio_cpu = report_job["images_per_cpu_s_median"] / report_ref["images_per_cpu_s_median"]

    _progress("counting FLOPs")
    per_image = flops_per_image(arch, settings.batch_size, device, trainer.amp)
    peak = device_peak(device, trainer.amp)
    achieved = {
        k: per_image * r["images_per_s_median"] / 1e12
        for k, r in (("job", report_job), ("ref", report_ref))
    }
    flops = {"per_image": per_image, "achieved_tflops": achieved}
    if peak.get("known"):
        flops["fraction_of_peak"] = {k: v / peak["tflops"] for k, v in achieved.items()}
    fid = fid_cost(args, env, job, device)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"CPU: {_cpu_name()} ({os.cpu_count()} cores)"
    opt = trainer.opt_d.defaults
    return {
        "device": device.type,
        "device_name": device_name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "settings": public_dict(settings),
        "arch": arch.to_dict(),
        "job_fast_path": {
            "data_on_device": settings.data_on_device,
            "amp_bf16": trainer.amp,
            "channels_last": trainer.channels_last,
            "adam": {"fused": opt.get("fused"), "foreach": opt.get("foreach")},
            "compile": settings.compile,
        },
        "ref_workers": REF_WORKERS,
        "job": report_job,
        "ref": report_ref,
        "ratio": ratio,
        "ratio_pairs": pairs,
        "ratio_per_cpu_second": ratio_cpu,
        "memory_method": memory.method,
        "flops": flops,
        "peak": peak,
        "fid": fid,
    }


if __name__ == "__main__":
    sys.exit(main())
