"""Training-state checkpoints: written part by part, made complete by a marker written last.

Layout under the run: checkpoints/step-00001000/state.pt and checkpoints/step-00001000/COMPLETE.json.
The marker records every part's size and SHA-256; a checkpoint without it, or whose parts do not
match it, is never taken as complete. Retention deletes the marker first, so a half-deleted
checkpoint is not complete either.

state.pt holds {"format": 2, "meta": {...}, <component name>: <its state_dict()>, ...}: the
Checkpointer is built from the run's components and owns when they are saved and restored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
import re
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch

from job.gan.models import arch_changes
from job.infra import distributed, watchdog
from job.infra.errors import CheckpointError, SettingsError, StorageError
from job.infra.metrics import Metrics
from job.infra.store import Store
from job.infra.stores import open_store
from job.infra.writer import BackgroundWriter, NullWriter
from job.run.resume import Past, past_of, resume_choice

log = logging.getLogger(__name__)

PREFIX = "checkpoints/"
MARKER = "COMPLETE.json"
STATE = "state.pt"
FORMAT = 2
QUEUED_ITEMS = 4  # what save() queues: state.pt, the marker, on_stored, retention
READ_SECONDS = 60.0  # how long a checkpoint that cannot be read is retried by default
TIMEOUT_SETTINGS = "GAN_UPLOAD_TIMEOUT_MINUTES, at most half GAN_STALL_TIMEOUT_SECONDS"
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
    writer: BackgroundWriter | NullWriter,
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
    writer.submit_call(lambda: prune(writer.store, keep, newest=step))


def complete_steps(store: Store) -> list[int]:
    """Steps of the checkpoints whose marker exists, oldest first."""
    steps = []
    for key in store.list(PREFIX):
        if m := _STEP_DIR.match(key):
            steps.append(int(m.group(1)))
    return sorted(steps)


def prune(store: Store, keep: int, newest: int | None = None) -> None:
    """Delete all but `keep` checkpoints: `newest`, the one just stored (this run's newest even
    where older ones have higher steps), and the highest steps besides it."""
    steps = [step for step in complete_steps(store) if step != newest]
    kept = keep - 1 if newest is not None else keep
    for step in steps[: max(len(steps) - kept, 0)]:
        base = step_dir(step)
        store.delete(base + MARKER)
        for key in store.list(base):
            store.delete(key)


def load_verified(store: Store, step: int, timeout: float = READ_SECONDS) -> dict:
    """The state of one checkpoint, after checking every part against its marker.

    Parts that cannot be read (the store fails or is slow) are retried for timeout seconds in
    all, then StorageError: the checkpoint may be intact, so it is never skipped for that. A part
    that is missing, fails its checksum or does not unpickle is damage: CheckpointError."""
    base, deadline = step_dir(step), time.monotonic() + timeout
    read = lambda key: _read_retrying(store, base + key, deadline, timeout)  # noqa: E731
    with watchdog.waiting(f"reading the checkpoint of step {step}", timeout):
        return _verified(store, base, read)


def _verified(store: Store, base: str, read: Callable[[str], bytes]) -> dict:
    try:
        marker = json.loads(read(MARKER))
        parts = {}
        for name, meta in marker["parts"].items():
            data = read(name)
            if len(data) != meta["size"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
                raise CheckpointError(f"{store.uri}/{base}{name}: checksum mismatch")
            parts[name] = data
        return upgrade(load_pt(parts[STATE], f"{store.uri}/{base}{STATE}", "gan-job checkpoint"))
    except (CheckpointError, StorageError):
        raise
    except Exception as exc:  # noqa: BLE001 - missing part, bad JSON, unpickling error
        raise CheckpointError(f"{store.uri}/{base}: unreadable ({exc})") from exc


def _read_retrying(store: Store, key: str, deadline: float, timeout: float) -> bytes:
    """store.get_bytes(key), retried with backoff while the store fails, until deadline (timeout
    seconds after the first read of the checkpoint)."""
    delay = 0.5
    while True:
        try:
            return store.get_bytes(key)
        except FileNotFoundError:
            raise
        except (StorageError, OSError) as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StorageError(
                    f"{store.uri}/{key}: could not be read for {timeout:g} s "
                    f"({TIMEOUT_SETTINGS}): {exc}. The checkpoint may be intact, so the "
                    "run does not start over: a retry reads it again"
                ) from exc
            log.warning("cannot read %s/%s, retrying in %.1f s: %s", store.uri, key, delay, exc)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 30.0)


def load_latest(store: Store, timeout: float = READ_SECONDS) -> tuple[int, dict] | None:
    """The newest checkpoint that is complete and intact; damaged ones are skipped with a
    warning, one that cannot be read fails (StorageError)."""
    for step in reversed(complete_steps(store)):
        try:
            return step, load_verified(store, step, timeout)
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def refuse_file(uri: str) -> None:
    """CheckpointError for a .pt file where a checkpoint is expected: a generator export
    (final/ or best/generator.pt) holds the EMA generator alone, with no state to resume;
    the message names the run's folders that would do."""
    if not uri.endswith(".pt"):
        return
    run = re.sub(r"/(final|best)/generator\.pt$", "", uri)
    folder = run if run != uri else "RUN"
    raise CheckpointError(
        f"{uri}: a file, not a checkpoint (a generator export such as final/generator.pt holds "
        f"no training state to resume): name a checkpoint folder, "
        f"{folder}/checkpoints/step-NNNNNNNN, or the run folder {folder} (its newest checkpoint)"
    )


