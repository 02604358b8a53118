"""One live job per run id: a lease in the run's store, renewed by a heartbeat.

Two jobs writing one run id would interleave their checkpoints and histories. The first job
writes `lock.json` (its owner id, a renewal counter and its lease) and renews it every quarter
lease; a second job that finds the lock watches it for up to one lease, the longer of its own and
the holder's: if it is renewed, its holder is alive and the second job stops (exit 11); if not,
the holder died without releasing it (SIGKILL, a lost node) and the lock is taken over. That
wait is bounded by the lease: the watchdog counts it as a declared wait, not a stall, on every
rank (see take()). Stores have no compare-and-swap that S3 and a folder share, so a job that
writes the lock reads it back after a moment: of two jobs that wrote at once, only the last
writer goes on. A job whose lock was taken over (its store unreachable for longer than a lease)
sees a foreign owner at its next renewal and stops.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from job.infra import distributed, watchdog
from job.infra.errors import JobError, RunLockedError, StorageError
from job.infra.store import Store

log = logging.getLogger(__name__)
LOCK_KEY = "lock.json"
RELEASE_SECONDS = 5.0
# rank 0's news for ranks 1+ on the rendezvous store: "<seconds> <holder>" while it waits, "done"
_NEWS, _DONE = "gan-job/run-lock", "done"
POLL_SECONDS = 0.2


class RunLock:
    def __init__(self, store: Store, lease_seconds: float, settle_seconds: float = 1.0):
        self.store, self.lease, self.settle = store, lease_seconds, settle_seconds
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.renewals = 0
        self.lost = False  # set by the heartbeat when another job took the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, on_wait: Callable[[str, float], None] = lambda owner, seconds: None) -> None:
        """Take the lock, waiting up to one lease for a silent holder (told first to on_wait:
        the holder and the seconds); RunLockedError if a live job holds it. Interrupted once it
        wrote the lock (a signal, a failure), it removes the lock if still ours, within
        RELEASE_SECONDS, and re-raises."""
        held = self._read()
        if held is not None and held["owner"] != self.owner:
            self._wait_for_silence(held, on_wait)
        try:
            self._write()
            time.sleep(self.settle)
            held = self._read()
            if held is None or held["owner"] != self.owner:
                raise RunLockedError(self._message(held, "took it at the same moment"))
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock", daemon=True)
            self._thread.start()
        except BaseException:
            self._unlock(RELEASE_SECONDS)
            raise

    def release(self, timeout: float = RELEASE_SECONDS) -> None:
        """Stop renewing and remove the lock if it is still ours, waiting at most timeout
        seconds on the store (a job that is stopping must not hang on a store that does)."""
        if self._thread is None:
            return
        self._unlock(timeout)

    def _unlock(self, timeout: float) -> None:
        self._stop.set()
        heartbeat, self._thread = self._thread, None
        remover = threading.Thread(
            target=self._remove, args=(heartbeat,), name="run-unlock", daemon=True
        )
        remover.start()
        remover.join(timeout)
        if remover.is_alive():
            log.warning(
                "could not remove the run lock in %g s: the next job waits one lease", timeout
            )

    def _remove(self, heartbeat: threading.Thread | None) -> None:
        if heartbeat is not None:
            heartbeat.join()  # a renewal in flight must not land after the removal
        try:
            held = self._read()
            if held is not None and held["owner"] == self.owner:
                self.store.delete(LOCK_KEY)
        except StorageError as exc:
            log.warning("could not remove the run lock (%s): the next job waits one lease", exc)

    def _wait_for_silence(self, held: dict, on_wait: Callable[[str, float], None]) -> None:
        theirs = _lease_of(held)
        wait = max(self.lease, theirs or 0.0)
        if theirs is None:
            why = "this job's GAN_RUN_LEASE_SECONDS: the lock does not record its holder's lease"
        elif theirs > self.lease:
            why = f"the holder's GAN_RUN_LEASE_SECONDS, longer than this job's {self.lease:g} s"
        else:
            why = f"this job's GAN_RUN_LEASE_SECONDS, not shorter than the holder's {theirs:g} s"
        log.info(
            "run lock held by %s: waiting up to %g s (%s) to see whether it is alive",
            held["owner"], wait, why,
        )  # fmt: skip
        on_wait(held["owner"], wait)
        deadline = time.monotonic() + wait
        with watchdog.waiting(f"waiting for the run lock of {held['owner']} to lapse", wait):
            while time.monotonic() < deadline:
                time.sleep(max(0.0, min(wait / 8, deadline - time.monotonic(), 2.0)))
                now = self._read()
                if now is None:
                    return  # released
                if now != held:
                    raise RunLockedError(self._message(now, "is alive (it renews its lock)", wait))
        log.warning("run lock of %s not renewed for %g s: taking it over", held["owner"], wait)

    def _heartbeat(self) -> None:
        failing = False
        while not self._stop.wait(self.lease / 4):
            if watchdog.stalled():
                log.error(
                    "no progress (GAN_STALL_TIMEOUT_SECONDS): the run lock is no longer renewed"
                )
                return
            try:
                held = self._read()
                if held is not None and held["owner"] != self.owner:
                    log.error("another job (%s) took over this run's lock", held["owner"])
                    self.lost = True
                    return
                self._write()
                failing = False
            except StorageError as exc:
                if not failing:
                    log.warning("cannot renew the run lock: %s", exc)
                failing = True

    def _read(self) -> dict | None:
        if not self.store.exists(LOCK_KEY):
            return None
        try:
            return json.loads(self.store.get_bytes(LOCK_KEY))
        except (StorageError, ValueError):
            return None  # deleted between exists and get, or half-written by a dying job

    def _write(self) -> None:
        self.renewals += 1
        lock = {"owner": self.owner, "renewals": self.renewals, "lease_seconds": self.lease}
        self.store.put_bytes(LOCK_KEY, json.dumps(lock).encode())

    def _message(self, held: dict | None, what: str, lease: float | None = None) -> str:
        holder = held["owner"] if held else "another job"
        return (
            f"{self.store.uri}: {holder} {what}: another job is running with this GAN_RUN_ID. "
            f"Use another GAN_RUN_ID, or stop that job (a killed job's lock lapses after "
            f"GAN_RUN_LEASE_SECONDS={self.lease if lease is None else lease:g})"
        )


def _lease_of(held: dict) -> float | None:
    """The holder's lease as its lock records it; None when absent or not a usable number."""
    lease = held.get("lease_seconds")
    if isinstance(lease, bool) or not isinstance(lease, (int, float)):
        return None
    return float(lease) if math.isfinite(lease) and lease > 0 else None


