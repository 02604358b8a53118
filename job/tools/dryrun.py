"""`gan-job --dry-run` (GAN_DRY_RUN=true): the start-up block of the run these settings make,
without training it.

It reads what the run would read (the dataset, the listing of the run's store) and writes
nothing: no run lock, no config.json, no FID statistics, no probe object, no metrics port, no
process group, no torchrun; a local run folder that is not there is not created. A problem
exits with the status the real run gives it: settings 2, data 3, store 4, checkpoint 5,
device 9.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from job.data import batching
from job.gan.models import Arch, build_discriminator, build_generator
from job.infra import distributed
from job.infra.errors import EXIT_OK, CheckpointError, SettingsError, StorageError
from job.infra.storage import LocalStore, S3Store, Store, make_s3_client, open_store
from job.quality import evaluate
from job.run import build
from job.run.checkpoint import complete_steps, step_dir
from job.run.runlock import LOCK_KEY
from job.settings import PREFIX, Settings, public_dict

log = logging.getLogger(__name__)
S3_SECONDS = 5  # connect and read timeout of each listing request (two attempts)
_STEP_PATH = re.compile(r"/checkpoints/step-(\d{8,})$")  # as checkpoint.load_from reads it


@dataclass(frozen=True)
class ModelSize:
    """Parameters of G and D, and the FLOPs of one forward of each for one image."""

    g_params: int
    d_params: int
    g_flops: int
    d_flops: int


def dry_run(s: Settings) -> int:
    """Log the block the run would start with, checking what the run checks first, in its
    order: the device, the store, the data, where it starts."""
    device = _device(s)
    store = run_store(s)
    own_steps = complete_steps(store) if store is not None else []
    images = build.load_data(s, 0)
    start = start_point(s, store, own_steps)
    arch = build._arch(s, images)
    lines = [
        f"run {s.resolved_run_id}: {start}",
        *_store_lines(s, store),
        f"data: {s.dataset} from {images.source}: {len(images)} images, "
        f"{images.classes_found} classes, {images.channels}x{images.image_size}x{images.image_size}",
        _device_line(s, device),
        _model_line(arch, model_size(arch)),
        f"recipe: {s.recipe} (filled in: {_filled(s)})",
        f"FID: {_fid_line(s, device)}",
        "settings:",
        *settings_lines(s),
    ]
    log.info("dry run: nothing trained, written or locked\n  %s", "\n  ".join(lines))
    return EXIT_OK


def _device(s: Settings) -> torch.device:
    """Local rank 0's device, once the node's last local rank has one too (exit 9 otherwise)."""
    if s.nproc_per_node > 1:
        distributed.pick_device(s.device, s.nproc_per_node - 1)
    return distributed.pick_device(s.device, 0)


def run_store(s: Settings) -> Store | None:
    """The run's store, opened read-only; None where a local run folder does not exist yet."""
    local = local_folder(s.artifact_uri)
    if local is None:
        return peek_store(s.artifact_uri, s.s3_endpoint_url).child(s.resolved_run_id)
    folder = local / s.resolved_run_id
    _check_writable(folder)
    return LocalStore(folder) if folder.is_dir() else None


