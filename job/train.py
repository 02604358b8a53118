"""The training run: the components it is built from, the D/G step and the loop.

One readable loop. Every rank runs it; rank 0 alone writes artifacts and serves metrics, and
every decision to stop is agreed by all ranks so no rank is left waiting in a collective.
Each "every N steps" action belongs to a component that owns its state and its schedule:
the metrics processor (log lines, gauges, metrics.jsonl), the FID evaluator (eval.jsonl) and
the checkpointer (what is saved, when, and what is restored).
"""

from __future__ import annotations

import errno
import json
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from job import augment, data, distributed, evaluate, losses, schedule, shards
from job.checkpoint import Checkpointer, serialize
from job.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_STOPPED_UNSAVED,
    DiskFullError,
    JobError,
    NonFiniteLossError,
    PeerLostError,
    RunLockedError,
    StorageError,
)
from job.metrics import Metrics, MetricsProcessor
from job.models import Arch
from job.networks import Networks, no_sync
from job.report import write_report
from job.rng import RngStreams
from job.runlock import RunLock
from job.settings import Settings, public_dict
from job.storage import BackgroundWriter, JsonlLog, NullWriter, download_prefix, open_store

log = logging.getLogger(__name__)
VERSION = "0.1.0"
GRID_SIZE = 64
STOP_CHECK_EVERY = 10  # steps between agreements on stopping when distributed
NONFINITE_LR_FACTOR = 0.5
# settings that change what a checkpoint means: resuming across a change is refused
COMPATIBLE_SETTINGS = ("dataset", "model", "conditional", "latent_dim", "width", "image_size")


@dataclass
class RunState:
    """The run's position: what the loop advances and a checkpoint restores."""

    step: int = 0
    images_seen: int = 0
    rollbacks: int = 0  # times a non-finite loss rolled the run back (each halves the LRs)
    time_progress: float = 0.0  # through GAN_MAX_MINUTES, carried over resumes (job/schedule.py)

    def advance(self, images: int) -> None:
        self.step += 1
        self.images_seen += images

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.rollbacks = int(state["rollbacks"])
        self.time_progress = float(state.get("time_progress", 0.0))  # absent before 0.3


@dataclass(frozen=True)
class Recipe:
    """What one training step computes."""

    loss: str  # bce | hinge
    label_smoothing: float
    r1_gamma: float  # 0: no R1 penalty
    r1_every: int
    diffaugment: str  # DiffAugment policy before every D forward ("": none)
    amp: bool  # bf16 autocast


class StopFlag:
    """Set by SIGTERM/SIGINT once the loop runs; the loop finishes its step and checkpoints, with
    grace_seconds from the signal on to store that checkpoint before it exits for a retry."""

    def __init__(self, grace_seconds: int):
        self.grace_seconds = grace_seconds
        self.signal: int | None = None
        self.received: float | None = None  # time.monotonic() of the first signal

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.received = signum, time.monotonic()

    def time_left(self) -> float:
        """Seconds of the grace period left (all of it on a rank that was not signalled)."""
        since = time.monotonic() - self.received if self.received is not None else 0.0
        return max(0.0, self.grace_seconds - since)


