"""`gan-job evaluate RUN`: FID, KID, precision/recall and (conditional models) label accuracy
of a run's newest complete checkpoint (its EMA generator), or with --which best of its
best/generator.pt, read-only: nothing is written to the run, its eval.jsonl stays as it is.

N generated samples (noise from --seed, truncated by --truncation, labels cycling through the
classes) are compared with N real images of the run's dataset (the fixed subset its
training-time FID used), on the features of --features or of the run's own GAN_FID_FEATURES.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch

from job.data import datasets as data
from job.data import source
from job.data.folder import background_rgb
from job.gan.models import Arch
from job.gan.truncation import TRUNCATION_HELP, Truncated
from job.infra.errors import CheckpointError, SettingsError
from job.infra.stores import download_prefix, open_store
from job.quality import evaluator, extractors, reference, scores
from job.run import checkpoint, outputs
from job.run.generator_file import BEST_EXPORT, load_generator, read_config, rebuild

log = logging.getLogger(__name__)

MIN_NUM = 10
MAX_NUM = 1_000_000  # samples (and real images): 20 times the 50,000 of the usual FID
MAX_SEED = 2**64 - 1  # the largest torch.Generator seed
MAX_BATCH = 65_536


def load_run(
    uri: str, endpoint_url: str | None, which: str = "final"
) -> tuple[torch.nn.Module, Arch, dict, int | None]:
    """(EMA generator, arch, the run's settings, step) of a run's newest complete checkpoint, or
    of its final/generator.pt when it has none left; which="best": of its best/generator.pt
    (the step of its best evaluation)."""
    found = checkpoint.load_from(uri, endpoint_url) if which == "final" else None
    if found is not None:
        step, state = found
        g, arch = rebuild(state, f"{uri}: checkpoint of step {step}")
        return g, arch, state["meta"]["settings"], step
    store = open_store(uri, endpoint_url)
    export = BEST_EXPORT if which == "best" else "final/generator.pt"
    if which == "best" and not store.exists(BEST_EXPORT):
        raise CheckpointError(
            f"{uri}: no {BEST_EXPORT} (a run keeps one only when it is evaluated: "
            "GAN_FID_FEATURES); --which final measures its newest checkpoint"
        )
    g, arch = load_generator(uri, endpoint_url, which)  # the export, or a clear error
    if not store.exists("config.json"):
        raise CheckpointError(f"{uri}: no config.json beside {export}: not a run")
    settings = read_config(store)["settings"]
    saved = checkpoint.load_pt(store.get_bytes(export), f"{uri}/{export}", "generator export")
    return g, arch, settings, saved.get("step")


def real_images(settings: dict, arch: Arch, num: int, data_dir: str, endpoint: str | None):
    """The run's fixed subset of real images (uint8), as its training-time FID drew it."""
    local = None
    dataset = settings["dataset"]
    if dataset.startswith("s3://"):
        cache = Path(data_dir) / "s3" / dataset.removeprefix("s3://")
        local = download_prefix(dataset, cache, endpoint)
    images = data.load_dataset(
        dataset,
        data_dir,
        arch.image_size,
        bool(arch.num_classes),
        settings.get("bad_images", "skip") == "skip",
        local,
        background_rgb(settings.get("background", "white")),
    )
    return source.real_images(images, num, int(settings.get("seed", 0)))[0]


def table(values: dict) -> str:
    rows = [("FID", f"{values['fid']:.4f}", f"{values['num_samples']} vs {values['num_real']}")]
    if "kid" in values:
        spread = f"{values['kid_subsets']} subsets of {values['kid_subset_size']}"
        rows.append(("KID", f"{values['kid']:.6f} ± {values['kid_std']:.6f}", spread))
    if "precision" in values:
        rows.append(("precision", f"{values['precision']:.4f}", f"k = {values['pr_k']}"))
        rows.append(("recall", f"{values['recall']:.4f}", f"k = {values['pr_k']}"))
    if "label_accuracy" in values:
        per_class = values["label_accuracy_per_class"]
        rows.append(("label accuracy", f"{values['label_accuracy']:.4f}", "mean over classes"))
        rows += [(f"  class {k}", f"{v:.4f}", "") for k, v in enumerate(per_class)]
    width = max(len(r[1]) for r in rows)
    return "\n".join(f"{name:<16}{value:<{width + 2}}{note}".rstrip() for name, value, note in rows)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gan-job evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("run", metavar="RUN", help="run folder or s3:// run prefix (or a checkpoint)")
    p.add_argument(
        "--num",
        type=int,
        default=10_000,
        help=f"samples and real images, {MIN_NUM} to {MAX_NUM} (10000)",
    )
    p.add_argument(
        "--which",
        choices=("final", "best"),
        default="final",
        help="final (the newest checkpoint, else final/generator.pt; the default) or best "
        "(best/generator.pt: the generator of the run's best evaluation)",
    )
    p.add_argument("--truncation", type=float, default=1.0, metavar="PSI", help=TRUNCATION_HELP)
    p.add_argument(
        "--features",
        default=None,
        help="TorchScript extractor (`gan-job features`), or inception; default: the run's "
        "GAN_FID_FEATURES",
    )
    p.add_argument(
        "--out",
        default=None,
        help="write the JSON line to this file (or s3:// URI) instead of stdout",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="noise seed, 0 to 2**64-1 (default: the run's FID seed)",
    )
    p.add_argument(
        "--data-dir", default=None, help="where the dataset is (default: the run's GAN_DATA_DIR)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=500,
        help=f"images generated at a time, 1 to {MAX_BATCH} (500)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def _check(args: argparse.Namespace) -> None:
    problems = [
        f"{flag} {value}: expected an integer from {low} to {high}"
        for flag, value, low, high in (
            ("--num", args.num, MIN_NUM, MAX_NUM),
            ("--seed", args.seed, 0, MAX_SEED),
            ("--batch-size", args.batch_size, 1, MAX_BATCH),
        )
        if value is not None and not low <= value <= high
    ]
    if not 0 < args.truncation <= 1:
        problems.append(f"--truncation {args.truncation}: expected 0 < PSI <= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda: no CUDA device available")
    if args.out:
        problems += outputs.out_file_problems(args.out)
    if problems:
        raise SettingsError(problems)


def _write(line: str, out: str | None, endpoint: str | None) -> None:
    """The result's JSON line to --out (a file or s3:// URI), or to stdout."""
    if out:
        outputs.write_bytes(out, (line + "\n").encode(), endpoint)
        log.info("wrote %s", out)
    else:
        print(line)


def _extractor(
    args: argparse.Namespace, arch: Arch, settings: dict, device: torch.device
) -> extractors.Extractor:
    """--features, else the run's own GAN_FID_FEATURES."""
    choice = args.features or settings.get("fid_features") or "none"
    if choice == "none":
        raise SettingsError(
            [f"--features: the run {args.run} had no FID extractor: give --features FILE"]
        )
    return extractors.load_extractor(
        choice,
        arch.channels,
        arch.image_size,
        device,
        inception_weights=settings.get("fid_inception_weights"),
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    _check(args)
    t0 = time.monotonic()
    endpoint = os.environ.get("GAN_S3_ENDPOINT_URL") or None
    cuda = args.device == "cuda" or args.device == "auto" and torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    g, arch, settings, step = load_run(args.run, endpoint, args.which)
    extractor = _extractor(args, arch, settings, device)
    problem = extractor.label_accuracy_problem(arch.num_classes)
    if problem and arch.num_classes:
        log.warning("no label accuracy: %s", problem)
    seed = args.seed if args.seed is not None else int(settings.get("seed", 0)) + 1
    images = real_images(settings, arch, args.num, args.data_dir or settings["data_dir"], endpoint)
    real = reference.real_reference(extractor, images, device, batch=args.batch_size)
    found = evaluator.measure(
        extractor,
        real,
        Truncated(g, args.truncation).to(device),
        arch.latent_dim,
        arch.num_classes,
        args.num,
        seed,
        device,
        batch=args.batch_size,
        labels_checked=problem is None,
    )
    values = {
        "run": args.run,
        "step": step,
        "which": args.which,
        "truncation": args.truncation,
        **scores.round_metrics(found),
        "extractor": extractor.name,
        "num_samples": args.num,
        "num_real": real.num,
        "fid_sums": scores.FID_SUMS,
        "seed": seed,
        "seconds": round(time.monotonic() - t0, 2),
    }
    truncated = f", truncation {args.truncation}" if args.truncation < 1 else ""
    print(f"{args.run}, {args.which}, at step {step} ({extractor.name}{truncated}):")
    print(table(values))
    _write(json.dumps(values), args.out, endpoint)
    return 0
