"""JsonlLog: a JSON-lines history (metrics.jsonl, eval.jsonl) kept in memory and stored as the
artifact of the same name."""

from __future__ import annotations

import errno
import json
import logging
from collections.abc import Callable

from job.infra.errors import DiskFullError
from job.infra.local_store import atomic_write
from job.infra.store import REFUSED_ERRNOS, Store, refused
from job.infra.writer import BackgroundWriter, NullWriter

log = logging.getLogger(__name__)


class JsonlLog:
    """A JSON-lines history (metrics.jsonl, eval.jsonl): its rows, kept for the report and the
    schedule, and the artifact of the same name.

    In a local store each row is appended to the file as it comes. An S3 object cannot be
    appended to, so there the whole file is uploaded at sync(), which the checkpointer calls
    with every checkpoint (before the checkpoint's parts) and the run calls at its end. A
    checkpoint holds only the number of rows: the artifact, stored before it, holds the rows.
    on_append(row): called with each new row (TensorBoardLog's view of the history).
    """

    def __init__(
        self,
        key: str,
        writer: BackgroundWriter | NullWriter,
        store: Store,
        on_append: Callable[[dict], None] | None = None,
    ):
        self.key, self.writer, self.store, self.rows = key, writer, store, []
        self.path = store.local_path(key) if isinstance(writer, BackgroundWriter) else None
        self.on_append = on_append

    def append(self, row: dict) -> None:
        self.rows.append(row)
        if self.on_append is not None:
            self.on_append(row)
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise DiskFullError(f"{self.path}: {e}") from e
                if e.errno in REFUSED_ERRNOS:
                    raise refused(self.store.uri, self.key, e) from e
                raise

    def _text(self) -> bytes:
        return "".join(json.dumps(r) + "\n" for r in self.rows).encode()

    def sync(self) -> None:
        if self.path is None and self.rows:
            self.writer.submit(self.key, data=self._text(), replace=True)

    def state_dict(self) -> dict:
        return {"count": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        """The first `count` rows (those logged before the checkpoint), from memory after a
        rollback or from the artifact after a restart; a checkpoint of gan-job 0.3 and before
        holds the rows themselves. The artifact loses rows logged after the checkpoint."""
        if "rows" in state:
            self.rows = list(state["rows"])
        else:
            count = int(state["count"])
            rows = self.rows if len(self.rows) >= count else self._stored_rows()
            if len(rows) < count:
                log.warning(
                    "%s/%s holds %d of the %d rows the checkpoint counts: the history "
                    "(report.png) goes on from those",
                    self.store.uri,
                    self.key,
                    len(rows),
                    count,
                )
            self.rows = rows[:count]
        if isinstance(self.writer, BackgroundWriter):
            self._rewrite()

    def start_fresh(self) -> None:
        self.rows = []
        if isinstance(self.writer, BackgroundWriter):
            self._rewrite()

    def _rewrite(self) -> None:
        """The artifact as the rows are now (nothing to do for an empty history not stored)."""
        if self.path is None:
            self.sync()
        elif self.rows or self.path.exists():
            text = self._text()
            atomic_write(self.path, lambda tmp: tmp.write_bytes(text))

    def _stored_rows(self) -> list[dict]:
        """The artifact's rows, up to the first that does not parse (an append cut short)."""
        try:
            text = self.store.get_bytes(self.key).decode(errors="replace")
        except FileNotFoundError:
            return []
        rows = []
        for line in text.splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
        return rows
