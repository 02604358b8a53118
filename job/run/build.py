"""From the settings to the run's parts: the only place that reads Settings during training.

build() takes the run lock before any heavy work (a second job of the same run id stops in
seconds, not after loading its data), then builds every component with plain values.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from job.data import batching, shards
from job.data import datasets as data
from job.data.source import BatchSource, real_images
from job.gan.ada import AdaptiveAugment
from job.gan.models import Arch
from job.gan.networks import Networks
from job.gan.r3schedule import R3Schedule, half_life
from job.gan.step import GanStep, Recipe, amp_enabled
from job.infra import distributed, threads, watchdog
from job.infra.jsonl_log import JsonlLog
from job.infra.metrics import Metrics
from job.infra.store import Store
from job.infra.stores import copy_dir, download_prefix, open_store
from job.infra.tensorboard_log import TensorBoardLog
from job.infra.writer import BackgroundWriter, NullWriter
from job.quality.evaluator import FidEvaluator, fid_num_samples
from job.quality.extractors import Extractor, load_extractor
from job.quality.reference import stats_key
from job.run import agree, runlock
from job.run.artifacts import RunArtifacts
from job.run.best import BestGenerator
from job.run.budget import Budget
from job.run.checkpoint import Checkpointer
from job.run.progress import MetricsProcessor
from job.run.rng import RngStreams
from job.run.runlock import RunLock
from job.settings import PER_NODE_SETTINGS, Settings, public_dict

# settings that change what a checkpoint means: resuming across a change is refused
COMPATIBLE_SETTINGS = ("dataset", "model", "conditional", "latent_dim", "width", "image_size")


def version() -> str:
    """gan-job's version as installed; it moves when a checkpoint or artifact format changes."""
    try:
        return importlib.metadata.version("gan-job")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_meta(settings: Settings, arch: Arch, world_size: int) -> dict:
    """What config.json, every checkpoint and the gan_run_info gauge say about the run."""
    return {
        "settings": public_dict(settings),
        "run_id": settings.resolved_run_id,
        "arch": arch.to_dict(),
        "world_size": world_size,
        "version": version(),
    }


@dataclass
class Parts:
    """The run's components, each built once; the Trainer composes them."""

    world: distributed.World
    metrics: Metrics
    store: Store
    lock: RunLock
    writer: BackgroundWriter | NullWriter
    source: BatchSource | shards.ShardSource
    nets: Networks
    gan_step: GanStep
    budget: Budget
    progress: MetricsProcessor
    fid: FidEvaluator
    best: BestGenerator
    checkpointer: Checkpointer
    artifacts: RunArtifacts
    upload_timeout: float  # seconds: GAN_UPLOAD_TIMEOUT_MINUTES
    wrap: dict  # Networks.wrap's keywords


def build(settings: Settings, world: distributed.World) -> Parts:
    """Every component of the run, once this job holds the run's lock (released again if
    building fails)."""
    s = settings
    agree.agree_settings(s.model_dump(mode="json"), s.node_rank, PER_NODE_SETTINGS, world)
    metrics = Metrics(enabled=world.is_main and (s.metrics_port > 0 or bool(s.pushgateway_url)))
    metrics.serve(s.metrics_port)  # before any work: a port in use is a settings error
    root = open_store(s.artifact_uri, s.s3_endpoint_url)
    store = root.child(s.resolved_run_id)
    lock = RunLock(store, s.run_lease_seconds)
    try:
        runlock.take(store, lock, world)  # inside: a signal right after acquire() releases it
        return _build_parts(s, world, metrics, root, store, lock)
    except BaseException:
        lock.release()
        raise


