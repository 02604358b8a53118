"""gan-job's training loop against the tutorial loop, side by side: `python benchmarks/bench.py`.

Both loops train the same models (job.gan.models, one Arch) at the same batch size on the same
device, in one process, in alternating timed windows, so that their ratio is measured under the
same machine load:

- job: a Trainer built from the GAN_* settings (metrics off, artifacts in a temporary folder, no
  FID) stepping as Trainer.run() does: BatchSource.next(), GanStep.train(), and the progress
  record (the only read of the losses) every GAN_LOG_EVERY steps; no samples, FID or checkpoints.
- ref: PyTorch's DCGAN tutorial: a torchvision dataset reading the same images with Resize +
  ToTensor + Normalize per image, a DataLoader with 2 workers and shuffle, .to(device) per batch,
  plain Adam, targets made per batch, BCE-with-logits and loss.item() every step.

Also reported: the time spent getting batches, CPU time and memory (psutil; CUDA memory from
torch), model FLOPs per image (FlopCounterMode) and the fraction of the GPU's peak, and the cost
of one FID evaluation. Flags override the GAN_* variables; docs/performance.md reads the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import torchvision.datasets as tvd
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from job.data import datasets as data
from job.data.source import real_images
from job.gan.models import Arch, build_discriminator, build_generator
from job.infra import distributed
from job.infra.errors import EXIT_OK, FIDError, JobError
from job.quality import evaluator, extractors, reference
from job.run.build import build
from job.run.train import Trainer
from job.settings import Settings, load_settings, public_dict

DEFAULTS = {"model": "dcgan", "image_size": "64", "batch_size": "64", "dataset": "fashion-mnist"}
REF_WORKERS = 2  # as in PyTorch's DCGAN tutorial
RSS_SAMPLE_S = 0.005  # CPU peak memory: seconds between two readings of the resident set
PROCESS = psutil.Process()
STARTED = time.perf_counter()

# Dense peak TFLOP/s by device name (substring, first match wins), from NVIDIA's data sheets.
PEAK_TFLOPS = [
    ("H100 PCIe", "H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100 NVL", "H100 NVL", {"bf16": 835.0, "tf32": 418.0, "fp32": 60.0}),
    ("H100", "H100 SXM", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("H200", "H200 (as H100 SXM)", {"bf16": 989.0, "tf32": 495.0, "fp32": 67.0}),
    ("A100", "A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def progress(message: str) -> None:
    print(f"[{time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def at_least(low: int):
        def parse(text: str) -> int:
            if text.isdigit() and int(text) >= low:
                return int(text)
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {low}")

        return parse

    p = argparse.ArgumentParser(
        prog="benchmarks/bench.py",
        description="gan-job's training loop against a plain tutorial loop, side by side on this "
        "device. Settings come from GAN_* variables; these flags override them.",
    )
    p.add_argument("--steps", type=at_least(1), default=50, help="timed steps per window")
    p.add_argument("--warmup", type=at_least(0), default=5, help="untimed steps before a window")
    p.add_argument("--repeats", type=at_least(1), default=3, help="windows per loop, alternating")
    p.add_argument(
        "--model", choices=("mlp", "dcgan", "r3gan"), help="default: $GAN_MODEL or dcgan"
    )
    p.add_argument("--image-size", type=at_least(8), help="default: $GAN_IMAGE_SIZE or 64")
    p.add_argument("--batch-size", type=at_least(1), help="default: $GAN_BATCH_SIZE or 64")
    p.add_argument("--dataset", help="default: $GAN_DATASET or fashion-mnist")
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile G and D in gan-job's loop (default: $GAN_COMPILE, else off); the "
        "first window's warm-up holds the compilation",
    )
    p.add_argument(
        "--fid-samples",
        type=at_least(2),
        help="generated images of the FID timing (default: $GAN_FID_NUM_SAMPLES, or the job's "
        "default: 10000 on a GPU, 500 on a CPU)",
    )
    p.add_argument("--skip-fid", action="store_true", help="do not time an FID evaluation")
    p.add_argument(
        "--fid-standin",
        metavar="PATH",
        help="a TorchScript extractor to time when the default InceptionV3 has no weights here",
    )
    p.add_argument("--threads", type=at_least(1), help="torch.set_num_threads for both loops")
    p.add_argument("--json", metavar="OUT", help="also write every figure to this JSON file")
    return p.parse_args(argv)


def load_bench_settings(args: argparse.Namespace, artifacts: Path) -> tuple[Settings, Settings]:
    """The user's settings (GAN_* variables, flags over them) and the timed Trainer's: the same
    with nothing served, pushed, resumed or evaluated."""
    env = {k: v for k, v in os.environ.items() if k.startswith("GAN_")}
    for name, default in DEFAULTS.items():
        var, value = f"GAN_{name.upper()}", getattr(args, name)
        env[var] = str(value) if value is not None else env.get(var, default)
    if args.compile is not None:
        env["GAN_COMPILE"] = str(args.compile).lower()
    quiet = {
        "GAN_ARTIFACT_URI": str(artifacts),
        "GAN_RUN_ID": "bench",
        "GAN_RESUME": "never",
        "GAN_METRICS_PORT": "0",
        "GAN_PUSHGATEWAY_URL": "",
        "GAN_FID_FEATURES": "none",
    }
    return load_settings(env), load_settings(env | quiet)


# ---------------------------------------------------------------- measuring


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process's threads and of its child processes, running or exited (the
    reference loop's DataLoader workers: an epoch's end shuts them down, and once reaped their
    time moves to this process's children_* times)."""
    t = PROCESS.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in PROCESS.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            c = child.cpu_times()
            total += c.user + c.system
    return total


