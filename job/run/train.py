"""The training run: the Trainer composes the run's components and runs the loop.

One readable loop. Every rank runs it; rank 0 alone writes artifacts and serves metrics, and
every decision to stop is agreed by all ranks so no rank is left waiting in a collective.
Each "every N steps" action belongs to a component that owns its state and its schedule
(job/run/build.py builds them from the settings): the budget (when to stop, the learning-rate
factor), the GAN step, the metrics processor (log lines, gauges, metrics.jsonl), the FID
evaluator (eval.jsonl), the best generator (best/generator.pt, early stopping), the run's
artifacts (grids, report.png, the export) and the checkpointer (what is saved, when, and what
is restored). A new feature adds a component or a method of one; the Trainer gains at most a
line in run().
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from job.infra import distributed, watchdog
from job.infra.errors import (
    EXIT_OK,
    EXIT_PREEMPTED,
    EXIT_STOPPED_UNSAVED,
    DiskFullError,
    JobError,
    NonFiniteLossError,
    PeerLostError,
    StorageError,
)
from job.infra.metrics import PUSH_TIMEOUT_SECONDS
from job.run.budget import NONFINITE_LR_FACTOR
from job.run.build import Parts
from job.run.runlock import RELEASE_SECONDS

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, parts: Parts):
        self.world, self.metrics = parts.world, parts.metrics
        self.lock, self.writer = parts.lock, parts.writer
        self.source, self.nets, self.gan_step = parts.source, parts.nets, parts.gan_step
        self.budget, self.progress = parts.budget, parts.progress
        self.fid, self.best = parts.fid, parts.best
        self.checkpointer, self.artifacts = parts.checkpointer, parts.artifacts
        self.upload_timeout, self.wrap_options = parts.upload_timeout, parts.wrap

    def resume(self) -> None:
        """Continue from the checkpoint GAN_RESUME names, or start fresh."""
        step = self.checkpointer.restore()
        if step is not None:
            self.metrics.inc_resumes()
            self.artifacts.restore_grids(step)
        self.nets.scale_learning_rates(self.budget.lr_factor())
        self.artifacts.announce(step, self.budget.state.images_seen)

    def wrap(self) -> None:
        self.nets.wrap(**self.wrap_options)

    def run(self) -> int:
        self._start()
        reason = "max_steps" if self.budget.step >= self.budget.max_steps else None
        while reason is None:
            t0 = time.monotonic()
            real, labels = self.source.next()
            stats = self.gan_step.train(real, labels, self.budget.step)
            images = real.shape[0] * self.world.world_size
            self.budget.state.advance(images)
            self.progress.step_done(images, time.monotonic() - t0)
            self.writer.check()  # a full disk, a folder refusing writes, a store gone for good
            step, reason = self.budget.step, self.budget.stop_reason()
            self.nets.scale_learning_rates(self.budget.lr_factor())
            log_now = self.progress.due(step, last=reason is not None)
            if (log_now or self.checkpointer.due(step)) and self._rolled_back():
                reason = None if reason == "max_steps" else reason
                continue
            if log_now:
                self.progress.log(self._record(), stats)
            self.artifacts.maybe_sample(step, self.nets.g_ema)
            if self.fid.due(step):
                reason = self._fid(step, reason)
            if reason is None:
                self.checkpointer.maybe_save(step)
        return self._finish(reason)

    def _start(self) -> None:
        meta = self.artifacts.meta
        self.metrics.set_info(
            meta["run_id"],
            meta["settings"]["dataset"],
            meta["arch"]["model"],
            self.world.world_size,
            meta["version"],
        )
        self.artifacts.write_config()
        self.fid.prepare()  # still before the loop takes the stop signals: they end it at once
        self.budget.start()
        self.progress.restart_window()

    def _rolled_back(self) -> bool:
        """After a non-finite loss on any rank: roll back to the last checkpoint, or fail."""
        if not self.gan_step.nonfinite_on_any_rank(self.world):
            return False
        self.metrics.inc_nonfinite()
        what, rollbacks = self.budget.check_rollback(), self.budget.state.rollbacks
        step = self.checkpointer.rollback()
        if step is None:
            raise NonFiniteLossError(f"{what}, and no checkpoint to roll back to")
        self.budget.rolled_back(rollbacks)
        self.nets.scale_learning_rates(self.budget.lr_factor())
        log.warning(
            "%s: rolled back to step %d with learning rates x%g (rollback %d of %d)",
            what,
            step,
            NONFINITE_LR_FACTOR ** (rollbacks + 1),
            rollbacks + 1,
            self.budget.max_rollbacks,
        )
        return True

    def _record(self) -> dict:
        """The run's position for this log step's record (the processor adds losses, speed)."""
        st = self.budget.state
        record = {
            "step": st.step,
            "epoch": self.source.position.epoch,
            "images_seen": st.images_seen,
            "skipped_images": self.source.skipped_images,
            **self.gan_step.grad_norms(),
            **self.nets.learning_rates(),
            **self.source.stats(),
        }
        if self.world.device.type == "cuda":
            record["gpu_memory_bytes"] = torch.cuda.memory_allocated()
            record["gpu_memory_peak_bytes"] = torch.cuda.max_memory_allocated()
        return record

    def _fid(self, step: int, reason: str | None) -> str | None:
        """An evaluation; the stop reason: the one given, else plateau or target (early
        stopping, agreed by all ranks) or None."""
        g_ema, images_seen = self.nets.g_ema, self.budget.state.images_seen
        scores = self.fid.evaluate(g_ema, step, images_seen, stop=lambda: self.budget.stop.set)
        if scores is None:
            return reason
        self.fid.record(scores | self.best.judge(step, scores, g_ema))
        self.artifacts.report(self.progress.records, self.fid.records)
        return reason or self.best.stop_reason()

    def _finish(self, reason: str) -> int:
        step = self.budget.step
        log.info("stopping at step %d: %s", step, reason)
        if reason != "signal":
            self.artifacts.maybe_sample(step, self.nets.g_ema, last=True)
            if self.fid.due(step, last=True):
                self._fid(step, reason)
        self.checkpointer.maybe_save(step, last=True)
        if reason == "signal":
            return self._stored_for_retry(step)
        self.artifacts.export_generator(self.nets.g_ema, step)
        self.artifacts.report(self.progress.records, self.fid.records)
        return EXIT_OK

    def _stored_for_retry(self, step: int) -> int:
        """75 once the checkpoint of the stop step is complete in the store, within the grace
        period; 10 when it is not (a retry resumes from an older checkpoint). Agreed by all ranks.
        """
        stored = self.writer.close(self.upload_timeout)  # within the grace period (build.py)
        if distributed.broadcast_object(stored, self.world):
            log.info("checkpoint of step %d stored: exit 75, a retry resumes here", step)
            return EXIT_PREEMPTED
        return self.unsaved(step)

    def unsaved(self, step: int) -> int:
        """After a stop signal, uploads not all stored: 8 for a full disk, 4 for a folder that
        refuses writes, else 10 (a retry resumes from the last complete checkpoint)."""
        if self.writer.disk_full is not None:
            raise DiskFullError(
                f"{self.writer.store.uri}: checkpoint of step {step} not stored, no space left on "
                f"its disk ({self.writer.disk_full}): not stored: {self.writer.describe_not_stored()}"
            )
        if self.writer.refused is not None:
            raise self.writer.refused
        log.warning(
            "checkpoint of step %d not stored within GAN_GRACE_SECONDS=%g or "
            "GAN_UPLOAD_TIMEOUT_MINUTES=%g: exit 10, a retry resumes from the last complete "
            "checkpoint; not stored: %s",
            step,
            self.budget.stop.grace_seconds,
            self.upload_timeout / 60,
            self.writer.describe_not_stored(),
        )
        return EXIT_STOPPED_UNSAVED

    def close(self, timeout: float | None = None) -> bool:
        """Wait for every queued upload, then free the run id; False when the uploads did not
        all finish in time. After a stop signal, neither wait outlasts its grace period."""
        uploaded = self.writer.close(timeout)
        self.lock.release(self.within_grace(RELEASE_SECONDS))
        return uploaded

    def within_grace(self, seconds: float) -> float:
        """seconds, cut to what is left of the grace period once a stop signal came: the pod's
        SIGKILL must not come first."""
        stop = self.budget.stop
        return min(seconds, stop.time_left()) if stop.set else seconds


def train(
    build_parts: Callable[[distributed.World], Parts],
    device: str,
    stall_timeout_seconds: float,
    pushgateway_url: str | None,
) -> int:
    """The whole job for one process: returns its exit status. build_parts: the run's parts
    for the world this process joins (job/run/build.py build() with the run's settings)."""
    watchdog.start(stall_timeout_seconds)
    try:
        parts = build_parts(distributed.setup(device, stall_timeout_seconds))
        return _run_trainer(parts, pushgateway_url)
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
        watchdog.stop()
        distributed.teardown()


def _run_trainer(parts: Parts, pushgateway_url: str | None) -> int:
    """Run the trainer and wait for its uploads: the exit status of this process."""
    trainer, writer, code = Trainer(parts), parts.writer, None
    try:
        trainer.resume()
        trainer.wrap()
        code = trainer.run()
    finally:
        uploaded = trainer.close(timeout=parts.upload_timeout)  # at once when the disk is full
        if parts.world.is_main and pushgateway_url:
            run_id = parts.artifacts.meta["run_id"]
            timeout = trainer.within_grace(PUSH_TIMEOUT_SECONDS)
            parts.metrics.push(pushgateway_url, "gan-job", {"run_id": run_id}, timeout)
    if code == EXIT_OK and parts.budget.stop.set and not uploaded:  # a signal after the last step
        return trainer.unsaved(parts.budget.step)
    if code == EXIT_OK and writer.disk_full is not None:
        raise DiskFullError(
            f"{writer.store.uri}: no space left on its disk ({writer.disk_full}): "
            f"not stored: {writer.describe_not_stored()}"
        )
    if code == EXIT_OK and writer.refused is not None:
        raise writer.refused
    if not uploaded and code == EXIT_OK:
        raise StorageError(
            f"{writer.store.uri}: not stored after "
            f"GAN_UPLOAD_TIMEOUT_MINUTES={parts.upload_timeout / 60:g}: "
            f"{writer.describe_not_stored()}"
        )
    return code
