"""`gan-job --dry-run` (GAN_DRY_RUN=true): the start-up block of the run these settings make,
without training it.

It reads what the run would read (the dataset, the listing of the run's store; an s3://
dataset not yet copied to the node is listed, not downloaded) and writes nothing: no run lock,
no config.json, no FID statistics, no probe object, no metrics port, no process group, no
torchrun; a local run folder that is not there is not created. A problem
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

from job.data.datasets import ImageData
from job.gan.models import Arch, build_discriminator, build_generator
from job.infra import distributed, threads
from job.infra.errors import EXIT_OK, CheckpointError, StorageError
from job.infra.local_store import LocalStore
from job.infra.s3_store import S3Store, make_s3_client
from job.infra.store import Store
from job.infra.stores import copied, copy_dir, open_store
from job.quality import evaluator
from job.run import build
from job.run.checkpoint import complete_steps, refuse_file, step_dir
from job.run.resume import CHECKPOINTS, past_of, resume_choice
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
    """Log the start-up block the run would start with (build.startup_lines, then what only a
    dry run shows), checking what the run checks first, in its order: the device, the store,
    the data, where it starts."""
    device = _device(s)
    store = run_store(s)
    own_steps = complete_steps(store) if store is not None else []
    images = local_data(s)
    download = _download(s) if images is None else ""
    run = f"run {s.resolved_run_id}: {start_point(s, store, own_steps)}"
    if images is None:
        block = [run, f"artifacts: {_artifacts(s, store)}", download]
    else:
        startup = _startup(s, store, images, device)
        block = [f"{run}, {startup[0]}", *startup[1:]]
    lines = [*block, *_lock_lines(store), _processes_line(s), "settings:", *settings_lines(s)]
    log.info("dry run: nothing trained, written or locked\n  %s", "\n  ".join(lines))
    return EXIT_OK


def local_data(s: Settings) -> ImageData | None:
    """The training images as the run reads them; None for an s3:// dataset not yet copied to
    this node, which a dry run does not download."""
    if s.dataset_kind == "s3" and not copied(s.dataset, copy_dir(s.data_dir, s.dataset)):
        return None
    return build.load_data(s, 0)


def _startup(s: Settings, store: Store | None, images: ImageData, device: torch.device) -> list:
    """The run's start-up block (build.startup_lines) and the size of its models."""
    arch = build._arch(s, images)
    world = distributed.World(0, s.nproc_per_node * s.nnodes, 0, device)  # as rank 0 sees it
    plan = build.batch_plan(s, world)
    used = threads.choose(s.num_threads, s.nproc_per_node)
    fid = _fid_line(s, device)
    startup = build.startup_lines(s, _artifacts(s, store), images, arch, fid, world, plan, used)
    return [*startup, _size_line(model_size(arch))]


def _download(s: Settings) -> str:
    """What the run would download of an s3:// dataset, from the prefix's listing (exit 4 where
    the run would fail on it: unreachable, or nothing there). The images, and so the model, the
    batches and the FID line, are known once they are on the node."""
    objects = peek_store(s.dataset, s.s3_endpoint_url).list_sizes()
    if not objects:
        raise StorageError(f"nothing to download under {s.dataset}")
    size, where = _si(sum(objects.values())), copy_dir(s.data_dir, s.dataset)
    return (
        f"data: {s.dataset}: not on this node: the run would download {len(objects)} objects "
        f"({size}B) to {where}; a dry run once they are there shows the data, the model and "
        "the batches"
    )


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
    """Where Checkpointer.restore would start (resume_choice), from the stores' listings (no
    state is read; without a complete checkpoint listed, the run's history and final export,
    read by key, as the run reads them)."""
    never = s.resume == "never"
    keys = store.list() if never and store is not None else []
    own = own_steps[-1] if own_steps else None
    uri = store.uri if store is not None else ""
    look = not never and own is None and store is not None
    past = past_of(store, store.list(CHECKPOINTS)) if look else None
    choice = resume_choice(s.resume, own, keys, s.resolved_run_id, uri, past, s.checkpoint_every)
    if choice == "own":
        seeded = f"; not from GAN_RESUME={s.resume}" if s.resume != "auto" else ""
        return f"would resume from step {own} (this run's newest checkpoint{seeded})"
    if choice == "seed":
        step, where = seed_checkpoint(s)
        return f"would resume from step {step} (GAN_RESUME: {where})"
    if never:
        return "would start fresh (GAN_RESUME=never)"
    return "would start fresh (this run has no complete checkpoint)"


def seed_checkpoint(s: Settings) -> tuple[int, str]:
    """(step, where) of the checkpoint GAN_RESUME=PATH names, as checkpoint.load_from finds it:
    a checkpoint folder, a run folder's newest, or its child GAN_RUN_ID's newest."""
    uri = s.resume.rstrip("/")
    refuse_file(uri)
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


def _artifacts(s: Settings, store: Store | None) -> str:
    if store is None:
        return f"{local_folder(s.artifact_uri)}/{s.resolved_run_id} (not there yet)"
    return store.uri


def _lock_lines(store: Store | None) -> list[str]:
    if store is None or not store.exists(LOCK_KEY):
        return []
    return [
        f"lock: {LOCK_KEY} is there: the run would wait for its holder's lease and stop "
        "(exit 11) if it is renewed"
    ]


def _processes_line(s: Settings) -> str:
    single = s.nproc_per_node * s.nnodes == 1
    how = "no process group started" if single else "torchrun would start them"
    nodes = f"{PREFIX}NPROC_PER_NODE={s.nproc_per_node} x {PREFIX}NNODES={s.nnodes}"
    return f"processes: {nodes}; {how}"


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


def _size_line(size: ModelSize) -> str:
    return (
        f"model size: G {size.g_params:,} parameters, D {size.d_params:,} parameters; "
        f"{_si(size.g_flops + size.d_flops)}FLOPs per image (forward: G {size.g_flops:,}, "
        f"D {size.d_flops:,})"
    )


def _si(n: float) -> str:
    units = ["", "k", "M", "G", "T"]
    while abs(n) >= 1000 and len(units) > 1:
        n, units = n / 1000, units[1:]
    return f"{n:.3g} {units[0]}"


def _fid_line(s: Settings, device: torch.device) -> str:
    if s.fid_features == "none":
        return "off (GAN_FID_FEATURES=none)"
    num = evaluator.fid_num_samples(s.fid_num_samples, device)
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