def _build_parts(
    s: Settings,
    world: distributed.World,
    metrics: Metrics,
    root: Store,
    store: Store,
    lock: RunLock,
) -> Parts:
    used = threads.apply(s.num_threads, distributed.local_world_size())
    plan = batch_plan(s, world)
    with watchdog.waiting("loading the data", None):  # bounded by its store's timeouts
        images = load_data(s, world.rank)
    arch = _arch(s, images)
    extractor = _extractor(s, images, world)
    nets = _networks(s, arch, world)
    source = batch_source(s, images, world, plan.per_process, _loader_workers(s, used))
    ada = _ada(s, world)
    gan_step = GanStep(
        nets,
        _recipe(s, world),
        device=world.device,
        micro_batches=plan.accumulation,
        ada=ada,
        schedule=_schedule(s, plan.global_batch),
        images_seen=lambda: budget.state.images_seen,
        world_size=world.world_size,
    )
    budget = _budget(s, world, lock)
    writer = _writer(s, store, metrics, world, budget.stop)
    tb = TensorBoardLog(store, writer, lambda: budget.step) if s.tensorboard else None
    rows = ada.record if ada else dict  # fields of every metrics.jsonl and eval.jsonl row
    history = JsonlLog("metrics.jsonl", writer, store, tb and tb.train)
    progress = _progress(s, metrics, history, world, budget, rows)
    fid_line = _fid_line(s, extractor, world)
    startup = startup_lines(s, store.uri, images, arch, fid_line, world, plan, used)
    artifacts = _artifacts(s, store, writer, world, arch, startup, tb)
    best = _best(s, world, artifacts, metrics)
    fid = _fid(s, world, metrics, root, writer, store, extractor, arch, images, rows, tb)
    components = {
        "run": budget,
        "nets": nets,
        "batch": _global_batch(s, world, plan, source, gan_step, startup),  # before "data"
        "data": source,
        "rng": RngStreams(s.seed, world, lambda: budget.step),
        "records": progress,
        "evals": fid,
        "best": best,
        **({"tensorboard": tb} if tb else {}),
        **({"augment": ada} if ada else {}),
    }
    return Parts(
        world=world,
        metrics=metrics,
        store=store,
        lock=lock,
        writer=writer,
        source=source,
        nets=nets,
        gan_step=gan_step,
        budget=budget,
        progress=progress,
        fid=fid,
        best=best,
        checkpointer=_checkpointer(s, store, writer, world, metrics, artifacts.meta, components),
        artifacts=artifacts,
        upload_timeout=s.upload_timeout_minutes * 60,
        wrap=_wrap(s, world),
    )


def batch_plan(s: Settings, world: distributed.World) -> batching.BatchPlan:
    given = batching.batch_size_given(s.model_fields_set, s.recipe_filled)
    return batching.plan_from_settings(
        s.batch_size, given, s.global_batch_size, world.world_size, s.micro_batch_size
    )


def _global_batch(s, world, plan, source, gan_step, startup) -> batching.GlobalBatch:
    """The checkpoint's `batch`: a plan adopted on resume resizes the source and the step, and
    the start-up block's batch line says so."""

    def apply(adopted: batching.BatchPlan) -> None:
        source.resize(adopted.per_process)
        gan_step.micro_batches = adopted.accumulation
        startup[:] = [_with_batch(line, adopted) for line in startup]

    return batching.GlobalBatch(
        plan,
        batch_size=s.batch_size,
        global_given=s.global_batch_size is not None,
        micro_limit=s.micro_batch_size,
        apply=apply,
        is_main=world.is_main,
    )


def _loader_workers(s: Settings, used: threads.Threads) -> int:
    return s.num_workers if s.num_workers is not None else threads.loader_workers(used.count)


def _wrap(s: Settings, world: distributed.World) -> dict:
    """Networks.wrap's keywords: DDP when distributed, SyncBatchNorm, torch.compile."""
    return {
        "distributed": world.distributed,
        "sync_batchnorm": s.sync_batchnorm,
        "compile": s.compile,
        "penalties": s.r1_gamma > 0 or s.r2_gamma > 0,
    }


def _progress(s, metrics, history, world, budget, rows) -> MetricsProcessor:
    return MetricsProcessor(
        row_fields=rows,
        metrics=metrics,
        history=history,
        world=world,
        log_every=s.log_every,
        max_steps=s.max_steps,
        time_left=budget.time_left,
    )


def _artifacts(s, store, writer, world, arch, startup, tb) -> RunArtifacts:
    return RunArtifacts(
        store=store,
        writer=writer,
        world=world,
        meta=run_meta(s, arch, world.world_size),
        arch=arch,
        sample_every=s.sample_every,
        seed=s.seed,
        startup=startup,
        tensorboard=tb,
    )