def load_from(
    uri: str,
    endpoint_url: str | None = None,
    run_id: str | None = None,
    timeout: float = READ_SECONDS,
):
    """(step, state) from a checkpoint folder, a run folder (its newest), or their parent."""
    uri = uri.rstrip("/")
    refuse_file(uri)
    if m := re.search(r"/checkpoints/step-(\d{8,})$", uri):
        run = open_store(uri[: m.start()], endpoint_url)
        return int(m.group(1)), load_verified(run, int(m.group(1)), timeout)
    store = open_store(uri, endpoint_url)
    found = load_latest(store, timeout)
    if found is None and run_id:
        found = load_latest(store.child(run_id), timeout)
    return found


def load_pt(data: bytes, label: str, expected: str) -> object:
    """A .pt file's contents, unpickled with weights_only=True: tensors and plain Python values,
    all that gan-job's checkpoints and exports hold. A full unpickler runs whatever code a file
    names (a planted checkpoint or export would run a command on load), so a file that needs
    more is refused: CheckpointError (exit 5) naming it and what it asked for. Damage
    (garbage, truncated) raises as torch.load does; a TorchScript file is named as one."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        asked = _GLOBAL.search(str(exc))
        if asked is None:  # not a pickle that names code: damage
            raise
        raise CheckpointError(
            f"{label}: refused: loading it would import the Python object {asked.group(1)}, "
            f"which could run code; a {expected} holds only tensors and plain values"
        ) from exc
    except RuntimeError as exc:
        if "TorchScript" not in str(exc):
            raise
        raise CheckpointError(f"{label}: a TorchScript module, not a {expected}") from exc


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def upgrade(state: dict) -> dict:
    """A checkpoint of gan-job 0.1.0 (one flat dict) in today's layout."""
    if state.get("format") == FORMAT:
        return state
    pick = lambda *keys: {k: state[k] for k in keys}  # noqa: E731
    return {
        "format": FORMAT,
        "meta": pick("arch", "settings", "world_size"),
        "run": pick("step", "images_seen", "rollbacks"),
        "nets": pick("g", "d", "g_ema", "opt_g", "opt_d"),
        "data": state["data"],
        "rng": state["rng"],
        "records": {"rows": state["records"]},
        "evals": {"rows": state["evals"]},
    }


def generator_state(state: dict) -> tuple[dict, dict] | None:
    """(arch, EMA generator weights) of a checkpoint or a final/generator.pt export."""
    if "arch" in state and "g_ema" in state:  # an export
        return state["arch"], state["g_ema"]
    if "g_ema" in state:  # a 0.1.0 checkpoint
        state = upgrade(state)
    if state.get("format") == FORMAT:
        return state["meta"]["arch"], state["nets"]["g_ema"]
    return None


