"""The run's budget: where it stands, when it stops and why, and its learning-rate factor.

GAN_MAX_STEPS and GAN_MAX_MINUTES end a run; SIGTERM/SIGINT/SIGHUP end it early for a retry; a
lost run lock ends it at once. The learning rates follow from the same position: halved once per
rollback after a non-finite loss, times the decay over the budget (job/run/schedule.py).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from dataclasses import asdict, dataclass

from job.infra import distributed
from job.infra.errors import NonFiniteLossError, RunLockedError
from job.infra.launcher import stop_signals
from job.run import schedule

STOP_CHECK_EVERY = 10  # steps between agreements on stopping when distributed
NONFINITE_LR_FACTOR = 0.5


@dataclass
class RunState:
    """The run's position: what the loop advances and a checkpoint restores."""

    step: int = 0
    images_seen: int = 0
    rollbacks: int = 0  # times a non-finite loss rolled the run back (each halves the LRs)
    time_progress: float = (
        0.0  # through GAN_MAX_MINUTES, carried over resumes (job/run/schedule.py)
    )

    def advance(self, images: int) -> None:
        self.step += 1
        self.images_seen += images

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])
        self.rollbacks = int(state["rollbacks"])
        self.time_progress = float(state.get("time_progress", 0.0))  # absent before 0.3


class StopFlag:
    """Set by a stop signal once the loop runs; the loop finishes its step and checkpoints, with
    grace_seconds from the signal on to store that checkpoint before it exits for a retry.
    Later signals change nothing (the first of them is logged): the exit status the job decided
    on stands."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.signal: int | None = None
        self.received: float | None = None  # time.monotonic() of the first signal
        self.repeated = False

    def install(self) -> None:
        for sig in stop_signals():
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal, self.received = signum, time.monotonic()
        elif not self.repeated:
            self.repeated = True
            logging.getLogger(__name__).warning(
                "%s again: ignored, the job is already stopping", signal.Signals(signum).name
            )

    @property
    def set(self) -> bool:
        return self.signal is not None

    def time_left(self) -> float:
        """Seconds of the grace period left (all of it on a rank that was not signalled)."""
        since = time.monotonic() - self.received if self.received is not None else 0.0
        return max(0.0, self.grace_seconds - since)


class Budget:
    """The checkpointer's "run" component: the RunState, the clock of this process's time budget
    and the stop flag. Every rank calls stop_reason(); the ranks agree on it."""

    def __init__(
        self,
        *,
        world: distributed.World,
        lock,
        max_steps: int,
        max_minutes: float,
        lr_decay: str,
        lr_decay_start: float,
        grace_seconds: float,
        nonfinite: str,
        max_rollbacks: int,
    ):
        self.world, self.lock = world, lock  # lock: .lost, .lease, .store.uri (job/run/runlock.py)
        self.max_steps, self.max_minutes = max_steps, max_minutes
        self.lr_decay, self.lr_decay_start = lr_decay, lr_decay_start
        self.nonfinite, self.max_rollbacks = nonfinite, max_rollbacks
        self.state = RunState()
        self.stop = StopFlag(grace_seconds)
        self.started = time.monotonic()
        self.progress_at_start = 0.0

    @property
    def step(self) -> int:
        return self.state.step

    def state_dict(self) -> dict:
        return self.state.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """A preempted run goes on along its schedule; one that ran its whole time budget and
        is started again (make run, twice) gets a new budget: its rates come back and decay
        again, instead of staying at 0."""
        self.state.load_state_dict(state)
        progress = self.state.time_progress
        self.progress_at_start = progress if progress < 1.0 else 0.0

    def start(self) -> None:
        """The clock starts and stop signals are taken over: from now on they checkpoint."""
        self.stop.install()
        self.started = time.monotonic()

    def time_left(self) -> float:
        """Seconds left of GAN_MAX_MINUTES (infinite without a budget)."""
        if not self.max_minutes:
            return math.inf
        return self.max_minutes * 60 - (time.monotonic() - self.started)

    def lr_factor(self) -> float:
        """Halved once per rollback, times the decay at the run's progress through its budget."""
        st = self.state
        at = schedule.progress(st.step, self.max_steps, st.time_progress)
        decay = schedule.lr_factor(self.lr_decay, self.lr_decay_start, at)
        return NONFINITE_LR_FACTOR**st.rollbacks * decay

    def stop_reason(self) -> str | None:
        """max_steps, signal, max_minutes or None; RunLockedError when another job took the
        run's lock. Distributed, agreed every STOP_CHECK_EVERY steps (a collective)."""
        if self.state.step >= self.max_steps:
            return "max_steps"
        if self.world.distributed and self.state.step % STOP_CHECK_EVERY:
            return None
        signalled, lost, elapsed = distributed.max_over_ranks(
            [self.stop.set, self.lock.lost, time.monotonic() - self.started], self.world
        )
        # one time progress on all ranks: their learning rates must agree
        self.state.time_progress = schedule.time_progress(
            self.progress_at_start, elapsed, self.max_minutes
        )
        if lost:
            raise RunLockedError(
                f"{self.lock.store.uri}: another job took over this run's lock (this job could "
                f"not renew it for GAN_RUN_LEASE_SECONDS={self.lock.lease:g}): stopping"
            )
        if signalled:
            return "signal"
        over_time = bool(self.max_minutes) and elapsed > self.max_minutes * 60
        return "max_minutes" if over_time else None

    def check_rollback(self) -> str:
        """After a non-finite loss: what happened, if a rollback is allowed; else
        NonFiniteLossError (GAN_NONFINITE=fail, or the rollbacks are used up)."""
        st = self.state
        what = f"non-finite loss by step {st.step}"
        if self.nonfinite == "fail" or st.rollbacks >= self.max_rollbacks:
            raise NonFiniteLossError(
                f"{what} (after {st.rollbacks} rollbacks; GAN_NONFINITE={self.nonfinite}): "
                f"lower GAN_LR_G / GAN_LR_D"
            )
        return what

    def rolled_back(self, rollbacks_before: int) -> None:
        """The state is the checkpoint's now: count this rollback on top of the earlier ones."""
        self.state.rollbacks = rollbacks_before + 1
