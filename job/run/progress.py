"""The run's progress: every log_every steps one record, averaged over ranks, that becomes a
console line, the gauges and a row of metrics.jsonl (MetricsProcessor)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from job.infra import distributed, watchdog
from job.infra.jsonl_log import JsonlLog
from job.infra.metrics import Metrics

log = logging.getLogger(__name__)


class MetricsProcessor:
    """Every log_every steps (and at the last step): one record, averaged over ranks, that
    becomes a console line, the gauges and a row of metrics.jsonl. Owns the timing window.

    Every rank calls it (averaging is a collective); rank 0 alone prints and reports. The
    checkpointer saves and restores its history (the rows of metrics.jsonl).
    """

    def __init__(
        self,
        *,
        metrics: Metrics,
        history: JsonlLog,
        world: distributed.World,
        log_every: int,
        max_steps: int,
        time_left: Callable[[], float],
        row_fields: Callable[[], dict[str, Any]] = dict,
    ):
        """row_fields(): what else each record holds (GAN_AUGMENT=ada: augment_p)."""
        self.metrics, self.history, self.world = metrics, history, world
        self.row_fields = row_fields
        self.log_every, self.max_steps, self.time_left = log_every, max_steps, time_left
        self.restart_window()

    def restart_window(self) -> None:
        self.window_start, self.window_steps, self.window_images = time.monotonic(), 0, 0

    def step_done(self, images: int, seconds: float) -> None:
        watchdog.beat("training")
        self.window_steps += 1
        self.window_images += images
        self.metrics.observe_step_seconds(seconds)

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.log_every == 0

    def log(self, record: dict[str, Any], stats: dict[str, torch.Tensor]) -> None:
        """record: the run's position (step, epoch, images_seen, ...); stats: this rank's
        losses and D outputs, averaged over ranks here."""
        values = distributed.mean_over_ranks(torch.stack(list(stats.values())).float(), self.world)
        elapsed = time.monotonic() - self.window_start
        step_s = elapsed / max(self.window_steps, 1)
        record = {
            **record,
            "images_per_s": round(self.window_images / max(elapsed, 1e-9), 1),
            "step_s": round(step_s, 5),
            **{k: round(v, 5) for k, v in zip(stats, values.tolist(), strict=True)},
            **self.row_fields(),
            "time": round(time.time(), 3),
        }
        self.restart_window()
        if not self.world.is_main:
            return
        self.history.append(record)
        self.metrics.observe_record(record)
        eta = min((self.max_steps - record["step"]) * step_s, self.time_left())
        log.info(
            "step %d/%d | %.0f img/s | D %.3f G %.3f | D(x) %.3f D(G(z)) %.3f | epoch %d | ETA %s",
            record["step"],
            self.max_steps,
            record["images_per_s"],
            record["d_loss"],
            record["g_loss"],
            record["d_real"],
            record["d_fake"],
            record["epoch"],
            _duration(eta),
        )

    @property
    def records(self) -> list[dict]:
        return self.history.rows

    def state_dict(self) -> dict:
        return self.history.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.history.load_state_dict(state)
        self.restart_window()

    def start_fresh(self) -> None:
        self.history.start_fresh()

    def sync(self) -> None:
        self.history.sync()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"
