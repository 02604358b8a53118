#!/usr/bin/env python3
"""The GPU check: gan-job's GPU tests, the benchmark and a 5-minute Fashion-MNIST run, as one
command that fits a short loan of a GPU machine (docs/performance.md, "Checking on a GPU").

    python scripts/gpu_check.py --prepare runs/gpu-bundle    # here: wheels, data, extractor
    python3 scripts/gpu_check.py --bundle runs/gpu-bundle --out /tmp/gpu-check --export "$OUT"
    python scripts/gpu_check.py --dry --features FILE        # the same on the CPU, tiny

Parts, in this order: the GPU tests beside the training run (tests/test_gpu.py; the run takes
minutes of wall time, the tests little of the GPU), `gan-job evaluate` of that run, then the
benchmark alone on the device, one process per row: DCGAN at each batch size uncompiled, r3gan
at 32 and 256 px on synthetic color images (written here), then DCGAN compiled. Each part runs in
its own process group with its own timeout, all within --budget-minutes: a part that hangs is
killed and the others' results stand. --out gets every part's log and JSON, summary.json and
summary.md (tables for docs/performance.md); --export copies what a lent machine can send
back: at most 8 files. Only the standard library is imported here: a broken torch shows up in
a part's log, not as a traceback of the check.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEM_DATA = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FEATURES = REPO / "runs/fid-features/fashion-mnist.pt"  # `make features`
DATA_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
RUN_ID = "gpu-check"
KILL_GRACE_S = 20  # after SIGTERM on a timeout: the job checkpoints and exits, else SIGKILL
MIN_PART_S = 30  # a part is not started with less of the budget left
EXPORTED = ("summary.json", "summary.md", "gpu-check.log", "outputs.tar.gz")
# what the tar of outputs leaves out: weights and checkpoints (megabytes, and not for reading)
NOT_EXPORTED = re.compile(r"(^|/)(site|checkpoints|final|best|images)(/|$)|\.pt$")
COLOR_IMAGES = 256  # synthetic color images of the r3gan rows, at each of their sizes

# The packages gan-job imports that the lent machine's image lacks (the device's KINDS.md lists
# what it has: torch, torchvision, numpy, pillow, matplotlib, pyyaml, prometheus-client, psutil
# and pytest among them); carried as wheels of this environment's versions.
DEVICE_LACKS = (
    "pydantic", "pydantic-core", "pydantic-settings", "python-dotenv", "annotated-types",
    "typing-inspection", "typing-extensions", "torcheval", "boto3", "botocore", "s3transfer",
    "jmespath", "webdataset", "braceexpand",
)  # fmt: skip
DEVICE_PYTHON = "3.12"
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Plan:
    """What the check runs: the GPU's sizes, or --dry's tiny ones on the CPU."""

    device: str
    tests: tuple[str, ...]  # pytest arguments
    bench_image_size: int
    bench_batches: tuple[int, ...]
    bench_compile: tuple[bool, ...]
    bench_window_images: int  # timed steps per window: this many images,
    bench_min_steps: int  # and at least this many steps
    bench_warmup: int
    bench_repeats: int
    bench_fid_samples: int  # FID timed in the first benchmark process only
    train: dict[str, str]  # GAN_* beyond the default recipe
    evaluate_num: int
    # r3gan rows, uncompiled, on synthetic color images: (image size, batch, GAN_WIDTH or None
    # for the job's default)
    bench_r3gan: tuple[tuple[int, int, int | None], ...] = ()
    bench_r3gan_window_images: int = 0
    timeouts: dict[str, float] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # for every part


GPU = Plan(
    device="cuda",
    tests=("tests/test_gpu.py", "-m", "gpu"),
    bench_image_size=64,
    bench_batches=(64, 256, 1024),
    bench_compile=(False, True),
    bench_window_images=8192,
    bench_min_steps=20,
    bench_warmup=5,
    bench_repeats=3,
    bench_fid_samples=10_000,
    train={
        "GAN_MAX_MINUTES": "5",
        "GAN_MAX_STEPS": "1000000",
        "GAN_FID_EVERY": "5000",
        "GAN_SAMPLE_EVERY": "5000",
        "GAN_CHECKPOINT_EVERY": "5000",
    },
    evaluate_num=10_000,
    bench_r3gan=((32, 256, None), (256, 32, None)),
    bench_r3gan_window_images=1024,
    timeouts={
        "tests": 360,
        "train": 420,
        "evaluate": 120,
        "bench": 90,
        "bench-compile": 180,
        "bench-r3gan": 150,
    },
)
DRY = Plan(
    device="cpu",
    tests=("tests/test_gpu.py", "-m", "gpu", "-k", "fused_adam or startup_block or one_process"),
    bench_image_size=28,
    bench_batches=(16,),
    bench_compile=(False,),  # torch.compile on a CPU takes minutes: GPU only
    bench_window_images=16,
    bench_min_steps=2,
    bench_warmup=1,
    bench_repeats=2,
    bench_fid_samples=32,
    train={
        "GAN_MAX_STEPS": "12",
        "GAN_BATCH_SIZE": "32",
        "GAN_WIDTH": "8",
        "GAN_FID_EVERY": "6",
        "GAN_SAMPLE_EVERY": "6",
        "GAN_CHECKPOINT_EVERY": "6",
        "GAN_FID_NUM_SAMPLES": "48",
    },
    evaluate_num=48,
    bench_r3gan=((32, 8, 8), (256, 2, 4)),
    bench_r3gan_window_images=4,
    timeouts={
        "tests": 180,
        "train": 180,
        "evaluate": 180,
        "bench": 180,
        "bench-compile": 180,
        "bench-r3gan": 180,
    },
    env={"OMP_NUM_THREADS": "1", "GAN_WIDTH": "8", "GAN_LATENT_DIM": "16"},
)


# ---------------------------------------------------------------- running the parts


class Clock:
    """The check's budget: what is left of it, and the log lines stamped with its time."""

    def __init__(self, budget_s: float, log: Path):
        self.t0, self.budget_s, self.log = time.monotonic(), budget_s, log

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def say(self, message: str) -> None:
        line = f"[{time.monotonic() - self.t0:6.1f} s] {message}"
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")