def check_compatible(saved: dict, now: dict, keys: tuple[str, ...], where: str) -> None:
    """Refuse to continue a checkpoint on top of settings that would change what it means.

    saved, now: checkpoint metadata ({"settings": ..., "arch": ...}); keys: the settings that
    must match."""
    changed = [
        f"GAN_{key.upper()}: {saved['settings'].get(key)!r} in the checkpoint, "
        f"{now['settings'][key]!r} now"
        for key in keys
        if saved["settings"].get(key) != now["settings"][key]
    ]
    if saved["arch"] != now["arch"] and not changed:
        changed += [f"model: {c}" for c in arch_changes(saved["arch"], now["arch"])]
    if changed:
        raise CheckpointError(
            f"{where} was made with other settings ("
            + "; ".join(changed)
            + "): restore them, or use another GAN_RUN_ID or GAN_RESUME=never"
        )


def load_own(store: Store, timeout: float = READ_SECONDS) -> tuple[tuple[int, dict] | None, Past]:
    """load_latest(store), and where it finds nothing usable, what the store shows of the run's
    past (past_of), the reasons each complete checkpoint was skipped for included."""
    keys = store.list(PREFIX)
    failed: dict[int, str] = {}
    for step in sorted((int(m.group(1)) for k in keys if (m := _STEP_DIR.match(k))), reverse=True):
        try:
            return (step, load_verified(store, step, timeout)), Past()
        except CheckpointError as exc:
            log.warning("skipping checkpoint: %s", exc)
            failed[step] = str(exc)
    return None, past_of(store, keys, failed)


def marker_digest(store: Store, step: int) -> str:
    """What identifies a checkpoint: its marker holds every part's SHA-256 and its time."""
    return hashlib.sha256(store.get_bytes(step_dir(step) + MARKER)).hexdigest()[:12]


def agree_start(step: int | None, where: str, marker: str, world: distributed.World) -> None:
    """SettingsError (exit 2) on every rank, before any step, unless every rank starts from the
    same checkpoint: step (None: a fresh start) and the digest of its marker (marker_digest;
    "" where none was read), from where, the store. One all-gather.

    Nodes that each kept their artifacts on a volume of their own under one GAN_ARTIFACT_URI
    once trained out of step, rank 0 resuming at its step and the others from scratch, and
    stored checkpoints mixed from both, on every restart."""
    starts = distributed.gather_objects((step, marker, where, socket.gethostname()), world)
    if len({start[:2] for start in starts}) == 1:
        return
    held: dict[str, list[int]] = {}
    for rank, start in enumerate(starts):
        held.setdefault(_start_text(*start), []).append(rank)
    starts_by_rank = "; ".join(
        f"{what} (rank {', '.join(map(str, ranks))})" for what, ranks in held.items()
    )
    raise SettingsError(
        [
            f"the nodes would start from different checkpoints: {starts_by_rank}",
            "every node must read the same checkpoints: GAN_ARTIFACT_URI (and GAN_RESUME) on an "
            "S3 bucket or a volume every node mounts, not a folder of each node's own",
        ]
    )


def _start_text(step: int | None, marker: str, where: str, host: str) -> str:
    if step is None:
        return f"a fresh start in {where} on {host}"
    return f"step {step} of {where}" + (f" (marker {marker})" if marker else "") + f" on {host}"


