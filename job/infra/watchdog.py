"""The progress watchdog: a rank that makes no progress for GAN_STALL_TIMEOUT_SECONDS ends itself.

A collective whose peer is silent (a node that lost its network or its power) can wait for the
process group's timeout, or for ever where a transport ignores it; a hung data loader or store
call has no timeout at all. Components call beat(phase) when they make progress (a pass of a
training step through D or G, an FID batch, a checkpoint part stored, the process group joined),
the phase naming what comes next; `with waiting(phase, seconds):` holds a wait that has its own
bound (the uploads at exit, a killed job's run lock; None: loading the data, bounded by its
store's timeouts), and the deadline is that much later meanwhile. A daemon thread checks the
deadline: past it, it logs the phase and since when, dumps every thread's stack, records exit 10
for gan-job's launcher and ends the process with 10 (retryable: the restarted group resumes from
the newest complete checkpoint). The run lock's heartbeat asks stalled() and stops renewing.
Before start() and after stop(), beat() and waiting() do nothing.

This module imports no torch.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from job.infra import launcher
from job.infra.errors import EXIT_STOPPED_UNSAVED

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(
        self,
        timeout: float,
        on_stall: Callable[[Watchdog], None],
        clock: Callable[[], float] = time.monotonic,
    ):
        self.timeout, self.on_stall, self.clock = timeout, on_stall, clock
        self.phase, self.since = "starting", clock()
        self._deadline = self.since + timeout
        self._waits: list[float] = []  # the deadlines of the waits in progress
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, phase: str) -> None:
        """Progress in phase: the next is due within the timeout (or a wait's own bound). The
        phase named is the main thread's: another thread's beat (the background writer's) moves
        the deadline only, so that a stall names where the training loop waits."""
        now = self.clock()
        with self._lock:
            if phase != self.phase and threading.current_thread() is threading.main_thread():
                self.phase, self.since = phase, now
            self._deadline = max([now + self.timeout, *self._waits])

    @contextmanager
    def waiting(self, phase: str, seconds: float | None) -> Iterator[None]:
        """A wait bounded by its own seconds (None: by something else): no stall before then."""
        until = self.clock() + (math.inf if seconds is None else seconds + self.timeout)
        with self._lock:
            self._waits.append(until)
        self.beat(phase)
        try:
            yield
        finally:
            with self._lock:
                self._waits.remove(until)
            self.beat(f"{phase}: done")

    def overdue(self) -> float:
        """Seconds past the deadline; 0 or less while within it."""
        with self._lock:
            return self.clock() - self._deadline

    def stalled(self) -> bool:
        return self.overdue() > 0

    def describe(self) -> str:
        with self._lock:
            phase, since = self.phase, self.since
        silent = self.clock() - since
        started = time.strftime("%H:%M:%S", time.localtime(time.time() - silent))
        return (
            f"no progress for {self.timeout:g} s (GAN_STALL_TIMEOUT_SECONDS): in '{phase}' "
            f"since {started} ({silent:.0f} s ago), waiting for its next progress"
        )

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            if self.stalled():
                self.on_stall(self)
                return


def exit_stalled(dog: Watchdog) -> None:
    """Log what the rank waited for and every thread's stack, record 10 and end the process."""
    log.error(
        "stalled: %s; exit 10, a retry resumes from the last complete checkpoint", dog.describe()
    )
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    try:
        launcher.record_status(EXIT_STOPPED_UNSAVED)
    finally:
        logging.shutdown()
        sys.stderr.flush()
        os._exit(EXIT_STOPPED_UNSAVED)


_current: Watchdog | None = None


def start(timeout: float, on_stall: Callable[[Watchdog], None] = exit_stalled) -> Watchdog:
    """Arm this process's watchdog (replacing one already armed)."""
    global _current
    stop()
    _current = Watchdog(timeout, on_stall)
    _current.start()
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
    _current = None


def beat(phase: str) -> None:
    if _current is not None:
        _current.beat(phase)


def waiting(phase: str, seconds: float | None) -> AbstractContextManager[None]:
    return nullcontext() if _current is None else _current.waiting(phase, seconds)


def stalled() -> bool:
    """Whether this process's watchdog found no progress within its timeout."""
    return _current is not None and _current.stalled()