def _extractor(s: Settings, images: data.ImageData, world: distributed.World) -> Extractor | None:
    return load_extractor(
        s.fid_features,
        images.channels,
        images.image_size,
        world.device,
        inception_weights=s.fid_inception_weights,
        required="fid_features" in s.model_fields_set or bool(s.fid_inception_weights),
    )


def _networks(s: Settings, arch: Arch, world: distributed.World) -> Networks:
    return Networks(
        arch,
        world.device,
        seed=s.seed,
        lr_g=s.lr_g,
        lr_d=s.lr_d,
        betas=(s.beta1, s.beta2),
        ema_decay=s.ema_decay,
        channels_last=s.channels_last,
        fused_adam=s.fused_adam,
    )


def _recipe(s: Settings, world: distributed.World) -> Recipe:
    return Recipe(
        loss=s.loss,
        label_smoothing=s.label_smoothing,
        r1_gamma=s.r1_gamma,
        r1_every=s.r1_every,
        r2_gamma=s.r2_gamma,
        diffaugment=s.diffaugment,
        amp=amp_enabled(s.amp, world.device),
    )


def _ada(s: Settings, world: distributed.World) -> AdaptiveAugment | None:
    if s.augment != "ada":
        return None
    return AdaptiveAugment(
        world, target=s.ada_target, interval=s.ada_interval, speed_images=s.ada_speed_images
    )


def _schedule(s: Settings, global_batch: int) -> R3Schedule | None:
    if s.schedule == "none":
        return None
    horizon = s.schedule_images or s.max_steps * global_batch
    return R3Schedule(horizon, s.beta2, half_life(s.ema_decay, global_batch))


def _budget(s: Settings, world: distributed.World, lock: RunLock) -> Budget:
    return Budget(
        world=world,
        lock=lock,
        max_steps=s.max_steps,
        max_minutes=s.max_minutes,
        lr_decay=s.lr_decay,
        lr_decay_start=s.lr_decay_start,
        grace_seconds=s.grace_seconds,
        nonfinite=s.nonfinite,
        max_rollbacks=s.nonfinite_max_rollbacks,
    )


def _checkpointer(s, store, writer, world, metrics, meta, components) -> Checkpointer:
    return Checkpointer(
        store=store,
        writer=writer,
        world=world,
        components=components,
        meta=meta,
        compatible_settings=COMPATIBLE_SETTINGS,
        every=s.checkpoint_every,
        keep=s.keep_checkpoints,
        metrics=metrics,
        resume=s.resume,
        endpoint_url=s.s3_endpoint_url,
        # other ranks wait for rank 0's reads and uploads in a collective: below its timeout
        timeout=min(s.upload_timeout_minutes * 60, s.stall_timeout_seconds / 2),
    )


def load_data(s: Settings, rank: int) -> data.ImageData:
    """The training images GAN_DATASET names: shards are opened (read as they are needed), an
    s3:// prefix is downloaded once per node, the rest is read from GAN_DATA_DIR."""
    if s.dataset_kind == "shards":
        cache = s.shard_cache_dir or shards.default_cache_dir(
            s.data_dir, s.dataset, s.resolved_run_id
        )
        return shards.open_shards(
            s.dataset,
            s.image_size,
            s.conditional,
            s.model,
            cache,
            s.shard_cache_mb,
            s.s3_endpoint_url,
            rank,
        )
    local = None
    if s.dataset_kind == "s3":
        local = download_prefix(s.dataset, copy_dir(s.data_dir, s.dataset), s.s3_endpoint_url)
    return data.load_dataset(
        s.dataset,
        s.data_dir,
        s.resolved_image_size,
        s.conditional,
        skip_bad=s.bad_images == "skip",
        local_s3_copy=local,
        background=s.background_color,
    )


