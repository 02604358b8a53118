"""Reading a trained generator back: the EMA generator of a checkpoint, of a generator export
(final/ or best/generator.pt) or of a run folder, and what a .pt file holds."""

from __future__ import annotations

import torch

from job.gan.models import Arch, build_generator
from job.infra.errors import CheckpointError
from job.infra.stores import open_store
from job.run import checkpoint

EXPECTED = "gan-job checkpoint or generator export (final/generator.pt)"
BEST_EXPORT = "best/generator.pt"  # the EMA generator of a run's best evaluation (job/run/best.py)


def load_generator(
    path: str, endpoint_url: str | None = None, which: str = "final"
) -> tuple[torch.nn.Module, Arch]:
    """The EMA generator of a checkpoint, a generator export (final/ or best/generator.pt), or
    a run folder: which="final", its newest checkpoint (else final/generator.pt); which="best",
    its best/generator.pt (the best evaluated step)."""
    if path.endswith(".pt"):
        state = read_pt(path, endpoint_url, f"--checkpoint {path}")
    elif which == "best":
        if not open_store(path, endpoint_url).exists(BEST_EXPORT):
            raise CheckpointError(
                f"--checkpoint {path}: no {BEST_EXPORT} (a run keeps one only when it is "
                "evaluated: GAN_FID_FEATURES)"
            )
        return load_generator(path.rstrip("/") + "/" + BEST_EXPORT, endpoint_url)
    else:
        found = checkpoint.load_from(path, endpoint_url)
        if found is None:
            final = open_store(path, endpoint_url)
            if not final.exists("final/generator.pt"):
                raise CheckpointError(
                    f"--checkpoint {path}: no complete checkpoint or final/generator.pt"
                )
            return load_generator(path.rstrip("/") + "/final/generator.pt", endpoint_url)
        state = found[1]
    found = checkpoint.generator_state(state) if isinstance(state, dict) else None
    if found is None:
        raise CheckpointError(f"--checkpoint {path}: {what_it_is(state)}, not a {EXPECTED}")
    arch = Arch(**found[0])
    g = build_generator(arch)
    g.load_state_dict(found[1])
    return g.eval(), arch


def read_pt(path: str, endpoint_url: str | None, label: str, expected: str = EXPECTED) -> object:
    """What a .pt file (local or s3://) holds; CheckpointError beginning with label when it is
    missing or no torch.save file."""
    parent, name = path.rsplit("/", 1) if "/" in path else (".", path)
    try:
        raw = open_store(parent, endpoint_url).get_bytes(name)
    except FileNotFoundError as exc:
        raise CheckpointError(f"{label}: no such file") from exc
    try:
        return checkpoint.load_pt(raw, label, expected)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - garbage, truncated or empty: unpickling fails anyhow
        why = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{label}: unreadable ({why}): expected a {expected}") from exc


def what_it_is(state: object) -> str:
    if isinstance(state, dict):
        return "a dict without a generator"
    return f"a saved {type(state).__name__}"