def local_folder(uri: str) -> Path | None:
    """The folder of a URI that open_store makes a LocalStore; None for S3 and URIs it refuses."""
    parsed = urlparse(uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(unquote(parsed.path)).expanduser().resolve()
    if parsed.scheme not in ("s3", "file") and "://" not in uri:
        return Path(uri).expanduser().resolve()
    return None


def peek_store(uri: str, endpoint_url: str | None) -> Store:
    """open_store(uri) for a URI local_folder() does not take: an S3 store whose requests fail
    in seconds on an unreachable endpoint, or open_store's StorageError."""
    store = open_store(uri, endpoint_url)
    if not isinstance(store, S3Store):
        return store
    client = make_s3_client(
        endpoint_url, connect_timeout=S3_SECONDS, read_timeout=S3_SECONDS, max_attempts=2
    )
    return S3Store(store.bucket, store.prefix, endpoint_url, client=client)


def _check_writable(folder: Path) -> None:
    """The run could create or write folder: its nearest existing ancestor is a writable folder."""
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise StorageError(f"artifact store {folder}: cannot write: {existing} is not writable")


def start_point(s: Settings, store: Store | None, own_steps: list[int]) -> str:
    """Where Checkpointer.restore would start, from the stores' listings (no state is read)."""
    if s.resume == "never":
        _refuse_old_run(s, store)
        return "would start fresh (GAN_RESUME=never)"
    if own_steps:
        seeded = f"; not from GAN_RESUME={s.resume}" if s.resume != "auto" else ""
        return f"would resume from step {own_steps[-1]} (this run's newest checkpoint{seeded})"
    if s.resume == "auto":
        return "would start fresh (this run has no complete checkpoint)"
    step, where = seed_checkpoint(s)
    return f"would resume from step {step} (GAN_RESUME: {where})"


def _refuse_old_run(s: Settings, store: Store | None) -> None:
    """The SettingsError of Checkpointer.restore for GAN_RESUME=never over an existing run."""
    old = [k for k in store.list() if k != LOCK_KEY] if store is not None else []
    if old:
        raise SettingsError(
            [
                f"GAN_RESUME=never, but run {s.resolved_run_id} already has {len(old)} artifacts "
                f"in {store.uri} (e.g. {old[0]}): set another GAN_RUN_ID, remove that folder, "
                "or use GAN_RESUME=auto to continue it"
            ]
        )


def seed_checkpoint(s: Settings) -> tuple[int, str]:
    """(step, where) of the checkpoint GAN_RESUME=PATH names, as checkpoint.load_from finds it:
    a checkpoint folder, a run folder's newest, or its child GAN_RUN_ID's newest."""
    uri = s.resume.rstrip("/")
    if m := _STEP_PATH.search(uri):
        step, run = int(m.group(1)), _peek_any(uri[: m.start()], s.s3_endpoint_url)
        if run is not None and step in complete_steps(run):
            return step, f"{run.uri}/{step_dir(step)}"
    else:
        store = _peek_any(uri, s.s3_endpoint_url)
        for where in (store, store and _child(store, s.resolved_run_id)):
            if where is not None and (steps := complete_steps(where)):
                return steps[-1], where.uri
    raise CheckpointError(f"GAN_RESUME={s.resume}: no complete checkpoint there")


def _peek_any(uri: str, endpoint_url: str | None) -> Store | None:
    local = local_folder(uri)
    if local is None:
        return peek_store(uri, endpoint_url)
    return LocalStore(local) if local.is_dir() else None


def _child(store: Store, sub: str) -> Store | None:
    if isinstance(store, LocalStore) and not (store.root / sub).is_dir():
        return None
    return store.child(sub)


def _store_lines(s: Settings, store: Store | None) -> list[str]:
    if store is None:
        return [f"artifacts: {local_folder(s.artifact_uri)}/{s.resolved_run_id} (not there yet)"]
    lines = [f"artifacts: {store.uri}"]
    if store.exists(LOCK_KEY):
        lines.append(
            f"lock: {LOCK_KEY} is there: the run would wait for its holder's lease and stop "
            "(exit 11) if it is renewed"
        )
    return lines


def _device_line(s: Settings, device: torch.device) -> str:
    world = s.nproc_per_node * s.nnodes
    given = "batch_size" in s.model_fields_set
    plan = batching.plan_from_settings(
        s.batch_size, given, s.global_batch_size, world, s.micro_batch_size
    )
    how = "no process group started" if world == 1 else "torchrun would start them"
    return (
        f"device: {distributed.describe_device(device)} x {world} process(es) "
        f"({PREFIX}NPROC_PER_NODE={s.nproc_per_node} x {PREFIX}NNODES={s.nnodes}; {how}), "
        f"batch {plan.per_process} per process, {plan.global_batch} per step"
        + (
            f" ({plan.accumulation} micro-batches of {plan.micro_batch})"
            if plan.accumulation > 1
            else ""
        )
    )


def model_size(arch: Arch) -> ModelSize:
    """Parameter counts, and FLOPs (matmuls, convolutions) of G's forward and D's forward of
    one image, counted by FlopCounterMode on models built the way the run builds them."""
    g, d = build_generator(arch).eval(), build_discriminator(arch).eval()
    z = torch.randn(1, arch.latent_dim)
    labels = torch.zeros(1, dtype=torch.long) if arch.num_classes else None
    with torch.no_grad():
        g_flops, fake = _flops(lambda: g(z, labels))
        d_flops, _ = _flops(lambda: d(fake, labels))
    return ModelSize(_params(g), _params(d), g_flops, d_flops)


def _flops(forward: Callable[[], torch.Tensor]) -> tuple[int, torch.Tensor]:
    counter = FlopCounterMode(display=False)
    with counter:
        out = forward()
    return counter.get_total_flops(), out


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _model_line(arch: Arch, size: ModelSize) -> str:
    return (
        f"model: {arch.model}, width {arch.width}, depth {arch.depth}, latent {arch.latent_dim}"
        + (", class-conditional" if arch.num_classes else "")
        + f": G {size.g_params:,} parameters, D {size.d_params:,} parameters; "
        f"{_si(size.g_flops + size.d_flops)}FLOPs per image (forward: G {size.g_flops:,}, "
        f"D {size.d_flops:,})"
    )


def _si(n: float) -> str:
    units = ["", "k", "M", "G", "T"]
    while abs(n) >= 1000 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{n:.3g} {units[0]}"


def _filled(s: Settings) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in s.recipe_filled.items()) or "nothing"


def _fid_line(s: Settings, device: torch.device) -> str:
    if s.fid_features == "none":
        return "off (GAN_FID_FEATURES=none)"
    num = evaluate.fid_num_samples(s.fid_num_samples, device)
    return f"{s.fid_features}, {num} samples, every {s.fid_every} steps (loaded by the run only)"


def settings_lines(s: Settings) -> list[str]:
    """Every setting as the run resolves it (secrets redacted), marked where the recipe filled
    it in or where it is its default."""
    filled, given = s.recipe_filled, s.model_fields_set
    lines = []
    for name, value in public_dict(s).items():
        mark = " (recipe)" if name in filled else "" if name in given else " (default)"
        shown = "" if value is None else value
        lines.append(f"  {PREFIX}{name.upper()}={shown}{mark}")
    return lines