class Part:
    """One child process in its own process group, its output in NAME.log, bounded by timeout."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], out: Path, timeout: float):
        self.name, self.argv, self.env, self.out, self.timeout = name, argv, env, out, timeout
        self.log = out / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> Part:
        self.t0 = time.monotonic()
        with self.log.open("w") as log:
            log.write("$ " + " ".join(self.argv) + "\n")
            log.flush()
            self.proc = subprocess.Popen(self.argv, cwd=REPO, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return self

    def done(self) -> bool:
        """Whether it exited or ran out of time."""
        return self.proc.poll() is not None or time.monotonic() > self.t0 + self.timeout

    def wait(self) -> dict:
        """ok, failed (with the exit status) or timeout (its process group killed)."""
        left = self.t0 + self.timeout - time.monotonic()
        try:
            rc, status = self.proc.wait(timeout=max(left, 0)), None
        except subprocess.TimeoutExpired:
            rc, status = self._kill(), "timeout"
        status = status or ("ok" if rc == 0 else "failed")
        seconds = round(time.monotonic() - self.t0, 1)
        return {"status": status, "rc": rc, "seconds": seconds, "log": self.log.name}

    def _kill(self) -> int:
        """SIGTERM to the whole group (the job checkpoints and exits), SIGKILL after the grace."""
        for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                return self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
        return self.proc.wait()


def not_run(why: str) -> dict:
    return {"status": "not run", "why": why}


class Check:
    """The parts of one check, run in order, each within what is left of the budget."""

    def __init__(self, plan: Plan, args: argparse.Namespace, clock: Clock, env: dict[str, str]):
        self.plan, self.args, self.clock, self.env = plan, args, clock, env
        self.out: Path = args.out
        self.results: dict[str, dict] = {}

    def part(
        self, name: str, argv: list[str], kind: str, env: dict | None = None, writes: str = ""
    ) -> Part | None:
        """A started part, or None (recorded as not run) when the budget is spent. writes: its
        output file, removed first (a rerun killed before writing it must not read the old)."""
        if writes:
            (self.out / writes).unlink(missing_ok=True)
        left = self.clock.left()
        if left < MIN_PART_S:
            self.results[name] = not_run(f"{left:.0f} s of the budget left")
            self.clock.say(f"{name}: not run, the budget is spent")
            return None
        timeout = min(self.plan.timeouts[kind], left)
        self.clock.say(f"{name}: started (timeout {timeout:.0f} s)")
        return Part(name, argv, self.env | (env or {}), self.out, timeout).start()

    def finish(self, part: Part | None, read) -> None:
        """Wait for a part (killing it at its timeout), then read its outputs."""
        if part is None:
            return
        result = part.wait()
        try:
            result |= read()
        except Exception as exc:  # noqa: BLE001 - a part's missing output must not end the check
            result["read_error"] = f"{type(exc).__name__}: {exc}"
            result["status"] = "failed" if result["status"] == "ok" else result["status"]
        self.results[part.name] = result
        self.clock.say(f"{part.name}: {result['status']} in {result['seconds']} s")
        self.save()

    def save(self, finished: bool = False) -> dict:
        """The summary so far, written and exported: a check killed as a whole keeps it."""
        mode = "dry, CPU" if self.plan is DRY else "GPU"
        summary = summarize(self.results, self.plan, mode, time.monotonic() - self.clock.t0)
        summary["finished"] = finished
        write_outputs(summary, self.out, self.args.export)
        return summary

    def finish_together(self, *pending: tuple[Part | None, object]) -> None:
        """finish() parts running side by side, each as soon as it is done."""
        todo = [(part, read) for part, read in pending if part is not None]
        while todo:
            for part, read in [t for t in todo if t[0].done()]:
                self.finish(part, read)
                todo.remove((part, read))
            time.sleep(0.2)

    def run(self, parts: set[str]) -> None:
        tests = self.start_tests() if "tests" in parts else None
        train = self.start_train() if "train" in parts else None
        self.finish_together((tests, self.read_tests), (train, self.read_train))
        if "evaluate" in parts:
            self.finish(self.start_evaluate(), self.read_evaluate)
        if "bench" in parts:
            self.bench()

    # -- tests

    def start_tests(self) -> Part | None:
        xml = self.out / "tests.xml"
        argv = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", *self.plan.tests,
                f"--junitxml={xml}"]  # fmt: skip
        return self.part("tests", argv, "tests", writes=xml.name)

    def read_tests(self) -> dict:
        """From pytest's JUnit XML; from its -v lines when it was killed before writing it."""
        xml = self.out / "tests.xml"
        return junit_counts(xml) if xml.is_file() else verbose_counts(self.out / "tests.log")

    # -- training and evaluation

    def start_train(self) -> Part | None:
        shutil.rmtree(self.out / "train", ignore_errors=True)
        env = {
            "GAN_DATASET": "fashion-mnist",
            "GAN_DATA_DIR": str(self.args.data),
            "GAN_ARTIFACT_URI": str(self.out / "train"),
            "GAN_RUN_ID": RUN_ID,
            "GAN_DEVICE": self.plan.device,
            "GAN_FID_FEATURES": str(self.args.features),
            "GAN_METRICS_PORT": "0",
            **self.plan.train,
        }
        return self.part("train", [sys.executable, "-m", "job"], "train", env)

    def read_train(self) -> dict:
        run = self.out / "train" / RUN_ID
        rows = read_jsonl(run / "metrics.jsonl")
        evals = read_jsonl(run / "eval.jsonl")
        speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
        last_eval = evals[-1] if evals else {}
        return {
            "device_line": startup_device_line(self.out / "train.log"),
            "recipe": json.loads((run / "config.json").read_text())["settings"]["recipe"],
            "steps": rows[-1]["step"] if rows else 0,
            "images_seen": rows[-1].get("images_seen") if rows else 0,
            "images_per_s_median": median(speeds),
            "gpu_memory_peak_mib": mib(
                max((r.get("gpu_memory_peak_bytes", 0) for r in rows), default=0)
            ),  # fmt: skip
            "evaluations": len(evals),
            "last_eval": {k: last_eval.get(k) for k in ("step", "fid", "kid", "seconds")},
        }

    def start_evaluate(self) -> Part | None:
        if not (self.out / "train" / RUN_ID).is_dir():
            self.results["evaluate"] = not_run("no training run to evaluate")
            return None
        argv = [sys.executable, "-m", "job", "evaluate", str(self.out / "train" / RUN_ID),
                "--num", str(self.plan.evaluate_num), "--features", str(self.args.features),
                "--data-dir", str(self.args.data), "--device", self.plan.device,
                "--out", str(self.out / "evaluate.json")]  # fmt: skip
        return self.part("evaluate", argv, "evaluate", writes="evaluate.json")

    def read_evaluate(self) -> dict:
        found = json.loads((self.out / "evaluate.json").read_text())
        keys = ("step", "num_samples", "fid", "kid", "kid_std", "precision", "recall")
        return {k: found.get(k) for k in keys} | {"measure_seconds": found.get("seconds")}

    # -- benchmark

    def bench(self) -> None:
        first = True
        for compiled in self.plan.bench_compile:
            for batch in self.plan.bench_batches:
                name = f"bench-{batch}-{'compile' if compiled else 'eager'}"
                kind = "bench-compile" if compiled else "bench"
                self.bench_row(name, kind, self.bench_argv(batch, compiled, first))
                first = False
            if not compiled:
                self.bench_r3gan()

    def bench_row(self, name: str, kind: str, argv: list[str], env: dict | None = None) -> None:
        part = self.part(name, argv, kind, self.bench_env() | (env or {}), writes=f"{name}.json")
        self.finish(part, lambda: bench_figures(self.out / f"{name}.json"))

    def bench_r3gan(self) -> None:
        """The r3gan rows: its bf16 stages (GAN_AMP=auto) at 32 px and at 256 px."""
        p = self.plan
        for size, batch, width in p.bench_r3gan:
            name = f"bench-r3gan{size}-{batch}-eager"
            folder = color_folder(self.out / "images" / f"color{size}", size, COLOR_IMAGES)
            steps = max(p.bench_min_steps, p.bench_r3gan_window_images // batch)
            argv = [sys.executable, "benchmarks/bench.py", "--model", "r3gan", "--dataset",
                    f"folder:{folder}", "--image-size", str(size), "--batch-size", str(batch),
                    "--no-compile", "--steps", str(steps), "--warmup", str(p.bench_warmup),
                    "--repeats", str(p.bench_repeats), "--skip-fid",
                    "--json", str(self.out / f"{name}.json")]  # fmt: skip
            env = {"GAN_WIDTH": str(width)} if width else {}
            self.bench_row(name, "bench-r3gan", argv, env)

    def bench_env(self) -> dict[str, str]:
        return {"GAN_DATA_DIR": str(self.args.data), "GAN_DEVICE": self.plan.device,
                "GAN_FID_FEATURES": str(self.args.features)}  # fmt: skip

    def bench_argv(self, batch: int, compiled: bool, time_fid: bool) -> list[str]:
        p, name = self.plan, f"bench-{batch}-{'compile' if compiled else 'eager'}"
        steps = max(p.bench_min_steps, p.bench_window_images // batch)
        fid = ["--fid-samples", str(p.bench_fid_samples)] if time_fid else ["--skip-fid"]
        return [sys.executable, "benchmarks/bench.py", "--model", "dcgan", "--dataset",
                "fashion-mnist", "--image-size", str(p.bench_image_size), "--batch-size",
                str(batch), "--compile" if compiled else "--no-compile", "--steps", str(steps),
                "--warmup", str(p.bench_warmup), "--repeats", str(p.bench_repeats), *fid,
                "--json", str(self.out / f"{name}.json")]  # fmt: skip


def color_folder(root: Path, size: int, count: int) -> Path:
    """count synthetic RGB PNGs of size x size in root/stripes (one class, as ImageFolder
    wants): diagonal stripes between two colors of each image's own. Written once."""
    images = root / "stripes"
    if images.is_dir() and len(list(images.glob("*.png"))) == count:
        return root
    images.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        rng = random.Random(i)
        a, b = ([rng.randrange(256) for _ in range(3)] for _ in range(2))
        period, slope = rng.randrange(4, max(size // 2, 5)), rng.randrange(1, 4)
        wave = [abs((x % period) / period * 2 - 1) for x in range(2 * size)]
        line = bytes(round(ca + (cb - ca) * t) for t in wave for ca, cb in zip(a, b, strict=True))
        rows = (line[3 * (y * slope % period) :][: 3 * size] for y in range(size))
        write_png(images / f"{i}.png", size, b"".join(b"\0" + row for row in rows))
    return root


def write_png(path: Path, size: int, scanlines: bytes) -> None:
    """An 8-bit RGB PNG of size x size from its filtered scanlines (the standard library's
    zlib: no PIL in this script)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(scanlines, 1)) + chunk(b"IEND", b""))  # fmt: skip


# ---------------------------------------------------------------- reading the outputs


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def median(values: list[float]) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return (s[len(s) // 2] + s[(len(s) - 1) // 2]) / 2


def mib(n: float) -> float:
    return round(n / 2**20, 1)


def startup_device_line(log: Path) -> str | None:
    """The start-up block's device line: the GPU's name, memory and compute capability."""
    for line in log.read_text(errors="replace").splitlines():
        if line.strip().startswith("device: "):  # device: DEVICE x N process(es), batch ...
            return line.strip().removeprefix("device: ").split(" x ")[0]
    return None


def junit_counts(path: Path) -> dict:
    """pytest's JUnit XML: counts, and each failure's and skip's name and first line."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failures, skips = [], {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        bad = case.find("failure")
        bad = bad if bad is not None else case.find("error")
        skip = case.find("skipped")
        if bad is not None:
            counts["failed"] += 1
            failures.append(f"{name}: {first_line(bad.get('message'))[:300]}")
        elif skip is not None and skip.get("type") == "pytest.xfail":
            counts["xfailed"] += 1
        elif skip is not None:
            counts["skipped"] += 1
            reason = first_line(skip.get("message"))[:200]
            skips[reason] = skips.get(reason, 0) + 1
        else:
            counts["passed"] += 1
    return counts | {"failures": failures, "skip_reasons": skips}


def first_line(text: str | None) -> str:
    return (text or "").partition("\n")[0]


VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
VERBOSE_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "failed", "XPASS": "failed",
                   "SKIPPED": "skipped", "XFAIL": "xfailed"}  # fmt: skip


def verbose_counts(log: Path) -> dict:
    """pytest -v's outcome lines, and the test that was running when it was killed (-v names
    each test as it starts, its outcome when it ends)."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "xfailed": 0}
    failures, running = [], "no test"
    for line in log.read_text(errors="replace").splitlines():
        if m := VERBOSE_LINE.match(line):
            counts[VERBOSE_OUTCOME[m.group(2)]] += 1
            failures += [m.group(1)] if VERBOSE_OUTCOME[m.group(2)] == "failed" else []
            running = "no test"
        elif "::" in line and not line.startswith(" "):
            running = line.split()[0]
    return counts | {"failures": [*failures, f"killed while running {running}"], "skip_reasons": {}}


def bench_figures(path: Path) -> dict:
    r = json.loads(path.read_text())
    job, ref = r["job"], r["ref"]
    return {
        "device_name": r["device_name"],
        "torch": r["torch"],
        "model": r["arch"]["model"],
        "image_size": r["arch"]["image_size"],
        "width": r["arch"]["width"],
        "bf16": r["job_fast_path"]["amp_bf16"],
        "batch": r["settings"]["batch_size"],
        "compile": r["job_fast_path"]["compile"],
        "ref_images_per_s": ref["images_per_s_median"],
        "job_images_per_s": job["images_per_s_median"],
        "ratio": r["ratio"],
        "ratio_pairs": [round(x, 2) for x in r["ratio_pairs"]],
        "gflop_per_image": r["flops"]["per_image"] / 1e9,
        "job_tflops": job["achieved_tflops"],
        "job_fraction_of_peak": job.get("fraction_of_peak"),
        "peak": r["peak"]["assumption"],
        "job_peak_memory_mib": job["peak_memory_mib"],
        "ref_peak_memory_mib": ref["peak_memory_mib"],
        "job_first_warmup_s": job["warmup_seconds"][0],
        "fid": {k: r["fid"].get(k) for k in ("extractor", "samples", "seconds", "skipped")},
    }


# ---------------------------------------------------------------- the summary


def summarize(results: dict[str, dict], plan: Plan, mode: str, seconds: float) -> dict:
    bench = [r for name, r in results.items() if name.startswith("bench-") and "job_tflops" in r]
    device = next((r["device_name"] for r in bench), None)
    return {
        "mode": mode,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "device": results.get("train", {}).get("device_line") or device,
        "torch": next((r["torch"] for r in bench), None),
        "ok": all(r["status"] == "ok" for r in results.values()),
        "plan": {
            "bench_batches": plan.bench_batches,
            "bench_compile": plan.bench_compile,
            "bench_image_size": plan.bench_image_size,
            "bench_r3gan": plan.bench_r3gan,
            "train": plan.train,
            "evaluate_num": plan.evaluate_num,
        },  # fmt: skip
        "parts": results,
    }


def fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def markdown(summary: dict) -> str:
    parts, plan = summary["parts"], summary["plan"]
    lines = [
        f"GPU check ({summary['mode']}), {summary['date']}: {summary['device']}, torch "
        f"{summary['torch']}; {summary['seconds']:.0f} s in all",
        "",
        "| part | status | seconds | result |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {r['status']} | {fmt(r.get('seconds'))} | {part_result(name, r)} |"
            for name, r in parts.items()
        ),  # fmt: skip
    ]
    measured = [r for name, r in parts.items() if name.startswith("bench-") and "job_tflops" in r]
    bench = [r for r in measured if r.get("model", "dcgan") == "dcgan"]
    if bench:
        lines += [
            "",
            f"DCGAN {plan['bench_image_size']} px on Fashion-MNIST, gan-job's loop against the "
            f"tutorial loop in the same process ({bench[0]['peak']}):",
            "",
            "| batch | compile | ref images/s | job images/s | ratio (pairs) | GFLOP/image | "
            "job TFLOP/s | fraction of peak (job) | peak MiB (ref / job) | first warm-up s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(bench_row(r) for r in bench),
        ]
        fid = bench[0]["fid"]
        if fid.get("seconds"):
            lines.append(
                f"\nOne FID evaluation ({fid['extractor']}, {fid['samples']} samples): "
                f"{fid['seconds']:.1f} s."
            )
    r3gan = [r for r in measured if r.get("model") == "r3gan"]
    if r3gan:
        lines += [
            "",
            "r3gan on synthetic color images, the same two loops, uncompiled (bf16: the job's "
            "GAN_AMP, autocast in the four highest resolutions):",
            "",
            "| px | width | batch | bf16 | ref images/s | job images/s | ratio (pairs) | "
            "GFLOP/image | job TFLOP/s | fraction of peak (job) | peak MiB (ref / job) | "
            "first warm-up s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *(r3gan_row(r) for r in r3gan),
        ]
    if "steps" in parts.get("train", {}):
        lines += ["", *train_table(parts["train"], parts.get("evaluate", {}), plan)]
    return "\n".join(lines) + "\n"


def part_result(name: str, r: dict) -> str:
    if r["status"] == "not run":
        return r["why"]
    if "read_error" in r:
        return f"no result: {r['read_error']} (see {r['log']})"
    if name == "tests":
        text = f"{r['passed']} passed, {r['failed']} failed, {r['xfailed']} xfailed, {r['skipped']} skipped"
        return text + "".join(f"; FAILED {f}" for f in r["failures"])
    if name == "train":
        return f"{r['steps']} steps, {fmt(r['images_per_s_median'], '.0f')} images/s"
    if name == "evaluate":
        return f"FID {fmt(r['fid'], '.2f')} over {r['num_samples']} samples"
    return f"{r['job_images_per_s']:.0f} images/s, {r['ratio']:.2f}x the tutorial loop"


def bench_row(r: dict) -> str:
    pairs = " ".join(f"{x:.2f}" for x in r["ratio_pairs"])
    return (
        f"| {r['batch']} | {'on' if r['compile'] else 'off'} | {r['ref_images_per_s']:.0f} | "
        f"{r['job_images_per_s']:.0f} | {r['ratio']:.2f}x ({pairs}) | {r['gflop_per_image']:.3f} | "
        f"{r['job_tflops']:.2f} | {fmt(r['job_fraction_of_peak'], '.1%')} | "
        f"{r['ref_peak_memory_mib']:.0f} / {r['job_peak_memory_mib']:.0f} | "
        f"{r['job_first_warmup_s']:.1f} |"
    )


def r3gan_row(r: dict) -> str:
    """bench_row's figures after the image size, width, batch and bf16."""
    figures = bench_row(r).split(" | ", 2)[2]  # without its batch and compile cells
    bf16 = "on" if r["bf16"] else "off"
    return f"| {r['image_size']} | {r['width']} | {r['batch']} | {bf16} | {figures}"


def train_table(train: dict, evaluate: dict, plan: dict) -> list[str]:
    budget = plan["train"].get("GAN_MAX_MINUTES")
    length = f"{budget}-minute" if budget else f"{plan['train'].get('GAN_MAX_STEPS')}-step"
    last = train["last_eval"]
    return [
        f"A {length} Fashion-MNIST run, default recipe ({train['recipe']}), evaluated by "
        f"`gan-job evaluate --num {plan['evaluate_num']}` with the offline extractor:",
        "",
        "| steps | images/s (median) | peak GPU MiB | FID in training (step) | FID | KID | "
        "precision | recall | evaluate s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {train['steps']} | {fmt(train['images_per_s_median'], '.0f')} | "
        f"{fmt(train['gpu_memory_peak_mib'] or None, '.0f')} | {fmt(last.get('fid'), '.2f')} "
        f"({last.get('step')}) | {fmt(evaluate.get('fid'), '.2f')} | "
        f"{fmt(evaluate.get('kid'), '.4f')} | {fmt(evaluate.get('precision'), '.3f')} | "
        f"{fmt(evaluate.get('recall'), '.3f')} | {fmt(evaluate.get('measure_seconds'))} |",
    ]


def write_outputs(summary: dict, out: Path, export: Path | None) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    with tarfile.open(out / "outputs.tar.gz", "w:gz") as tar:
        for path in sorted(out.rglob("*")):
            rel = path.relative_to(out).as_posix()
            if path.is_file() and rel not in EXPORTED and not NOT_EXPORTED.search(rel):
                tar.add(path, arcname=rel)
    if export is not None:
        export.mkdir(parents=True, exist_ok=True)
        for name in EXPORTED:
            shutil.copy2(out / name, export / name)


# ---------------------------------------------------------------- the bundle


def prepare(bundle: Path, data: Path, features: Path) -> int:
    """The folder a lent machine needs beside the working tree: the wheels its image lacks,
    Fashion-MNIST's training split and the offline FID extractor."""
    missing = [str(p) for p in [features, *(data / f for f in DATA_FILES)] if not p.is_file()]
    if missing:
        print(f"missing: {', '.join(missing)} (make features makes both)", file=sys.stderr)
        return 2
    (bundle / "data").mkdir(parents=True, exist_ok=True)
    for name in DATA_FILES:
        shutil.copy2(data / name, bundle / "data" / name)
    shutil.copy2(features, bundle / "fid-features.pt")
    wheels = bundle / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in DEVICE_LACKS]
    platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                    "--only-binary=:all:", "--python-version", DEVICE_PYTHON, "--implementation",
                    "cp", *platforms, "-d", str(wheels), *pins], check=True)  # fmt: skip
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"{bundle}: {mib(size)} MiB ({len(pins)} wheels, the data, the extractor)")
    return 0