def take(store: Store, lock: RunLock, world: distributed.World) -> None:
    """Rank 0 checks the store and takes the run lock before any work; all ranks agree.

    Ranks 1+ wait for rank 0 on the rendezvous store, not in a collective: rank 0 may wait up
    to a lease for a killed job's lock (the holder's lease, which can be a day), longer than the
    stall timeout, which is also the process group's. Rank 0 posts how long it waits, and they
    declare that same wait to their watchdog: as long as rank 0's and no longer, so that a rank 0
    gone silent still ends them, with the wait named."""
    refused: Exception | None = None
    if world.is_main:
        try:
            store.check()
            lock.acquire(lambda holder, s: distributed.post(_NEWS, f"{s:g} {holder}", world))
        except JobError as exc:
            refused = exc
        distributed.post(_NEWS, _DONE, world)
    else:
        _follow_rank_0(world)
    (failed,) = distributed.any_rank_each([refused is not None], world)
    if refused is not None:
        raise refused
    if failed:
        raise RunLockedError("rank 0 could not check the store or take the run lock")


def _follow_rank_0(world: distributed.World) -> None:
    watchdog.beat("waiting for rank 0 to check the store and read the run lock")
    news = _poll(world, lambda news: True)
    if news == _DONE:
        return
    seconds, holder = news.split(" ", 1)
    log.info("waiting up to %s s for rank 0, which waits for the run lock of %s", seconds, holder)
    phase = f"waiting for rank 0, which waits up to {seconds} s for the run lock of {holder}"
    with watchdog.waiting(phase, float(seconds)):
        _poll(world, lambda news: news == _DONE)


def _poll(world: distributed.World, wanted: Callable[[str], bool]) -> str:
    while (news := distributed.posted(_NEWS, world)) is None or not wanted(news):
        time.sleep(POLL_SECONDS)
    return news
