"""TensorBoardLog: the run's scalars and sample grids as TensorBoard event files under
tensorboard/ in the artifact store (GAN_TENSORBOARD), beside metrics.jsonl and eval.jsonl."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable

from PIL import Image

from job.infra.errors import SettingsError
from job.infra.store import Store
from job.infra.writer import BackgroundWriter, NullWriter

PREFIX = "tensorboard/"
FLUSH_SECONDS = 30.0  # scalars wait at most this long (and the next record) for their chunk
# what a chunk's first event is, in the order the run writes them at one step: the step's
# record, its grid, its evaluation. Names sort in the order written: TensorBoard reads a
# folder's event files in name order, and a live one reads only forward.
KINDS = ("log", "samples", "scores")
_CHUNK = re.compile(r"^tensorboard/events\.out\.tfevents\.(\d{10,})\.(log|samples|scores)$")
_COLORSPACE = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
MISSING = (
    "GAN_TENSORBOARD=true needs the tensorboard package, which is not installed: "
    "pip install 'gan-job[tensorboard]' (or GAN_TENSORBOARD=false)"
)


def chunk_key(step: int, kind: str) -> str:
    return f"{PREFIX}events.out.tfevents.{step:010d}.{kind}"


def chunk_step(key: str) -> int | None:
    """The first step of a chunk's key; None for any other object."""
    m = _CHUNK.match(key)
    return int(m.group(1)) if m else None


class TensorBoardLog:
    """TensorBoard's view of the run at its steps: train/* scalars (metrics.jsonl's records),
    eval/* scalars (eval.jsonl's rows), images (the sample grids: samples/grid, and in a
    conditional run a column per class: samples_per_class/class_3).

    An S3 object cannot be appended to, so the events go out in chunks, each its own immutable
    event file (TensorBoard merges a folder's files): the scalars buffered since the last chunk
    when a grid or an evaluation comes, at every checkpoint (sync) and FLUSH_SECONDS after the
    previous chunk; every grid in a chunk of its own. Each is queued to the background writer
    as droppable, like the grid PNGs: training never waits on them, and during an outage they
    are the first given up.

    A chunk is named by its first event's step and kind, and chunks end at every checkpoint:
    a resume (or a rollback) deletes the chunks that begin past the step it restores (`step()`,
    the run's step, restored first), so the timeline goes on with no step twice or backwards.
    Only rank 0 calls the writing methods; other ranks hold a NullWriter.
    """

    def __init__(
        self,
        store: Store,
        writer: BackgroundWriter | NullWriter,
        step: Callable[[], int],
        clock: Callable[[], float] = time.monotonic,
    ):
        try:
            from tensorboard.compat.proto import event_pb2, summary_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError as e:
            raise SettingsError([f"{MISSING} ({e})"]) from None
        self._event, self._summary, self._records = (
            event_pb2.Event,
            summary_pb2.Summary,
            RecordWriter,
        )
        self.store, self.writer, self.step, self.clock = store, writer, step, clock
        self._pending: list = []  # scalar events not yet in a chunk
        self._first: tuple[int, str] | None = None  # the pending chunk's first step and kind
        self._flushed = clock()

    def train(self, record: dict) -> None:
        """A record of metrics.jsonl: its numbers as train/* scalars."""
        self._add_scalars("train", record, "log", record.get("time"))
        if self.clock() - self._flushed >= FLUSH_SECONDS:
            self.flush()

    def evaluation(self, row: dict) -> None:
        """A row of eval.jsonl: its numbers as eval/* scalars, out at once."""
        self._add_scalars("eval", row, "scores", None)
        self.flush()

    def images(self, step: int, pngs: dict[str, bytes]) -> None:
        """PNGs by tag (samples/grid, samples_per_class/class_3...) at step, in a chunk of their own."""
        self.flush()
        values = [self._image(tag, png) for tag, png in pngs.items()]
        event = self._event(wall_time=time.time(), step=step, summary=self._summary(value=values))
        self._submit(chunk_key(step, "samples"), [event])

    def flush(self) -> None:
        """The buffered scalars as a chunk."""
        if self._first is not None:
            self._submit(chunk_key(*self._first), self._pending)
        self._pending, self._first, self._flushed = [], None, self.clock()

    def sync(self) -> None:
        """Before a checkpoint: everything up to its step in chunks (the checkpointer calls it)."""
        self.flush()

    def state_dict(self) -> dict:
        return {"step": self.step()}

    def load_state_dict(self, state: dict) -> None:
        self._forget_after(int(state["step"]))

    def start_fresh(self) -> None:
        """A fresh start forgets every chunk; a checkpoint older than GAN_TENSORBOARD forgets
        those past its step."""
        self._forget_after(self.step())

    def _forget_after(self, step: int) -> None:
        self._pending, self._first, self._flushed = [], None, self.clock()

        def delete() -> None:
            for key in self.store.list(PREFIX):
                if (first := chunk_step(key)) is not None and first > step:
                    self.store.delete(key)

        self.writer.submit_call(delete)

    def _add_scalars(self, section: str, row: dict, kind: str, wall_time: float | None) -> None:
        step = int(row["step"])
        values = [
            self._summary.Value(tag=f"{section}/{name}", simple_value=float(value))
            for name, value in row.items()
            if name not in ("step", "time")
            and isinstance(value, int | float)
            and not isinstance(value, bool)
        ]
        summary = self._summary(value=values)
        self._pending.append(
            self._event(wall_time=wall_time or time.time(), step=step, summary=summary)
        )
        if self._first is None:
            self._first = (step, kind)

    def _image(self, tag: str, png: bytes):
        with Image.open(io.BytesIO(png)) as img:
            width, height, mode = img.width, img.height, img.mode
        image = self._summary.Image(
            height=height,
            width=width,
            colorspace=_COLORSPACE.get(mode, 3),
            encoded_image_string=png,
        )
        return self._summary.Value(tag=tag, image=image)

    def _submit(self, key: str, events: list) -> None:
        buf = io.BytesIO()
        records = self._records(buf)
        records.write(
            self._event(wall_time=time.time(), file_version="brain.Event:2").SerializeToString()
        )
        for event in events:
            records.write(event.SerializeToString())
        self.writer.submit(key, data=buf.getvalue(), droppable=True)
