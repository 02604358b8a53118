"""Training-state checkpoints: written part by part, made complete by a marker written last.

Layout under the run: checkpoints/step-00001000/state.pt and checkpoints/step-00001000/COMPLETE.json.
The marker records every part's size and SHA-256; a checkpoint without it, or whose parts do not
match it, is never taken as complete. Retention deletes the marker first, so a half-deleted
checkpoint is not complete either.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections.abc import Callable

import torch

from job.errors import CheckpointError
from job.storage import BackgroundWriter, Store, open_store

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
MARKER = "COMPLETE.json"
STATE = "state.pt"
_STEP_DIR = re.compile(r"^checkpoints/step-(\d{8,})/" + re.escape(MARKER) + "$")


def step_dir(step: int) -> str:
    return f"{PREFIX}step-{step:08d}/"


def serialize(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def marker_for(step: int, parts: dict[str, bytes]) -> bytes:
    record = {
        "step": step,
        "created": time.time(),
        "parts": {
            name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            for name, data in parts.items()
        },
    }
    return json.dumps(record, indent=1).encode()


def save(
    writer: BackgroundWriter,
    step: int,
    state: dict,
    keep: int,
    on_stored: Callable[[int], None] | None = None,
) -> None:
    """Queue a checkpoint's parts, then its marker, then retention; returns without waiting.

    on_stored(step) runs in the writer's thread once the marker is stored: the checkpoint is
    complete from then on.
    """
    parts = {STATE: serialize(state)}
    base = step_dir(step)
    for name, data in parts.items():
        writer.submit(base + name, data=data)
    writer.submit(base + MARKER, data=marker_for(step, parts))
    if on_stored is not None:
        writer.submit_call(lambda: on_stored(step))
    writer.submit_call(lambda: prune(writer.store, keep))


def complete_steps(store: Store) -> list[int]:
    """Steps of the checkpoints whose marker exists, oldest first."""
    steps = []
    for key in store.list(PREFIX):
        if m := _STEP_DIR.match(key):
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune(store: Store, keep: int) -> None:
    steps = complete_steps(store)
    for step in steps[:-keep] if keep else []:
        base = step_dir(step)
        store.delete(base + MARKER)
        for key in store.list(base):
            store.delete(key)


def load_verified(store: Store, step: int) -> dict:
    """The state of one checkpoint, after checking every part against its marker."""
    base = step_dir(step)
    try:
        marker = json.loads(store.get_bytes(base + MARKER))
        parts = {}
        for name, meta in marker["parts"].items():
            data = store.get_bytes(base + name)
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{store.uri}/{base}{name}: checksum mismatch")
            parts[name] = data
        return torch.load(io.BytesIO(parts[STATE]), map_location="cpu", weights_only=False)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - missing part, bad JSON, unpickling error
        raise CheckpointError(f"{store.uri}/{base}: unreadable ({exc})") from exc


def load_latest(store: Store) -> tuple[int, dict] | None:
    """The newest checkpoint that is complete and intact; damaged ones are skipped with a warning."""
    for step in reversed(complete_steps(store)):
        try:
            return step, load_verified(store, step)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def load_from(uri: str, endpoint_url: str | None = None, run_id: str | None = None):
    """(step, state) from a checkpoint folder, a run folder (its newest), or their parent."""
    uri = uri.rstrip("/")
    if m := re.search(r"/checkpoints/step-(\d{8,})$", uri):
        run = open_store(uri[: m.start()], endpoint_url)
        return int(m.group(1)), load_verified(run, int(m.group(1)))
    store = open_store(uri, endpoint_url)
    found = load_latest(store)
    if found is None and run_id:
        found = load_latest(store.child(run_id))
    return found