class PeakMemory:
    """Memory at the start of a window and its peak during it, in bytes. CUDA: torch's
    allocator (max_memory_allocated, reset at the start). CPU: the process's resident set
    (psutil), read every RSS_SAMPLE_S by a thread, since Linux keeps no resettable peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.start = self.peak = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = PROCESS.memory_info().rss
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(RSS_SAMPLE_S):
            self.peak = max(self.peak, PROCESS.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
            return
        self._done.set()
        self._sampler.join()
        self.peak = max(self.peak, PROCESS.memory_info().rss)

    @staticmethod
    def method(device: torch.device) -> str:
        if device.type == "cuda":
            return "torch.cuda.max_memory_allocated, reset per window"
        return f"peak RSS of the process (psutil, sampled every {RSS_SAMPLE_S * 1000:g} ms)"


# ---------------------------------------------------------------- the two loops


class JobLoop:
    """gan-job's Trainer stepping as Trainer.run() does, without samples, FID and checkpoints."""

    name = "job"

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.data_seconds = 0.0

    def step(self) -> int:
        t = self.trainer
        t0 = time.perf_counter()
        real, labels = t.source.next()
        self.data_seconds += time.perf_counter() - t0
        stats = t.gan_step.train(real, labels, t.budget.step)
        images = real.shape[0]
        st = t.budget.state
        st.advance(images)
        t.progress.step_done(images, time.perf_counter() - t0)
        if t.progress.due(st.step, last=False):
            position = {"step": st.step, "epoch": t.source.position.epoch}
            t.progress.log(position | {"images_seen": st.images_seen}, stats)
        return images

    def dataset_bytes(self) -> int:
        source = self.trainer.source
        return source.images.numel() * source.images.element_size() if source.in_memory else 0


