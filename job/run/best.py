"""The run's best generator, and whether training is done.

GANs degrade late: the last EMA generator is often not the best one. At every evaluation the
score is compared with the best so far: KID where the evaluation has it, FID otherwise. KID is
unbiased at any sample count and its run-to-run noise at the default 500 samples is well below
the differences between evaluations that decide the best; FID's bias shrinks with the sample
count, so it only ranks fairly evaluations of one count (docs/metrics.md has the measurements).
A better score writes best/generator.pt; GAN_EARLY_STOP_PATIENCE evaluations without an
improvement of at least GAN_EARLY_STOP_MIN_DELTA end the run (plateau), and so does reaching
GAN_TARGET_FID or GAN_TARGET_KID (target). A score that is not finite (NaN: a degenerate
covariance, features that overflowed) is logged and never compared: it is no best, no step
toward a plateau and no target.
"""

from __future__ import annotations

import copy
import logging
import math

from torch import nn

from job.infra import distributed
from job.infra.metrics import Metrics
from job.run.artifacts import RunArtifacts

log = logging.getLogger(__name__)


class BestGenerator:
    """The checkpoint's "best" component: the best score, its step and the EMA generator's
    weights then (so that a resumed run keeps its best even where best/generator.pt was written
    by steps the resumed run goes back over). Rank 0 judges; every rank gets its decision."""

    def __init__(
        self,
        *,
        world: distributed.World,
        artifacts: RunArtifacts,
        metrics: Metrics,
        patience: int,
        min_delta: float,
        target_fid: float | None,
        target_kid: float | None,
    ):
        self.world, self.artifacts, self.metrics = world, artifacts, metrics
        self.patience, self.min_delta = patience, min_delta
        self.targets = {"fid": target_fid, "kid": target_kid}
        self.start_fresh()

    def start_fresh(self) -> None:
        self.score: str | None = None  # "kid" or "fid"
        self.value, self.step, self.since = math.inf, None, 0
        self.weights: dict | None = None
        self.scores: dict = {}  # the best evaluation's row
        self.reason: str | None = None  # set by judge(), taken by stop_reason()

    def judge(self, step: int, values: dict, g_ema: nn.Module) -> dict:
        """After an evaluation at step, on rank 0: keeps the generator if it is the best so far.
        Returns the fields its eval.jsonl row gains: which step is best, and its score ({} on
        the other ranks)."""
        if not self.world.is_main:
            return {}
        self.score = self.score or ("kid" if "kid" in values else "fid")
        value = values.get(self.score, math.nan)
        if not math.isfinite(value):
            log.warning(
                "%s %s at step %d: not compared (neither the best nor a step toward a plateau)",
                self.score.upper(),
                value,
                step,
            )
        elif self.step is None or value < self.value - self.min_delta:
            self.value, self.step, self.since = value, step, 0
            self.weights, self.scores = copy.deepcopy(g_ema.state_dict()), dict(values)
            self.artifacts.export_weights(self.weights, step, which="best", scores=self.scores)
        else:
            self.since += 1
        self.reason = self._reason(values)
        if self.step is None:  # no finite score yet
            return {}
        self.metrics.observe_best(self.step, self.value, self.score)
        return {"best_step": self.step, "best_score": self.score, "best_value": self.value}

    def _reason(self, values: dict) -> str | None:
        reached = [
            f"{name.upper()} {values[name]:g} <= GAN_TARGET_{name.upper()}={target:g}"
            for name, target in self.targets.items()
            if target is not None
            and math.isfinite(values.get(name, math.nan))
            and values[name] <= target
        ]
        if reached:
            log.info("target reached: %s", "; ".join(reached))
            return "target"
        if self.patience and self.since >= self.patience:
            log.info(
                "no improvement of the best %s (%g at step %d) for %d evaluations "
                "(GAN_EARLY_STOP_PATIENCE, GAN_EARLY_STOP_MIN_DELTA=%g)",
                self.score,
                self.value,
                self.step,
                self.since,
                self.min_delta,
            )
            return "plateau"
        return None

    def stop_reason(self) -> str | None:
        """plateau, target or None, agreed by all ranks (a collective after every evaluation)."""
        reason, self.reason = self.reason, None
        return distributed.broadcast_object(reason, self.world)

    def state_dict(self) -> dict:
        return {
            "score": self.score,
            "value": self.value,
            "step": self.step,
            "since": self.since,
            "g_ema": self.weights,
            "scores": self.scores,
        }

    def load_state_dict(self, state: dict) -> None:
        """The checkpoint's best, written again as best/generator.pt (rank 0)."""
        self.score, self.value, self.step = state["score"], state["value"], state["step"]
        self.since, self.weights, self.scores = state["since"], state["g_ema"], state["scores"]
        if self.weights is not None:
            self.artifacts.export_weights(self.weights, self.step, which="best", scores=self.scores)
