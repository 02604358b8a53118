"""Where a run starts (GAN_RESUME): its own newest checkpoint, a checkpoint a path names, or a
fresh start; and what refuses a fresh start: an older run in the same place (GAN_RESUME=never),
or a run whose store shows it had checkpoints when none of them can be used (`Past`).

A store or a proxy that answers wrongly (a gateway's page for every state.pt, a listing of
checkpoints/ with no keys) once made a run start over on top of itself: retention then deleted
its checkpoints and metrics.jsonl was rewritten. checkpoint.py reads the store for this module;
the rule itself reads nothing, so that the run and the dry run follow it alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from job.infra.errors import CheckpointError, SettingsError
from job.infra.store import Store
from job.run.runlock import LOCK_KEY

CHECKPOINTS = "checkpoints/"  # checkpoint.PREFIX (that module imports this one)

HISTORY = "metrics.jsonl"  # the run's history, read by key when no checkpoint is listed
FINAL = "final/generator.pt"  # queued after a run's last checkpoint (the writer is FIFO)


@dataclass(frozen=True)
class Past:
    """What a run's store shows of an earlier life, looked at where none of its own checkpoints
    is usable: the complete ones that failed verification ({step: why}), how many keys are
    listed under checkpoints/, the first and last step of its history and whether it ended
    (final/generator.pt). The last two are read by key: a listing is what may lie."""

    failed: dict[int, str] = field(default_factory=dict)
    parts: int = 0
    history: tuple[int, int] | None = None
    finished: bool = False


def past_of(store: Store, keys: list[str], failed: dict[int, str] | None = None) -> Past:
    """Past of a run whose listing of checkpoints/ gave keys, none of them a usable checkpoint
    (failed: the complete ones and why). Reads the history and looks for final/generator.pt only
    where no complete checkpoint is listed at all."""
    if failed:
        return Past(failed=dict(failed), parts=len(keys))
    try:
        text = store.get_bytes(HISTORY).decode(errors="replace")
    except FileNotFoundError:
        text = ""
    steps = []
    for line in text.splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # an append cut short, or not a history at all
    history = (min(steps), max(steps)) if steps else None
    return Past(parts=len(keys), history=history, finished=store.exists(FINAL))


def _why_not_fresh(past: Past, every: int, uri: str) -> str | None:
    """Why a run with this past must not start over (it has a run to lose), or None: none, or
    a run stopped before its first checkpoint was stored. Its history reaching past the first
    checkpoint due after its first row (rows are logged, and on S3 stored, before the checkpoint
    of their step: a job stopped while it stored that one has rows up to its step), or a final
    export, means a checkpoint was stored."""
    if past.failed:
        reasons = "; ".join(why for _, why in sorted(past.failed.items(), reverse=True))
        count = len(past.failed)
        return f"none of the {count} complete checkpoints in {uri} can be used ({reasons})"
    parts = f" ({past.parts} keys without a marker)" if past.parts else ""
    unlisted = f"the store {uri} lists no complete checkpoint under {CHECKPOINTS}{parts}"
    if past.history is not None:
        first, last = past.history
        due = -(-first // every) * every  # the first checkpoint step at or after the first row
        if last > due:
            return (
                f"{unlisted}, though its {HISTORY} reaches step {last}, past the checkpoint due "
                f"at step {due}"
            )
    if past.finished:
        return f"{unlisted}, though the run ended ({FINAL} is there)"
    return None


def resume_choice(
    resume: str,
    own_step: int | None,
    keys: list[str],
    run_id: str,
    uri: str,
    past: Past | None = None,
    every: int = 1,
) -> Literal["own", "seed", "fresh"]:
    """Where a run starts by GAN_RESUME (resume): "own", this run's newest checkpoint (own_step;
    None: it has none, or resume is never and it was not looked for), whatever GAN_RESUME names
    (a retry after a preemption goes on from there); "seed", the checkpoint a GAN_RESUME path
    names, for a run without checkpoints of its own; "fresh" otherwise.

    never over an older run (keys: what its store at uri holds, listed under never only) is a
    SettingsError: a fresh start must not mix with an older run in the same place: retention
    would delete one run's checkpoints for the other's, and `auto` would later resume the old
    one.

    Without a usable checkpoint of its own, a run whose past (past_of; every: its
    GAN_CHECKPOINT_EVERY) shows it had one (complete checkpoints that all failed verification, a
    history past its first checkpoint, a final export) is a CheckpointError: a store or a proxy
    that answers wrongly (a page for state.pt, an empty listing) would otherwise have the run
    started over on top of itself."""
    if resume == "never":
        old = [k for k in keys if k != LOCK_KEY]
        if old:
            raise SettingsError(
                [
                    f"GAN_RESUME=never, but run {run_id} already has {len(old)} artifacts in "
                    f"{uri} (e.g. {old[0]}): set another GAN_RUN_ID, remove that "
                    f"folder, or use GAN_RESUME=auto to continue it"
                ]
            )
        return "fresh"
    if own_step is not None:
        return "own"
    if past is not None and (why := _why_not_fresh(past, every, uri)):
        raise CheckpointError(
            f"run {run_id}: {why}: starting over would write over that run. If "
            "the store, or a proxy in front of it, answers wrongly, fix it and retry; to start a "
            "new run instead, set GAN_RESUME=never and another GAN_RUN_ID"
        )
    return "fresh" if resume == "auto" else "seed"
