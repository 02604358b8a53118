"""Each rank's random stream (noise, labels, DiffAugment): saved from every rank with a
checkpoint and restored on each, so that a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Callable

import torch

from job.infra import distributed


class RngStreams:
    """step() gives the run's step: a stream restored under another world size starts afresh
    from it (the checkpointer restores the run's position before the streams)."""

    def __init__(self, seed: int, world: distributed.World, step: Callable[[], int]):
        self.seed, self.world, self.step = seed, world, step

    def reseed(self, step: int) -> None:
        """A fresh stream per rank, still fixed by the seed and the step it starts at."""
        torch.manual_seed(self.seed * 1_000_003 + step * 1009 + self.world.rank + 1)

    def start_fresh(self) -> None:
        self.reseed(0)

    def state_dict(self) -> list[dict]:
        """Every rank's state, in rank order (a collective: every rank calls it)."""
        return distributed.gather_objects(_get(self.world.device), self.world)

    def load_state_dict(self, states: list[dict]) -> None:
        """This rank's saved stream; under another world size, a fresh one for the step."""
        if len(states) == self.world.world_size:
            _set(states[self.world.rank], self.world.device)
        else:
            self.reseed(self.step())


def _get(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
