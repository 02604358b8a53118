"""Reading a trained generator back: the EMA generator of a checkpoint, of a generator export
(final/ or best/generator.pt) or of a run folder, and what a .pt file holds."""

from __future__ import annotations

import dataclasses
import json

import torch

from job.gan.models import Arch, build_generator
from job.infra.errors import CheckpointError
from job.infra.store import Store
from job.infra.stores import open_store
from job.run import checkpoint

EXPECTED = "gan-job checkpoint or generator export (final/generator.pt)"
BEST_EXPORT = "best/generator.pt"  # the EMA generator of a run's best evaluation (job/run/best.py)
MODELS = ("mlp", "dcgan", "r3gan")


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
    return rebuild(state, f"--checkpoint {path}")


def rebuild(state: object, label: str, expected: str = EXPECTED) -> tuple[torch.nn.Module, Arch]:
    """The EMA generator (eval mode) of a checkpoint's or export's state and its Arch;
    CheckpointError beginning with label when the state holds none, or its architecture or
    weights are damaged (missing fields, an unknown model, weights of other shapes)."""
    try:
        found = checkpoint.generator_state(state) if isinstance(state, dict) else None
    except (KeyError, TypeError, AttributeError) as exc:  # a checkpoint without its parts
        raise CheckpointError(
            f"{label}: a damaged checkpoint (no {exc}): expected a {expected}"
        ) from exc
    if found is None:
        raise CheckpointError(f"{label}: {what_it_is(state)}, not a {expected}")
    arch = _arch(found[0], label)
    if not isinstance(found[1], dict):
        raise CheckpointError(f"{label}: its weights are a {_kind(found[1])}, expected a dict")
    try:
        g = build_generator(arch)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{label}: its architecture {found[0]} cannot be built ({exc})"
        ) from exc
    try:
        g.load_state_dict(found[1])
    except (TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{label}: its weights do not fit its architecture ({_why(exc)})"
        ) from exc
    return g.eval(), arch


def _arch(saved: object, label: str) -> Arch:
    """The Arch of a saved arch dict, or CheckpointError naming what is wrong with it."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{label}: its architecture is a {_kind(saved)}, expected a dict")
    fields = {f.name: f for f in dataclasses.fields(Arch)}
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    problems = [f"missing {n!r}" for n in required if n not in saved]
    problems += [f"unknown field {k!r}" for k in saved if k not in fields]
    if not problems and saved["model"] not in MODELS:
        problems.append(f"model {saved['model']!r}, expected one of {', '.join(MODELS)}")
    if problems:
        raise CheckpointError(f"{label}: its architecture is damaged: {'; '.join(problems)}")
    return Arch(**saved)


def _kind(value: object) -> str:
    return type(value).__name__


def _why(exc: Exception) -> str:
    """The first line that says what is wrong (load_state_dict's first line is a header), and
    how many more there are."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading state_dict"):
        lines = lines[1:]
    more = f", and {len(lines) - 1} more" if len(lines) > 1 else ""
    return (lines[0].rstrip(".") if lines else _kind(exc)) + more


def read_config(store: Store) -> dict:
    """A run's config.json as a dict holding its settings; CheckpointError naming the file
    when it is not JSON, not an object, or has no settings."""
    name = f"{store.uri.rstrip('/')}/config.json"
    try:
        config = json.loads(store.get_bytes("config.json"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{name}: not JSON ({exc}): expected a run's config.json") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: a JSON {_kind(config)}, expected a JSON object")
    if not isinstance(config.get("settings"), dict):
        raise CheckpointError(f"{name}: no 'settings' object: expected a run's config.json")
    return config


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
        why = (str(exc).splitlines() or [""])[0]
        why = f"{_kind(exc)} {why}".strip() if len(why) < 20 else why[:160]
        raise CheckpointError(f"{label}: unreadable ({why}): expected a {expected}") from exc


def what_it_is(state: object) -> str:
    if isinstance(state, dict):
        return "a dict without a generator"
    return f"a saved {type(state).__name__}"