class Trainer:
    def __init__(self, settings: Settings, world: distributed.World):
        s = self.settings = settings  # read during set-up alone; the loop uses plain values
        self.world, self.device = world, world.device
        self.run_id = s.resolved_run_id
        reporting = s.metrics_port > 0 or s.pushgateway_url is not None
        self.metrics = Metrics(enabled=world.is_main and reporting)
        self.metrics.serve(s.metrics_port)  # before any work: a port in use is a settings error
        self.root = open_store(s.artifact_uri, s.s3_endpoint_url)
        self.store = self.root.child(self.run_id)
        self.lock = RunLock(self.store, s.run_lease_seconds)
        self._take_lock()
        try:
            self._build(s)
        except BaseException:
            self.lock.release()
            raise

    def _build(self, s: Settings) -> None:
        world = self.world
        self.data = self._load_data(s)
        self.arch = Arch(
            model=s.model,
            channels=self.data.channels,
            image_size=self.data.image_size,
            latent_dim=s.latent_dim,
            width=s.width,
            num_classes=self.data.num_classes,
            spectral_norm=s.spectral_norm,
            projection=s.conditioning == "projection",
            depth=s.depth,
        )
        extractor = evaluate.load_extractor(
            s.fid_features, self.data.channels, self.data.image_size, self.device,
            inception_weights=s.fid_inception_weights,
            required="fid_features" in s.model_fields_set or bool(s.fid_inception_weights),
        )  # fmt: skip
        self.nets = Networks(
            self.arch, self.device, s.seed, s.lr_g, s.lr_d, (s.beta1, s.beta2), s.ema_decay,
            s.channels_last, s.fused_adam,
        )  # fmt: skip
        self.recipe = Recipe(
            s.loss, s.label_smoothing, s.r1_gamma, s.r1_every, s.diffaugment,
            _amp_enabled(s.amp, self.device),
        )  # fmt: skip
        if self.data.shards is not None:
            self.source = shards.ShardSource(
                self.data, s.batch_size, s.seed, self.device, world.rank, world.world_size
            )
        else:
            self.source = data.BatchSource(
                self.data, s.batch_size, s.seed, self.device, world.rank, world.world_size,
                s.num_workers, on_device=s.data_on_device,
            )  # fmt: skip
        self.run_state = RunState()
        self.rng = RngStreams(s.seed, world, lambda: self.run_state.step)
        self.writer = (
            BackgroundWriter(self.store, on_failure=self._upload_failed)
            if world.is_main
            else NullWriter()
        )
        self.progress = MetricsProcessor(
            self.metrics, JsonlLog("metrics.jsonl", self.writer, self.store), world,
            s.log_every, s.max_steps, self._time_left,
        )  # fmt: skip
        self.fid = evaluate.FidEvaluator(
            extractor, JsonlLog("eval.jsonl", self.writer, self.store), self.metrics, world,
            s.fid_every, evaluate.fid_num_samples(s.fid_num_samples, self.device), s.seed + 1,
            self.arch.latent_dim, self.arch.num_classes,
        )  # fmt: skip
        meta = {
            "settings": public_dict(s),
            "arch": self.arch.to_dict(),
            "world_size": world.world_size,
            "version": VERSION,
        }
        self.checkpointer = Checkpointer(
            self.store, self.writer, world,
            components={
                "run": self.run_state, "nets": self.nets, "data": self.source, "rng": self.rng,
                "records": self.progress.history, "evals": self.fid.history,
            },
            meta=meta, compatible_settings=COMPATIBLE_SETTINGS,
            every=s.checkpoint_every, keep=s.keep_checkpoints, metrics=self.metrics,
        )  # fmt: skip

        self.max_steps, self.max_minutes = s.max_steps, s.max_minutes
        self.lr_decay, self.lr_decay_start = s.lr_decay, s.lr_decay_start
        self.time_progress_at_start = 0.0
        self.upload_timeout = s.upload_timeout_minutes * 60
        self.sample_every, self.seed = s.sample_every, s.seed
        self.nonfinite_policy, self.max_rollbacks = s.nonfinite, s.nonfinite_max_rollbacks
        self.stop = StopFlag(s.grace_seconds)
        self.started = time.monotonic()
        self.grids: dict[int, bytes] = {}  # step -> sample grid PNG, for the report
        # set on the device inside a step, read where the loop syncs anyway (no per-step sync)
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=self.device)
        self.store_failure: Exception | None = None  # a failure retrying cannot fix (disk full)

    # ------------------------------------------------------------ set-up

    def _take_lock(self) -> None:
        """Rank 0 checks the store and takes the run lock before any work; all ranks agree."""
        refused: Exception | None = None
        if self.world.is_main:
            try:
                self.store.check()
                self.lock.acquire()
            except JobError as exc:
                refused = exc
        (failed,) = distributed.any_rank_each([refused is not None], self.world)
        if refused is not None:
            raise refused
        if failed:
            raise RunLockedError("rank 0 could not check the store or take the run lock")

    def _load_data(self, s: Settings) -> data.ImageData:
        local = None
        if s.dataset_kind == "shards":
            cache = s.shard_cache_dir or shards.default_cache_dir(
                s.data_dir, s.dataset, self.run_id
            )
            return shards.open_shards(
                s.dataset, s.image_size, s.conditional, s.model, cache, s.shard_cache_mb,
                s.s3_endpoint_url, self.world.rank,
            )  # fmt: skip
        if s.dataset_kind == "s3":
            cache = Path(s.data_dir) / "s3" / s.dataset.removeprefix("s3://")
            local = download_prefix(s.dataset, cache, s.s3_endpoint_url)
        return data.load_dataset(
            s.dataset, s.data_dir, s.resolved_image_size, s.conditional,
            s.bad_images == "skip", local,
        )  # fmt: skip

    def _upload_failed(self, exc: Exception) -> None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            self.store_failure = exc
        self.metrics.inc_upload_failures()  # the writer logs the failure itself

    def resume(self) -> None:
        """Continue from the checkpoint GAN_RESUME names, or start fresh."""
        s = self.settings
        step = self.checkpointer.restore(
            s.resume, s.s3_endpoint_url, self.run_id, timeout=self.upload_timeout
        )
        if step is None:
            self.rng.reseed(0)
            for history in (self.progress.history, self.fid.history):
                history.load_state_dict({"rows": []})
        else:
            self._after_restore()
            self.metrics.inc_resumes()
            if self.world.is_main:
                self._reload_grids(step)
        if self.world.is_main:
            self._announce(step)
        elif step is not None:
            log.info("resumed from step %d (%d images seen)", step, self.run_state.images_seen)

    def _announce(self, resumed: int | None) -> None:
        """One block that says what this run is about to do, and with what."""
        s, d, st = self.settings, self.data, self.run_state
        start = (
            f"resumed from step {resumed} ({st.images_seen} images seen)"
            if resumed is not None
            else "fresh start"
        )
        filled = ", ".join(f"{k}={v!r}" for k, v in s.recipe_filled.items()) or "nothing"
        if self.fid.extractor is not None:
            fid = f"{self.fid.extractor.name}, {self.fid.num} samples, every {s.fid_every} steps"
        elif s.fid_features == "none":
            fid = "off (GAN_FID_FEATURES=none)"
        else:
            fid = "off: no InceptionV3 weights (see the warning above)"
        lines = [
            f"run {self.run_id}: {start}, until step {s.max_steps}"
            + (f" or {s.max_minutes:g} minutes" if s.max_minutes else ""),
            f"artifacts: {self.store.uri}",
            f"data: {s.dataset} from {d.source}: {len(d)} images, "
            f"{d.classes_found} classes, {d.channels}x{d.image_size}x{d.image_size}",
            f"device: {distributed.describe_device(self.device)} x {self.world.world_size} "
            f"process(es), batch {s.batch_size} per process",
            f"model: {self.arch.model}, width {self.arch.width}, latent {self.arch.latent_dim}"
            + (", class-conditional" if self.arch.num_classes else ""),
            f"recipe: {s.recipe} (filled in: {filled})",
            f"FID: {fid}",
        ]
        log.info("starting\n  %s", "\n  ".join(lines))

    def _after_restore(self) -> None:
        # a preempted run goes on along its schedule; one that ran its whole time budget and
        # is started again (make run, twice) gets a new budget: its rates come back and decay
        # again, instead of staying at 0
        progress = self.run_state.time_progress
        self.time_progress_at_start = progress if progress < 1.0 else 0.0
        self._set_learning_rates()
        self.nonfinite.zero_()

    def _set_learning_rates(self) -> None:
        """The configured rates (a restart may change them), halved once per rollback, times
        the decay at the run's progress through its budget."""
        st = self.run_state
        at = schedule.progress(st.step, self.max_steps, st.time_progress)
        decay = schedule.lr_factor(self.lr_decay, self.lr_decay_start, at)
        self.nets.scale_learning_rates(NONFINITE_LR_FACTOR**st.rollbacks * decay)

    def _reload_grids(self, step: int) -> None:
        for key in self.store.list("samples/"):
            if (grid_step := int(key[len("samples/step-") : -len(".png")])) <= step:
                self.grids[grid_step] = self.store.get_bytes(key)

    def wrap(self) -> None:
        s = self.settings
        self.nets.wrap(self.world.distributed, s.sync_batchnorm, s.compile)

    # ------------------------------------------------------------ the step

    def train_step(self, real: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        r, nets, b = self.recipe, self.nets, real.shape[0]
        g, d = nets.g, nets.d
        if nets.channels_last:
            real = real.contiguous(memory_format=torch.channels_last)
        z = torch.randn(b, self.arch.latent_dim, device=self.device)
        fake_labels = self._random_labels(b)
        # lazy R1 (StyleGAN2): every r1_every steps, scaled by the interval; in this same
        # backward, so that DDP sees one backward per set of forwards
        r1_now = r.r1_gamma > 0 and self.run_state.step % r.r1_every == 0
        with self._autocast():
            fake = g(z, fake_labels)
            real_in = augment.diff_augment(real, r.diffaugment)
            if r1_now:
                real_in = real_in.detach().requires_grad_(True)
            d_real = d(real_in, labels if self.arch.num_classes else None)
            d_fake = d(augment.diff_augment(fake.detach(), r.diffaugment), fake_labels)
            loss_d = losses.d_loss(r.loss, d_real, d_fake, r.label_smoothing)
            if r1_now:
                loss_d = loss_d + r.r1_every * losses.r1_penalty(d_real, real_in, r.r1_gamma)
        nets.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        nets.opt_d.step()

        # G's step needs gradients through D but not D's own (half of D's backward), and
        # must not average D's gradients over ranks
        d.requires_grad_(False)
        with no_sync(d), self._autocast():
            loss_g = losses.g_loss(
                r.loss, d(augment.diff_augment(fake, r.diffaugment), fake_labels)
            )
        nets.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        d.requires_grad_(True)
        nets.opt_g.step()
        nets.update_ema(self.run_state.step)
        self.nonfinite |= ~(torch.isfinite(loss_d) & torch.isfinite(loss_g))
        return {
            "d_loss": loss_d.detach(),
            "g_loss": loss_g.detach(),
            "d_real": torch.sigmoid(d_real.detach()).mean(),
            "d_fake": torch.sigmoid(d_fake.detach()).mean(),
        }

    def _random_labels(self, n: int) -> torch.Tensor | None:
        if not self.arch.num_classes:
            return None
        return torch.randint(self.arch.num_classes, (n,), device=self.device)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.recipe.amp)

    # ------------------------------------------------------------ the loop

    def run(self) -> int:
        self._start()
        reason = "max_steps" if self.run_state.step >= self.max_steps else None
        while reason is None:
            t0 = time.monotonic()
            real, labels = self.source.next()
            stats = self.train_step(real, labels)
            images = real.shape[0] * self.world.world_size
            self.run_state.advance(images)
            self.progress.step_done(images, time.monotonic() - t0)
            if self.store_failure is not None:
                raise DiskFullError(f"{self.store.uri}: {self.store_failure}")
            step, reason = self.run_state.step, self._stop_reason()
            self._set_learning_rates()
            log_now = self.progress.due(step, last=reason is not None)
            if (log_now or self.checkpointer.due(step)) and self._rolled_back():
                reason = None if reason == "max_steps" else reason
                continue
            if log_now:
                self.progress.log(self._record(), stats)
            if step % self.sample_every == 0:
                self._samples()
            if self.fid.due(step):
                self._fid()
            if reason is None:
                self.checkpointer.maybe_save(step)
        return self._finish(reason)

    def _start(self) -> None:
        s = self.settings
        self.stop.install()
        if self.world.is_main:
            self.metrics.set_info(self.run_id, s.dataset, s.model, self.world.world_size, VERSION)
            self._write_config()
        key = evaluate.stats_key(
            s.dataset, self.arch.image_size, self.fid.extractor, self.fid.num, s.seed
        ) if self.fid.extractor else ""  # fmt: skip
        self.fid.prepare(
            self.root.child("fid-stats"), key, lambda n: data.real_images(self.data, n, s.seed)[0]
        )
        self.started = time.monotonic()
        self.progress.restart_window()

    def _rolled_back(self) -> bool:
        """After a non-finite loss on any rank: roll back to the last checkpoint, or fail."""
        (bad,) = distributed.any_rank_each([bool(self.nonfinite)], self.world)
        if not bad:
            return False
        self.metrics.inc_nonfinite()
        st = self.run_state
        what = f"non-finite loss by step {st.step}"
        if self.nonfinite_policy == "fail" or st.rollbacks >= self.max_rollbacks:
            raise NonFiniteLossError(
                f"{what} (after {st.rollbacks} rollbacks; GAN_NONFINITE={self.nonfinite_policy}): "
                f"lower GAN_LR_G / GAN_LR_D"
            )
        rollbacks = st.rollbacks + 1
        step = self.checkpointer.rollback(self.upload_timeout)
        if step is None:
            raise NonFiniteLossError(f"{what}, and no checkpoint to roll back to")
        st.rollbacks = rollbacks
        self._after_restore()
        self.progress.restart_window()
        log.warning(
            "%s: rolled back to step %d with learning rates x%g (rollback %d of %d)",
            what, step, NONFINITE_LR_FACTOR**rollbacks, rollbacks, self.max_rollbacks,
        )  # fmt: skip
        return True

    def _time_left(self) -> float:
        """Seconds left of GAN_MAX_MINUTES (infinite without a budget)."""
        if not self.max_minutes:
            return math.inf
        return self.max_minutes * 60 - (time.monotonic() - self.started)

    def _stop_reason(self) -> str | None:
        if self.run_state.step >= self.max_steps:
            return "max_steps"
        if self.world.distributed and self.run_state.step % STOP_CHECK_EVERY:
            return None  # agreeing costs a collective and a host sync: not every step
        signalled, lost, elapsed = distributed.max_over_ranks(
            [self.stop.signal is not None, self.lock.lost, time.monotonic() - self.started],
            self.world,
        )
        st = self.run_state  # one time progress on all ranks: their learning rates must agree
        st.time_progress = schedule.time_progress(
            self.time_progress_at_start, elapsed, self.max_minutes
        )
        over_time = bool(self.max_minutes) and elapsed > self.max_minutes * 60
        if lost:
            raise RunLockedError(
                f"{self.store.uri}: another job took over this run's lock (this job could not "
                f"renew it for GAN_RUN_LEASE_SECONDS={self.lock.lease:g}): stopping"
            )
        if signalled:
            return "signal"
        return "max_minutes" if over_time else None

    def _finish(self, reason: str) -> int:
        step = self.run_state.step
        log.info("stopping at step %d: %s", step, reason)
        if reason != "signal":
            if step not in self.grids:
                self._samples()
            if self.fid.due(step, last=True):
                self._fid()
        self.checkpointer.maybe_save(step, last=True)
        if reason == "signal":
            return self._stored_for_retry(step)
        if self.world.is_main:
            self._export_generator()
            self._report()
        return EXIT_OK

    def _stored_for_retry(self, step: int) -> int:
        """75 once the checkpoint of the stop step is complete in the store, within the grace
        period; 10 when it is not (a retry resumes from an older checkpoint). Agreed by all ranks.
        """
        wait = min(self.stop.time_left(), self.upload_timeout)
        stored = distributed.broadcast_object(self.writer.close(wait), self.world)
        if stored:
            log.info("checkpoint of step %d stored: exit 75, a retry resumes here", step)
            return EXIT_PREEMPTED
        log.warning(
            "checkpoint of step %d not stored within GAN_GRACE_SECONDS=%d or "
            "GAN_UPLOAD_TIMEOUT_MINUTES=%g: exit 10, a retry resumes from the last complete "
            "checkpoint; not stored: %s",
            step, self.stop.grace_seconds, self.upload_timeout / 60,
            self.writer.describe_not_stored(),
        )  # fmt: skip
        return EXIT_STOPPED_UNSAVED

    def close(self, timeout: float | None = None) -> bool:
        """Wait for every queued upload, then free the run id; False when the uploads did not
        all finish in time."""
        uploaded = self.writer.close(timeout)
        self.lock.release()
        return uploaded

    # ------------------------------------------------------------ artifacts

    def _record(self) -> dict:
        """The run's position for this log step's record (the processor adds losses, speed)."""
        record = {
            "step": self.run_state.step,
            "epoch": self.source.epoch,
            "images_seen": self.run_state.images_seen,
            "skipped_images": self.source.skipped_images,
            "grad_norm_d": round(_grad_norm(self.nets.d), 5),
            "grad_norm_g": round(_grad_norm(self.nets.g), 5),
            **(self.source.stats() if isinstance(self.source, shards.ShardSource) else {}),
        }
        if self.device.type == "cuda":
            record["gpu_memory_bytes"] = torch.cuda.memory_allocated()
            record["gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated()
        return record

    def _write_config(self) -> None:
        config = {
            "settings": public_dict(self.settings),
            "run_id": self.run_id,
            "arch": self.arch.to_dict(),
            "world_size": self.world.world_size,
            "version": VERSION,
        }
        self.writer.submit("config.json", data=json.dumps(config, indent=2).encode())

    def _samples(self) -> None:
        if not self.world.is_main:
            return
        z, labels = evaluate.fixed_inputs(
            self.arch.latent_dim, GRID_SIZE, self.arch.num_classes, self.seed,
            self.device,
        )  # fmt: skip
        images = evaluate.generate(self.nets.g_ema, z, labels)
        nrow = self.arch.num_classes if self.arch.num_classes else 8
        png = evaluate.grid_png(images, nrow=nrow)
        self.grids[self.run_state.step] = png
        self.writer.submit(f"samples/step-{self.run_state.step:08d}.png", data=png, droppable=True)

    def _fid(self) -> None:
        st = self.run_state
        done = self.fid.evaluate(
            self.nets.g_ema, st.step, st.images_seen, stop=lambda: self.stop.signal is not None
        )
        if done:
            self._report()

    def _report(self) -> None:
        """report.png: losses, D outputs and FID against images seen, and the grids over time."""
        if not self.world.is_main:
            return
        png = write_report(
            self.progress.records, self.fid.records, sorted(self.grids.items()), title=self.run_id
        )
        self.writer.submit("report.png", data=png, replace=True)

    def _export_generator(self) -> None:
        export = {
            "arch": self.arch.to_dict(),
            "g_ema": self.nets.g_ema.state_dict(),
            "step": self.run_state.step,
        }
        self.writer.submit("final/generator.pt", data=serialize(export))


def _amp_enabled(setting: str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "bf16"


def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))) if grads else 0.0


