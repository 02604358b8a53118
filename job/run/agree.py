"""The nodes of a run agree on their settings before any work.

A ConfigMap edited between two pods' starts gives nodes different settings; each would train a
different run into one store. Every node compares its GAN_* values with the others' (secrets by
their digest only) and all exit 2 naming what differs.
"""

from __future__ import annotations

import hashlib
import json

from job.infra import distributed
from job.infra.errors import SettingsError
from job.infra.secrets import redact


def _variable(name: str) -> str:
    return "GAN_" + name.upper()


def agree_settings(
    values: dict[str, object],
    node_rank: int,
    per_node: set[str] | frozenset[str],
    world: distributed.World,
) -> None:
    """values: the settings by field name (Settings.model_dump); per_node: those that may differ.
    SettingsError (exit 2) on every rank, before any work, when the nodes of the run were
    started with different settings (a ConfigMap edited between two pods' starts): each
    setting that differs, with the node ranks holding each value; a value that holds a secret
    (redact() finds one) is compared by its digest and not shown."""
    comparable = {name: _comparable(v) for name, v in values.items() if name not in per_node}
    differ = distributed.differing(comparable, node_rank, world)
    if differ:
        problems = [_disagreement(_variable(name), held) for name, held in differ.items()]
        problems.append(
            "every node of a run needs the same GAN_* settings, but for "
            + ", ".join(_variable(n) for n in sorted(per_node))
        )
        raise SettingsError(problems)


_SECRET = "secret:"


def _comparable(value: object) -> str:
    text = json.dumps(value)
    if redact(text) != text:
        return _SECRET + hashlib.sha256(text.encode()).hexdigest()
    return text


def _disagreement(variable: str, held: dict[str, list[int]]) -> str:
    def nodes(ranks: list[int]) -> str:
        return ("node " if len(ranks) == 1 else "nodes ") + ", ".join(map(str, ranks))

    if any(value.startswith(_SECRET) for value in held):
        groups = "; ".join(nodes(ranks) for ranks in held.values())
        return f"{variable} differs between the nodes ({groups}): it holds a secret, not shown"
    where = ", ".join(f"{value} on {nodes(ranks)}" for value, ranks in held.items())
    return f"{variable} differs between the nodes: {where}"
