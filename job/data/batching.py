"""The global batch: how it splits over the processes and into micro-batches, and keeping it
when a run resumes under another world size.

GAN_BATCH_SIZE alone is per process, so a run resumed on fewer nodes would silently train on a
smaller global batch with the same learning rates. The checkpoint's `batch` component holds
the global batch; a resumed run keeps it unless GAN_GLOBAL_BATCH_SIZE (or a changed
GAN_BATCH_SIZE) says otherwise, and logs which.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from job.infra.errors import SettingsError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    micro_batch: int  # images per forward/backward
    accumulation: int  # micro-batches per step and process

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.accumulation

    def describe(self) -> str:
        text = f"batch {self.per_process} per process, global batch {self.global_batch}"
        if self.accumulation > 1:
            text += f" ({self.accumulation} micro-batches of {self.micro_batch})"
        return text


def plan(global_batch: int, world_size: int, micro_limit: int | None = None) -> BatchPlan:
    """Each process's share of global_batch, in the fewest equal micro-batches of at most
    micro_limit images (None: one micro-batch)."""
    if global_batch % world_size:
        below = global_batch // world_size * world_size
        near = f"{below} or {below + world_size}" if below else str(world_size)
        raise SettingsError(
            [
                f"GAN_GLOBAL_BATCH_SIZE={global_batch}: expected a multiple of the world size "
                f"{world_size} (e.g. {near})"
            ]
        )
    per_process = global_batch // world_size
    accumulation = next(
        a
        for a in range(1, per_process + 1)
        if per_process % a == 0 and (micro_limit is None or per_process // a <= micro_limit)
    )
    return BatchPlan(global_batch, world_size, per_process // accumulation, accumulation)


def batch_size_given(fields_set: Collection[str], recipe_filled: Collection[str]) -> bool:
    """GAN_BATCH_SIZE was set (among fields_set, the settings given) and not filled in by the
    recipe (recipe_filled): plan_from_settings then holds it to GAN_GLOBAL_BATCH_SIZE."""
    return "batch_size" in fields_set and "batch_size" not in recipe_filled


def plan_from_settings(
    batch_size: int,
    batch_size_given: bool,
    global_batch: int | None,
    world_size: int,
    micro_limit: int | None,
) -> BatchPlan:
    """GAN_GLOBAL_BATCH_SIZE over the world, else GAN_BATCH_SIZE per process. Both given:
    they must agree (batch_size_given: GAN_BATCH_SIZE was set, not filled in by a recipe)."""
    if global_batch is None:
        return plan(batch_size * world_size, world_size, micro_limit)
    chosen = plan(global_batch, world_size, micro_limit)
    if batch_size_given and batch_size != chosen.per_process:
        raise SettingsError(
            [
                f"GAN_BATCH_SIZE={batch_size} with GAN_GLOBAL_BATCH_SIZE={global_batch} over "
                f"{world_size} process(es): expected GAN_BATCH_SIZE={chosen.per_process} "
                "(global / world size), or only one of the two"
            ]
        )
    return chosen


MIN_MICRO_BATCH = {"mlp": 2}  # its BatchNorm1d cannot train on one value per channel


def check_micro_batch(chosen: BatchPlan, model: str, given: str) -> None:
    """SettingsError when model cannot train on chosen's micro-batches (given: the settings
    that chose them, for the message)."""
    least = MIN_MICRO_BATCH.get(model, 1)
    if chosen.micro_batch < least:
        raise SettingsError(
            [
                f"GAN_MODEL={model} with micro-batches of {chosen.micro_batch} image ({given}: "
                f"{chosen.describe()}): its BatchNorm needs at least {least} images per "
                "micro-batch: expected a larger GAN_BATCH_SIZE or GAN_GLOBAL_BATCH_SIZE, a "
                "GAN_MICRO_BATCH_SIZE that divides the batch per process, or GAN_MODEL=dcgan"
            ]
        )


class GlobalBatch:
    """The checkpoint's `batch`: the global batch trained with, and the GAN_BATCH_SIZE that
    gave it. apply(plan) resizes the batch source and the step to a plan adopted on resume."""

    def __init__(
        self,
        current: BatchPlan,
        *,
        batch_size: int,
        global_given: bool,
        micro_limit: int | None,
        apply: Callable[[BatchPlan], None],
        is_main: bool,
    ):
        self.plan, self.batch_size, self.global_given = current, batch_size, global_given
        self.micro_limit, self.apply, self.is_main = micro_limit, apply, is_main

    def state_dict(self) -> dict:
        return {"global_batch": self.plan.global_batch, "batch_size": self.batch_size}

    def start_fresh(self) -> None:
        """Nothing to do: a checkpoint older than this component trained GAN_BATCH_SIZE per
        process, as this run does."""

    def load_state_dict(self, state: dict) -> None:
        saved = int(state["global_batch"])
        if saved == self.plan.global_batch:
            return
        if self.global_given or int(state["batch_size"]) != self.batch_size:
            told = "GAN_GLOBAL_BATCH_SIZE" if self.global_given else "GAN_BATCH_SIZE"
            self._log(
                "global batch %d as %s says, not the checkpoint's %d",
                self.plan.global_batch,
                told,
                saved,
            )
            return
        world = self.plan.world_size
        if saved % world:
            raise SettingsError(
                [
                    f"the checkpoint's global batch of {saved} does not split over world size "
                    f"{world}: set GAN_GLOBAL_BATCH_SIZE to a multiple of {world} to go on"
                ]
            )
        self.plan = plan(saved, world, self.micro_limit)
        self.apply(self.plan)
        self._log(
            "keeping the checkpoint's global batch %d under world size %d: %s "
            "(set GAN_GLOBAL_BATCH_SIZE to change it)",
            saved,
            self.plan.world_size,
            self.plan.describe(),
        )

    def _log(self, message: str, *args: object) -> None:
        if self.is_main:
            log.info(message, *args)