class Stateful(Protocol):
    """A component of the checkpoint. Optional: start_fresh(), called when the run starts
    without a checkpoint (a history empties its artifact, the RNG reseeds); sync(), called
    before a checkpoint is queued (a history uploads the rows the checkpoint counts)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class Checkpointer:
    """Saves the run's components every `every` steps and at the end, restores the newest
    complete checkpoint, and prunes all but the newest `keep`.

    Components are restored in the order given. Every rank calls save() (gathering state can
    be a collective); rank 0 alone writes.

    resume: GAN_RESUME; timeout: how long a store that fails is waited for (seconds).
    """

    def __init__(
        self,
        *,
        store: Store,
        writer: BackgroundWriter | NullWriter,
        world: distributed.World,
        components: dict[str, Stateful],
        meta: dict,
        compatible_settings: tuple[str, ...],
        every: int,
        keep: int,
        metrics: Metrics,
        resume: str = "auto",
        endpoint_url: str | None = None,
        timeout: float = READ_SECONDS,
    ):
        self.store, self.writer, self.world = store, writer, world
        self.components, self.meta, self.compatible = components, meta, compatible_settings
        self.every, self.keep, self.metrics = every, keep, metrics
        self.resume, self.endpoint_url, self.timeout = resume, endpoint_url, timeout

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def maybe_save(self, step: int, last: bool = False) -> None:
        if last or self.due(step):
            self.save(step, last)

    def save(self, step: int, last: bool = False) -> None:
        """Queue a checkpoint of every component at step; returns without waiting for storage.

        While storage is behind (earlier checkpoints still waiting), a periodic checkpoint is
        skipped, with a warning and gan_checkpoints_skipped_total, so that neither training nor
        memory waits on it; the last one is always queued."""
        state = {"format": FORMAT, "meta": self.meta}
        state |= {name: c.state_dict() for name, c in self.components.items()}
        if not self.world.is_main:
            return
        if not last and not self.writer.has_room(QUEUED_ITEMS):
            self.metrics.inc_checkpoints_skipped()
            log.warning(
                "checkpoint at step %d skipped: earlier ones are still waiting to be stored "
                "(%d uploads pending, last error: %s)",
                step,
                self.writer.pending,
                self.writer.last_error,
            )
            return
        for c in self.components.values():
            if hasattr(c, "sync"):
                c.sync()
        t0 = time.monotonic()

        def stored(step: int) -> None:
            seconds = time.monotonic() - t0
            self.metrics.observe_checkpoint(seconds, step)
            log.info("checkpoint at step %d stored (%.2f s after it was taken)", step, seconds)

        save(self.writer, step, state, self.keep, on_stored=stored)

    def restore(self) -> int | None:
        """Loads the checkpoint GAN_RESUME names (resume_choice) into the components and returns
        its step, or gives each its fresh state and returns None. A checkpoint that cannot be
        read within timeout seconds fails (StorageError); none usable where the run has a past
        (resume_choice) fails too (CheckpointError)."""
        never = self.resume == "never"
        found, past = (None, None) if never else load_own(self.store, self.timeout)
        keys = self.store.list() if never else []
        own = found[0] if found is not None else None
        run_id, uri = self.meta["run_id"], self.store.uri
        choice = resume_choice(self.resume, own, keys, run_id, uri, past, self.every)
        if choice == "own" and self.resume != "auto":
            log.info(
                "run %s has checkpoints of its own: resuming from its step %d, not from "
                "GAN_RESUME=%s (that seeds only a run without checkpoints)",
                self.meta["run_id"],
                own,
                self.resume,
            )
        elif choice == "seed":
            found = load_from(self.resume, self.endpoint_url, self.meta["run_id"], self.timeout)
            if found is None:
                raise CheckpointError(f"GAN_RESUME={self.resume}: no complete checkpoint there")
        self._agree(found[0] if found is not None else None, choice)
        if found is None:
            for c in self.components.values():
                if hasattr(c, "start_fresh"):
                    c.start_fresh()
            return None
        self._load(*found)
        return found[0]

    def _agree(self, step: int | None, choice: str) -> None:
        """Every rank starts from the checkpoint of step (None: fresh) it chose (agree_start)."""
        if choice == "seed":
            agree_start(step, f"GAN_RESUME={self.resume}", "", self.world)
        else:
            marker = "" if step is None else marker_digest(self.store, step)
            agree_start(step, self.store.uri, marker, self.world)

    def rollback(self) -> int | None:
        """Restores this run's newest complete checkpoint, once every queued upload is stored.

        A store that does not take them within timeout seconds fails the rollback on every rank
        (exit 4, a retry resumes from the newest complete checkpoint) instead of hanging the job
        on it; the other ranks wait for rank 0's uploads in a collective, so timeout stays below
        the process group's (build.py)."""
        timeout = self.timeout
        stored = self.writer.flush(timeout)
        if not distributed.broadcast_object(stored, self.world):
            raise StorageError(
                f"rolling back needs the checkpoints queued before it: {self.writer.pending} "
                f"uploads still not stored after {timeout:g} s ({TIMEOUT_SETTINGS}; last error: "
                f"{self.writer.last_error})"
            )
        found = load_latest(self.store, timeout)
        if found is None:
            return None
        self._load(*found)
        return found[0]

    def _load(self, step: int, state: dict) -> None:
        where = f"{self.store.uri}: checkpoint at step {step}"
        check_compatible(state["meta"], self.meta, self.compatible, where)
        for name, c in self.components.items():
            if name not in state and hasattr(c, "start_fresh"):  # newer than the checkpoint
                c.start_fresh()
                continue
            try:
                c.load_state_dict(state[name])
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}") from None