def write_idx(path: Path, array) -> None:
    """An IDX file of unsigned bytes (array: a uint8 numpy array)."""
    header = struct.pack(f">4B{array.ndim}I", 0, 0, 8, array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def reference_dataset(settings: Settings, root: Path):
    """The training split as the tutorial reads it: a torchvision dataset, transformed per image."""
    size, kind = settings.resolved_image_size, settings.dataset_kind
    to_tensor = [T.ToTensor(), T.Normalize(0.5, 0.5)]
    if kind in data.IDX_DATASETS:  # the job's copy, at its own size, in torchvision's layout
        split = data.load_idx_dataset(kind, Path(settings.data_dir), conditional=False)
        name = data.IDX_DATASETS[kind]
        raw = root / name / "raw"
        raw.mkdir(parents=True)
        images_file, labels_file = data.idx_files("train")
        write_idx(raw / images_file, split.images.squeeze(1).numpy())
        write_idx(raw / labels_file, split.labels.to(torch.uint8).numpy())
        for stem in data.idx_files("test"):  # torchvision wants them present; it reads train's
            (raw / stem).touch()
        transform = T.Compose([T.Resize(size), *to_tensor])
        return getattr(tvd, name)(str(root), train=True, transform=transform)
    if kind == "cifar10":
        transform = T.Compose([T.Resize(size), *to_tensor])
        return tvd.CIFAR10(settings.data_dir, train=True, transform=transform)
    if kind == "folder":
        transform = T.Compose([T.Resize(size), T.CenterCrop(size), *to_tensor])
        return tvd.ImageFolder(settings.dataset.removeprefix("folder:"), transform=transform)
    raise JobError(f"GAN_DATASET={settings.dataset}: the reference loop reads local datasets only")


class RefLoop:
    """PyTorch's DCGAN tutorial loop, with the models of job.gan.models."""

    name = "ref"

    def __init__(self, arch: Arch, settings: Settings, dataset, device: torch.device):
        torch.manual_seed(settings.seed)
        self.arch, self.dataset, self.device = arch, dataset, device
        self.g = build_generator(arch).to(device)
        self.d = build_discriminator(arch).to(device)
        betas = (settings.beta1, settings.beta2)
        self.opt_g = torch.optim.Adam(self.g.parameters(), lr=settings.lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.d.parameters(), lr=settings.lr_d, betas=betas)
        self.criterion = nn.BCEWithLogitsLoss()
        self.loader = DataLoader(
            dataset, batch_size=settings.batch_size, shuffle=True, num_workers=REF_WORKERS
        )
        self.batches = iter(())
        self.data_seconds = 0.0
        self.losses = (0.0, 0.0)  # read every step, as the tutorial does for its plots

    def next_batch(self):
        t0 = time.perf_counter()
        batch = next(self.batches, None)
        if batch is None:  # a new epoch
            self.batches = iter(self.loader)
            batch = next(self.batches)
        self.data_seconds += time.perf_counter() - t0
        return batch

    def step(self) -> int:
        real, labels = self.next_batch()
        real, labels = real.to(self.device), labels.to(self.device)
        b, k = real.size(0), self.arch.num_classes
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

    def dataset_bytes(self) -> int:
        held = getattr(self.dataset, "data", None)
        if isinstance(held, torch.Tensor):
            return held.numel() * held.element_size()
        return int(getattr(held, "nbytes", 0))

    def workers_pss(self) -> int | None:
        """The proportional set size of the running DataLoader workers, in bytes."""
        sizes = []
        for child in PROCESS.children():
            with contextlib.suppress(psutil.Error):
                sizes.append(child.memory_full_info().pss)
        return sum(sizes) if sizes else None

    def close(self) -> None:
        self.batches = iter(())  # drops the iterator, which shuts its workers down


# ---------------------------------------------------------------- timing


def timed_window(loop, args: argparse.Namespace, device: torch.device) -> dict:
    """args.warmup steps (their time apart), then args.steps timed with the device synchronised
    at both ends."""
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        loop.step()
    sync(device)
    warmup = time.perf_counter() - t0
    loop.data_seconds, images = 0.0, 0
    with PeakMemory(device) as memory:
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        for _ in range(args.steps):
            images += loop.step()
        sync(device)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    return {"images": images, "seconds": seconds, "data_seconds": loop.data_seconds,
            "cpu_seconds": cpu, "peak": memory.peak, "start": memory.start,
            "warmup_seconds": warmup}  # fmt: skip


def side_by_side(loops: list, args: argparse.Namespace, device: torch.device) -> dict:
    """args.repeats windows per loop; the order flips every repeat (ref job, job ref, ...) so
    that drift in the machine's load hits both alike."""
    windows = {loop.name: [] for loop in loops}
    for r in range(args.repeats):
        line = []
        for loop in loops if r % 2 == 0 else loops[::-1]:
            w = timed_window(loop, args, device)
            windows[loop.name].append(w)
            line.append(
                f"{loop.name} {w['images'] / w['seconds']:.1f} img/s ({w['seconds']:.2f} s)"
            )
        progress(f"repeat {r + 1}/{args.repeats}: " + ", ".join(line))
    return windows


def summarize(windows: list[dict]) -> dict:
    """The figures of one loop: per window, and their median (peak memory: the highest)."""
    per_s = [w["images"] / w["seconds"] for w in windows]
    per_cpu_s = [w["images"] / max(w["cpu_seconds"], 1e-9) for w in windows]

    def each(key: str, digits: int) -> list[float]:
        return [round(w[key], digits) for w in windows]

    return {
        "images_per_s_median": statistics.median(per_s),
        "images_per_s": [round(x, 3) for x in per_s],
        "seconds": each("seconds", 4),
        "images_per_window": windows[0]["images"],
        "data_seconds": each("data_seconds", 4),
        "data_seconds_median": statistics.median(w["data_seconds"] for w in windows),
        "data_fraction_median": statistics.median(
            w["data_seconds"] / w["seconds"] for w in windows
        ),
        "cpu_seconds": each("cpu_seconds", 3),
        "warmup_seconds": each("warmup_seconds", 3),
        "images_per_cpu_s_median": statistics.median(per_cpu_s),
        "cores_used": [round(w["cpu_seconds"] / w["seconds"], 2) for w in windows],
        "peak_memory_mib": round(max(w["peak"] for w in windows) / 2**20, 1),
        "memory_at_window_start_mib": round(min(w["start"] for w in windows) / 2**20, 1),
    }


# ---------------------------------------------------------------- FLOPs, peak, FID


def flops_per_image(arch: Arch, batch: int, device: torch.device, amp: bool) -> float:
    """Model FLOPs of the tutorial's D+G step (forwards and backwards) per image, counted by
    FlopCounterMode on fresh copies of the models (matmuls and convolutions)."""
    g, d = build_generator(arch).to(device), build_discriminator(arch).to(device)
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
        bce(d(fake, labels).float(), ones).backward()
    return counter.get_total_flops() / n


def device_peak(device: torch.device, amp: bool) -> dict:
    """The assumed dense peak FLOP/s of the precision the job trains in, or unknown."""
    if device.type != "cuda":
        return {"known": False, "assumption": "CPU: no peak FLOP/s assumed (unknown)"}
    name = torch.cuda.get_device_name(device)
    # torch's default runs fp32 convolutions as TF32 on GPUs that have it
    precision = "bf16" if amp else "tf32" if torch.backends.cudnn.allow_tf32 else "fp32"
    for key, label, table in PEAK_TFLOPS:
        if key in name:
            listed = ", ".join(f"{k} {v:g}" for k, v in table.items())
            return {
                "known": True,
                "precision": precision,
                "tflops": table[precision],
                "assumption": f"{name}: taken as {label}, dense {precision} peak "
                f"{table[precision]:g} TFLOP/s ({listed})",
            }
    return {"known": False, "precision": precision, "assumption": f"{name}: peak FLOP/s unknown"}


def fid_cost(args: argparse.Namespace, s: Settings, trainer: Trainer) -> dict:
    """Seconds of one FID evaluation of the EMA generator with GAN_FID_FEATURES."""
    if args.skip_fid:
        return {"skipped": "--skip-fid"}
    arch, device, note = trainer.nets.arch, trainer.world.device, None

    def load(choice: str) -> extractors.Extractor | None:
        return extractors.load_extractor(
            choice, arch.channels, arch.image_size, device, s.fid_inception_weights
        )

    try:
        extractor = load(s.fid_features)
    except FIDError as exc:
        if s.fid_features != "inception":
            return {"skipped": str(exc)}
        if not args.fid_standin:
            return {"skipped": f"{exc}; or time a stand-in with --fid-standin PATH"}
        extractor = load(str(Path(args.fid_standin).resolve()))
        note = f"InceptionV3 unavailable; timed the TorchScript stand-in {args.fid_standin}"
    if extractor is None:
        return {"skipped": "GAN_FID_FEATURES=none"}
    num = evaluator.fid_num_samples(args.fid_samples or s.fid_num_samples, device)
    progress(f"timing one FID evaluation ({extractor.name}, {num} samples)")
    images, _ = real_images(trainer.source.data, num, s.seed)
    sync(device)
    t0 = time.perf_counter()
    real_state = reference.real_statistics(extractor, images, device)
    sync(device)
    t1 = time.perf_counter()
    fid = evaluator.compute_fid(
        extractor, real_state, trainer.nets.g_ema, arch.latent_dim, arch.num_classes, num,
        s.seed + 1, device,
    )  # fmt: skip
    sync(device)
    seconds = time.perf_counter() - t1
    return {"extractor": extractor.name, "note": note, "samples": num, "seconds": seconds,
            "samples_per_s": num / seconds, "real_statistics_seconds": t1 - t0,
            "real_images": len(images), "fid": fid}  # fmt: skip


# ---------------------------------------------------------------- the run


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"CPU: {platform.machine()}, {capability} kernels, {len(PROCESS.cpu_affinity())} cores"


def measure(args: argparse.Namespace, settings: Settings, trainer: Trainer, tmp: Path) -> dict:
    device, arch = trainer.world.device, trainer.nets.arch
    job = JobLoop(trainer)
    progress("building the reference loop (torchvision dataset, DataLoader)")
    ref = RefLoop(arch, settings, reference_dataset(settings, tmp / "torchvision"), device)
    load_before = psutil.getloadavg()[0]
    progress(f"timing (load average {load_before:.2f})")
    try:
        windows = side_by_side([ref, job], args, device)
        workers_pss = ref.workers_pss()
    finally:
        ref.close()
    report = {name: summarize(ws) for name, ws in windows.items()}
    report["job"]["dataset_mib"] = job.dataset_bytes() / 2**20
    report["ref"]["dataset_mib"] = ref.dataset_bytes() / 2**20
    report["ref"]["worker_pss_mib"] = workers_pss / 2**20 if workers_pss else None

    progress("counting FLOPs")
    amp = trainer.gan_step.recipe.amp
    per_image = flops_per_image(arch, settings.batch_size, device, amp)
    peak = device_peak(device, amp)
    for r in report.values():
        r["achieved_tflops"] = per_image * r["images_per_s_median"] / 1e12
        if peak["known"]:
            r["fraction_of_peak"] = r["achieved_tflops"] / peak["tflops"]
    job_r, ref_r = report["job"], report["ref"]
    opt = trainer.nets.opt_d.defaults
    return report | {
        "device": device.type,
        "device_name": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average": {"before": load_before, "after": psutil.getloadavg()[0]},
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "settings": public_dict(settings),
        "arch": arch.to_dict(),
        "job_fast_path": {
            "data_on_device": settings.data_on_device,
            "amp_bf16": amp,
            "channels_last": trainer.nets.channels_last,
            "adam": {"fused": opt.get("fused"), "foreach": opt.get("foreach")},
            "compile": settings.compile,
        },
        "ref_workers": REF_WORKERS,
        "ratio": job_r["images_per_s_median"] / ref_r["images_per_s_median"],
        "ratio_pairs": [
            j / r for j, r in zip(job_r["images_per_s"], ref_r["images_per_s"], strict=True)
        ],
        "ratio_per_cpu_second": job_r["images_per_cpu_s_median"] / ref_r["images_per_cpu_s_median"],
        "memory_method": PeakMemory.method(device),
        "flops": {"per_image": per_image},
        "peak": peak,
        "fid": fid_cost(args, settings, trainer),
    }


ROWS = [  # label, figure of each loop, format
    ("images/s (median)", "images_per_s_median", ".1f"),
    ("images/s (each window)", "images_per_s", ".1f"),
    ("getting batches, s/window (median)", "data_seconds_median", ".3f"),
    ("getting batches, share of time", "data_fraction_median", ".1%"),
    ("CPU cores busy (each window)", "cores_used", ".2f"),
    ("warm-up seconds (each window)", "warmup_seconds", ".2f"),
    ("images per CPU-second (median)", "images_per_cpu_s_median", ".2f"),
    ("peak memory, MiB", "peak_memory_mib", ".1f"),
    ("memory at window start, MiB", "memory_at_window_start_mib", ".1f"),
    ("dataset held, MiB", "dataset_mib", ".1f"),
    ("DataLoader workers' PSS, MiB", "worker_pss_mib", ".1f"),
    ("achieved TFLOP/s", "achieved_tflops", ".3f"),
    ("fraction of peak", "fraction_of_peak", ".2%"),
]


def table(report: dict) -> str:
    def cell(loop: str, key: str, spec: str) -> str:
        value = report[loop].get(key)
        if value is None:
            return "-"
        return " ".join(format(v, spec) for v in (value if isinstance(value, list) else [value]))

    rows = [(label, cell("ref", key, spec), cell("job", key, spec)) for label, key, spec in ROWS]
    rows = [row for row in rows if row[1:] != ("-", "-")]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in [*rows, ("", "ref (tutorial)")])
    s, a, fid = report["settings"], report["args"], report["fid"]
    lines = [
        f"{report['device_name']} | torch {report['torch']} | {report['threads']} threads | "
        f"{s['model']} {report['arch']['image_size']} px, batch {s['batch_size']}, "
        f"width {s['width']}, depth {report['arch'].get('depth', 0)}, {s['dataset']}",
        f"{a['steps']} timed steps after {a['warmup']} warm-up, {a['repeats']} repeats per loop, "
        f"load average {report['load_average']['before']:.2f} before, "
        f"{report['load_average']['after']:.2f} after",
        "",
        f"{'':<{w0}}  {'ref (tutorial)':>{w1}}  gan-job",
        *(f"{label:<{w0}}  {ref:>{w1}}  {job}" for label, ref, job in rows),
        "",
        f"ratio job/ref (medians): {report['ratio']:.2f}x   "
        f"side-by-side pairs: {' '.join(f'{x:.2f}' for x in report['ratio_pairs'])}",
        f"ratio job/ref in images per CPU-second: {report['ratio_per_cpu_second']:.2f}x "
        "(CPU-seconds: every thread of this process plus the DataLoader workers; steadier than "
        "wall time on a shared machine)",
        f"memory: {report['memory_method']}",
        f"job fast path: {report['job_fast_path']}",
        f"model FLOPs per image (one D+G step, fwd+bwd): {report['flops']['per_image'] / 1e9:.3f}"
        " GFLOP",
        f"peak assumed: {report['peak']['assumption']}",
    ]
    if "skipped" in fid:
        lines.append(f"FID cost: skipped ({fid['skipped']})")
    else:
        lines.append(
            f"FID cost ({fid['extractor']}, {fid['samples']} samples): {fid['seconds']:.1f} s, "
            f"{fid['samples_per_s']:.0f} samples/s; real statistics (once, cached) "
            f"{fid['real_statistics_seconds']:.1f} s" + (f" [{fid['note']}]" if fid["note"] else "")
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with tempfile.TemporaryDirectory(prefix="gan-bench-") as tmp:
            settings, quiet = load_bench_settings(args, Path(tmp) / "runs")
            world = distributed.setup(quiet.device)
            progress(f"building gan-job's Trainer on {world.device}")
            trainer = Trainer(
                build(quiet, world)
            )  # threads: the job's default (job/infra/threads.py)
            if args.threads:
                torch.set_num_threads(args.threads)
            trainer.resume()
            trainer.wrap()
            try:
                report = measure(args, settings, trainer, Path(tmp))
            finally:
                trainer.close()
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(table(report), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