def batch_source(
    s: Settings,
    images: data.ImageData,
    world: distributed.World,
    batch_size: int,
    num_workers: int,
) -> BatchSource | shards.ShardSource:
    """The one place that picks how batches are read: from shards, or from memory/a folder."""
    where = {"device": world.device, "rank": world.rank, "world_size": world.world_size}
    if images.shards is not None:
        return shards.ShardSource(images, batch_size, seed=s.seed, **where)
    return BatchSource(
        images,
        batch_size,
        seed=s.seed,
        **where,
        num_workers=num_workers,
        on_device=s.data_on_device,
    )


def _arch(s: Settings, images: data.ImageData) -> Arch:
    return Arch(
        model=s.model,
        channels=images.channels,
        image_size=images.image_size,
        latent_dim=s.latent_dim,
        width=s.width,
        num_classes=images.num_classes,
        spectral_norm=s.spectral_norm,
        projection=s.conditioning == "projection",
        depth=s.depth,
        blocks=s.blocks if s.model == "r3gan" else 0,
    )


def _writer(s, store, metrics, world, stop) -> BackgroundWriter | NullWriter:
    if not world.is_main:
        return NullWriter()
    failed, seconds = lambda exc: metrics.inc_upload_failures(), s.upload_timeout_minutes * 60
    return BackgroundWriter(store, on_failure=failed, give_up_after=seconds, stop=stop)


def _best(s, world, artifacts, metrics) -> BestGenerator:
    return BestGenerator(
        world=world,
        artifacts=artifacts,
        metrics=metrics,
        patience=s.early_stop_patience,
        min_delta=s.early_stop_min_delta,
        target_fid=s.target_fid,
        target_kid=s.target_kid,
    )


def _fid(s, world, metrics, root, writer, store, extractor, arch, images, rows, tb) -> FidEvaluator:
    key = (
        stats_key(s.dataset, arch.image_size, extractor, _fid_num(s, world), s.seed)
        if extractor
        else ""
    )
    return FidEvaluator(
        extractor=extractor,
        history=JsonlLog("eval.jsonl", writer, store, tb and tb.evaluation),
        metrics=metrics,
        world=world,
        every=s.fid_every,
        num=_fid_num(s, world),
        seed=s.seed + 1,
        latent_dim=arch.latent_dim,
        num_classes=arch.num_classes,
        cache=root.child("fid-stats"),
        cache_key=key,
        real_images=lambda n: real_images(images, n, s.seed)[0],
        row_fields=rows,
    )


def _fid_num(s: Settings, world: distributed.World) -> int:
    return fid_num_samples(s.fid_num_samples, world.device)


def startup_lines(
    s: Settings,
    uri: str,
    images: data.ImageData,
    arch: Arch,
    fid: str,
    world: distributed.World,
    plan: batching.BatchPlan,
    used: threads.Threads,
) -> list[str]:
    """The start-up block (RunArtifacts.announce; the dry run's too) but for where the run
    starts: uri, where its artifacts go; fid, what its FID line says."""
    filled = ", ".join(f"{k}={v!r}" for k, v in s.recipe_filled.items()) or "nothing"
    return [
        f"until step {s.max_steps}" + (f" or {s.max_minutes:g} minutes" if s.max_minutes else ""),
        f"artifacts: {uri}",
        f"data: {s.dataset} from {images.source}: {images.describe(s.background)}",
        f"device: {distributed.describe_device(world.device)} x {world.world_size} "
        f"process(es), {plan.describe()}",
        f"threads: {used.count} per process ({used.why})",
        f"model: {arch.model}, width {arch.width}, latent {arch.latent_dim}"
        + (", class-conditional" if arch.num_classes else ""),
        f"recipe: {s.recipe} (filled in: {filled})",
        f"FID: {fid}",
    ]


def _fid_line(s: Settings, extractor: Extractor | None, world: distributed.World) -> str:
    if extractor is not None:
        return f"{extractor.name}, {_fid_num(s, world)} samples, every {s.fid_every} steps"
    if s.fid_features == "none":
        return "off (GAN_FID_FEATURES=none)"
    return "off: no InceptionV3 weights (see the warning above)"


def _with_batch(line: str, plan: batching.BatchPlan) -> str:
    """The start-up block's device line with another batch plan."""
    if not line.startswith("device: "):
        return line
    return line[: line.index(" process(es), ") + len(" process(es), ")] + plan.describe()