def install_wheels(bundle: Path | None, out: Path, clock: Clock) -> str | None:
    """The bundle's wheels installed into OUT/site (no index, no dependencies): its path."""
    wheels = sorted((bundle / "wheels").glob("*.whl")) if bundle else []
    if not wheels:
        return None
    site = out / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                    "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(site),
                    *map(str, wheels)], check=True)  # fmt: skip
    clock.say(f"installed {len(wheels)} wheels into {site}")
    return str(site)


# ---------------------------------------------------------------- the command


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU, end to end")
    p.add_argument("--prepare", metavar="BUNDLE", type=Path,
                   help="write the bundle a lent machine needs (wheels, data, extractor), then stop")  # fmt: skip
    p.add_argument("--bundle", type=Path, help="a --prepare folder: its wheels, data, extractor")
    p.add_argument("--data", type=Path, help="Fashion-MNIST's train-*.gz (default: the bundle's, "
                   f"else {SYSTEM_DATA})")  # fmt: skip
    p.add_argument("--features", type=Path, help="the offline FID extractor (default: the "
                   f"bundle's, else {FEATURES.relative_to(REPO)})")  # fmt: skip
    p.add_argument("--out", type=Path, help="output folder (default: runs/gpu-check[-dry])")
    p.add_argument("--export", type=Path, help=f"copy {', '.join(EXPORTED)} here ($OUT)")
    p.add_argument("--only", help="comma list of parts to run again into --out: tests, train, "
                   "evaluate, bench (the others' results are kept)")  # fmt: skip
    p.add_argument("--budget-minutes", type=float, default=8.0, help="for all parts (8)")
    args = p.parse_args(argv)
    bundle = args.bundle
    args.data = (args.data or (bundle / "data" if bundle else SYSTEM_DATA)).resolve()
    args.features = (
        args.features or (bundle / "fid-features.pt" if bundle else FEATURES)
    ).resolve()
    args.out = (
        args.out or REPO / ("runs/gpu-check-dry" if args.dry else "runs/gpu-check")
    ).resolve()
    return args