def train(settings: Settings) -> int:
    """The whole job for one process: returns its exit status."""
    try:
        return _run_trainer(settings, distributed.setup(settings.device))
    except JobError:
        raise
    except Exception as exc:
        if distributed.peer_lost(exc):
            raise PeerLostError(
                f"another process of the job failed or is gone ({exc}): see its log; a retry "
                "resumes from the last complete checkpoint"
            ) from exc
        raise
    finally:
        distributed.teardown()


def _run_trainer(settings: Settings, world: distributed.World) -> int:
    """Build the trainer, run it, wait for its uploads: the exit status of this process."""
    trainer = Trainer(settings, world)
    try:
        trainer.resume()
        trainer.wrap()
        code = trainer.run()
    finally:
        # a job that failed does not wait on storage that cannot take more (disk full)
        failed = trainer.store_failure is not None
        uploaded = trainer.close(timeout=5 if failed else settings.upload_timeout_minutes * 60)
        if world.is_main and settings.pushgateway_url:
            trainer.metrics.push(settings.pushgateway_url, "gan-job", {"run_id": trainer.run_id})
    if not uploaded and code == EXIT_OK:
        raise StorageError(
            f"{trainer.store.uri}: not stored after "
            f"GAN_UPLOAD_TIMEOUT_MINUTES={settings.upload_timeout_minutes}: "
            f"{trainer.writer.describe_not_stored()}"
        )
    return code
