"""Uploads in a background thread (BackgroundWriter), and the writer of ranks that write no
artifacts (NullWriter). Training never waits on storage: during an outage, what waits in memory
is bounded (see BackgroundWriter), and so is how long the job trains on with nothing stored."""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from job.infra import watchdog
from job.infra.errors import DiskFullError, StorageError
from job.infra.store import Store, WritesRefused

log = logging.getLogger(__name__)
SIGNAL_POLL_SECONDS = 0.5  # how soon a wait notices a stop signal that came during it


class StopSignal(Protocol):
    """A stop flag (job/run/budget.py StopFlag): set by a stop signal, with its grace period."""

    @property
    def set(self) -> bool: ...

    def time_left(self) -> float: ...


@dataclass(eq=False)  # queued items are told apart by identity
class _Item:
    """One queued write (key: what it stores) or call (key None)."""

    run: Callable[[], None]
    key: str | None = None
    replace: bool = False
    droppable: bool = False


class BackgroundWriter:
    """Uploads in a background thread: training never waits on storage.

    FIFO with one worker: an item submitted later is stored after every earlier one, so a
    checkpoint's completion marker, submitted last, lands only after its parts. A failed item is
    retried with backoff until it succeeds or close()'s deadline passes; failures counts attempts
    that failed.

    During an outage items wait in memory, within bounds. A snapshot submitted with replace=True
    (metrics.jsonl, report.png) replaces the waiting one of the same key. At most max_pending
    droppable items (sample grids) wait: a newer one drops the oldest, with a warning. Nothing
    else is ever dropped before close()'s deadline: producers of large items (checkpoints) ask
    has_room() first and skip their work when it says no.

    An outage that does not end must not cost the rest of the budget: once no write has been
    stored for give_up_after seconds (GAN_UPLOAD_TIMEOUT_MINUTES) while writes wait, check()
    raises StorageError and flush() and close() wait no longer. After a stop signal (stop), no
    wait of flush() or close() outlasts its grace period, even one that began before it.
    """

    def __init__(
        self,
        store: Store,
        max_pending: int = 8,
        on_failure: Callable[[Exception], None] | None = None,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        give_up_after: float = math.inf,
        stop: StopSignal | None = None,
    ):
        self.store = store
        self.max_pending = max_pending
        self.on_failure = on_failure
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.give_up_after, self.stop = give_up_after, stop
        self.failures = 0
        self.last_error: Exception | None = None
        self.dropped: list[str] = []  # droppable keys given up to make room
        self.not_stored: list[str] = []  # keys still waiting when close() gave up
        self.disk_full: OSError | None = None  # ENOSPC: flush() and close() wait no longer
        self.refused: WritesRefused | None = None  # a read-only folder: neither do they
        self._items: deque[_Item] = deque()
        self._current: _Item | None = None  # the item being stored (or retried)
        self._taken = 0.0  # time.monotonic() when _current was taken: no write stored since
        self._last_stored: float | None = None  # time.monotonic() of the last write stored
        self._cond = threading.Condition()
        self._abandon = threading.Event()  # set by close() after its deadline: stop retrying
        self._closed = False
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Items submitted and not yet stored."""
        with self._cond:
            return len(self._items) + (self._current is not None)

    def has_room(self, items: int) -> bool:
        """Whether items more can wait without exceeding max_pending. Droppable items do not
        count (they make room themselves), nor replaceable ones (at most one per key waits)."""
        with self._cond:
            queued = [*self._items, *([self._current] if self._current else [])]
            kept = sum(1 for i in queued if not (i.droppable or i.replace))
            return kept + items <= self.max_pending

    def submit(
        self,
        key: str,
        data: bytes | None = None,
        path: str | Path | None = None,
        delete_after: bool = False,
        replace: bool = False,
        droppable: bool = False,
    ) -> None:
        """Store data or the file at path under key; returns at once.

        delete_after removes the local file once it is stored (not if it is the stored file).
        replace: a later submit of the same key replaces this one while it waits (snapshots).
        droppable: may be dropped, oldest first, while max_pending droppable items wait.
        """
        if (data is None) == (path is None):
            raise ValueError("submit needs exactly one of data or path")
        if data is not None:
            self._add(_Item(lambda: self.store.put_bytes(key, data), key, replace, droppable))
            return
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(path)

        def put() -> None:
            self.store.put_file(key, path)
            stored = self.store.local_path(key)
            if delete_after and not (stored and stored.exists() and stored.samefile(path)):
                path.unlink(missing_ok=True)

        self._add(_Item(put, key, replace, droppable))

    def submit_call(self, fn: Callable[[], None]) -> None:
        """Run fn in order with the uploads (e.g. retention deletes); retried like a put."""
        self._add(_Item(fn))

    def _add(self, item: _Item) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("BackgroundWriter is closed")
            if item.replace:
                superseded = [i for i in self._items if i.replace and i.key == item.key]
                for old in superseded:
                    self._items.remove(old)
            if item.droppable:
                waiting = [i for i in self._items if i.droppable]
                for old in waiting[: max(0, len(waiting) - self.max_pending + 1)]:
                    self._items.remove(old)
                    self.dropped.append(old.key)
                    log.warning(
                        "storage: %s dropped, not stored: uploads are behind (last error: %s)",
                        old.key,
                        self.last_error,
                    )
            self._items.append(item)
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stopping:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._current = self._items.popleft()
                self._taken = time.monotonic()
            stored = self._run_with_retry(item.run)
            watchdog.beat("storing artifacts")
            with self._cond:
                self._current = None
                if stored:
                    self._last_stored = time.monotonic()
                self._cond.notify_all()

    def _run_with_retry(self, fn: Callable[[], None]) -> bool:
        """fn() until it succeeds (True) or close() abandons it (False)."""
        delay = self.retry_initial
        while not self._abandon.is_set():
            try:
                fn()
                return True
            except Exception as e:
                self.failures += 1
                self.last_error = e
                if isinstance(e, OSError) and e.errno == errno.ENOSPC:
                    with self._cond:
                        self.disk_full = e
                        self._cond.notify_all()
                if isinstance(e, WritesRefused):
                    with self._cond:
                        self.refused = e
                        self._cond.notify_all()
                log.warning(
                    "storage write failed (attempt %d), retrying in %.1fs: %s",
                    self.failures,
                    delay,
                    e,
                )
                if self.on_failure is not None:
                    try:
                        self.on_failure(e)
                    except Exception:
                        log.exception("on_failure callback raised")
            if self._abandon.wait(delay):
                return False
            delay = min(delay * 2, self.retry_max)
        return False

    def check(self) -> None:
        """Raise what ends the run now: a full disk (DiskFullError), a folder that refuses
        writes (WritesRefused), no write stored for give_up_after seconds while writes wait
        (StorageError: training on would store nothing of it)."""
        if self.disk_full is not None:
            raise DiskFullError(f"{self.store.uri}: no space left on its disk ({self.disk_full})")
        if self.refused is not None:
            raise self.refused
        with self._cond:
            stalled = self._stalled_for()
            if stalled is None:
                return
            waiting = self._waiting_keys()
        last = (
            f"{time.monotonic() - self._last_stored:.0f} s ago"
            if self._last_stored is not None
            else "none since the job started"
        )
        error = self.last_error or "none: the store has not answered"
        raise StorageError(
            f"{self.store.uri}: no write stored for {stalled:.0f} s while writes wait "
            f"(GAN_UPLOAD_TIMEOUT_MINUTES={self.give_up_after / 60:g}; the last one stored: "
            f"{last}): stopping rather than training on with nothing stored; not stored: "
            f"{', '.join(waiting) or 'nothing'} (last error: {error}). A retry resumes from "
            "the newest checkpoint stored, once the store takes writes again"
        )

    def _stalled_for(self) -> float | None:
        """Seconds without a write stored while the item being stored waits, once they reach
        give_up_after; None before. Called with self._cond held."""
        if self._current is None:
            return None
        waited = time.monotonic() - self._taken
        return waited if waited >= self.give_up_after else None

    def _waiting_keys(self) -> list[str]:
        """The keys submitted and not stored, oldest first. Called with self._cond held."""
        waiting = [*([self._current] if self._current else []), *self._items]
        return [i.key for i in waiting if i.key is not None]

    def _grace_left(self, seconds: float) -> float:
        """seconds, cut to what is left of the grace period once a stop signal came."""
        if self.stop is None or not self.stop.set:
            return seconds
        return min(seconds, self.stop.time_left())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything submitted is stored; False on timeout, when no write has been
        stored for give_up_after seconds, when a stop signal's grace period ends, or at once
        when the disk is full or the folder refuses writes (waiting would not change that)."""
        deadline = time.monotonic() + (math.inf if timeout is None else timeout)
        with watchdog.waiting("waiting for the uploads", timeout), self._cond:
            while (self._items or self._current) and not (self.disk_full or self.refused):
                stall = self._taken + self.give_up_after if self._current else math.inf
                left = self._grace_left(min(deadline, stall) - time.monotonic())
                if left <= 0:
                    break
                self._cond.wait(min(left, SIGNAL_POLL_SECONDS))
            return not self._items and not self._current

    def close(self, timeout: float | None = None) -> bool:
        """Flush, then stop the thread. Past the deadline, what still waits is given up (listed
        in not_stored, logged): False."""
        with self._cond:
            if self._closed:
                return not self.not_stored and self.pending == 0
            self._closed = True
        ok = self.flush(timeout)
        with self._cond:
            if not ok:
                stalled = self._stalled_for()
                self.not_stored = self._waiting_keys()
                self._items.clear()
                self._abandon.set()
            self._stopping = True
            self._cond.notify_all()
        if not ok:
            why = (
                "the disk is full"
                if self.disk_full
                else "the folder refuses writes"
                if self.refused
                else f"{stalled:.0f} s without a write stored"
                if stalled is not None
                else "the grace period of the stop signal"
                if self._grace_left(math.inf) <= 0
                else f"{timeout} s"
            )
            log.error("storage: giving up after %s: %s", why, self.describe_not_stored())
        # a call stuck past its deadline dies with us
        self._thread.join(None if ok else self._grace_left(1.0))
        return ok

    def describe_not_stored(self) -> str:
        """What close() gave up (a few dozen keys at most), for a one-line message."""
        return f"{', '.join(self.not_stored) or 'nothing'} (last error: {self.last_error})"

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class NullWriter:
    """The writer of ranks other than 0: they write no artifacts."""

    pending = 0
    last_error = None
    disk_full = None
    refused = None
    dropped: list[str] = []
    not_stored: list[str] = []

    def has_room(self, items: int) -> bool:
        return True

    def check(self) -> None:
        pass

    def describe_not_stored(self) -> str:
        return "nothing"

    def submit(self, key: str, data: bytes | None = None, path=None, **options) -> None:
        pass

    def submit_call(self, fn: Callable[[], None]) -> None:
        pass

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def close(self, timeout: float | None = None) -> bool:
        return True