PARTS = ("tests", "train", "evaluate", "bench")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare(args.prepare, args.data, args.features)
    parts = set(args.only.split(",")) if args.only else set(PARTS)
    if parts - set(PARTS):
        print(f"--only: expected some of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    if not args.only and args.out.exists() and any(args.out.iterdir()):
        print(f"{args.out} is not empty: remove it, or rerun parts there with --only",
              file=sys.stderr)  # fmt: skip
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    plan = DRY if args.dry else GPU
    clock = Clock(args.budget_minutes * 60, args.out / "gpu-check.log")
    clock.say(f"GPU check ({'dry, CPU' if args.dry else 'GPU'}): parts "
              f"{', '.join(p for p in PARTS if p in parts)}; out {args.out}")  # fmt: skip
    site = install_wheels(args.bundle, args.out, clock)
    check = Check(plan, args, clock, child_env(plan, site))
    previous = args.out / "summary.json"
    if args.only and previous.is_file():
        check.results = json.loads(previous.read_text())["parts"]
    check.run(parts)
    clock.say(f"summary: {args.out / 'summary.md'}")
    summary = check.save(finished=True)
    print(markdown(summary), flush=True)
    return 0 if summary["ok"] else 1


def child_env(plan: Plan, site: str | None) -> dict[str, str]:
    """This environment without GAN_* variables, the repo (and the wheels) importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GAN_")}
    paths = [str(REPO), *([site] if site else []), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONWARNINGS"] = "ignore::FutureWarning"
    return env | plan.env


if __name__ == "__main__":
    sys.exit(main())
