"""What a run leaves for people, beside its checkpoints: config.json, a sample grid from fixed
noise every GAN_SAMPLE_EVERY steps, report.png, final/generator.pt, and the start-up block that
says what the run is about to do. Rank 0 alone writes; on other ranks every method does nothing.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

import torch
from torch import nn

from job.gan.models import Arch
from job.gan.sampling import fixed_inputs, generate, grid_png
from job.infra import distributed, watchdog
from job.infra.store import Store
from job.infra.tensorboard_log import TensorBoardLog
from job.infra.writer import BackgroundWriter, NullWriter
from job.run.checkpoint import serialize
from job.run.report import write_report

log = logging.getLogger(__name__)

GRID_SIZE = 64
MAX_GRIDS_KEPT = 32  # grids held in memory for report.png (which shows 6 of them)
REPORT_SECONDS = 120.0  # drawing report.png: a declared wait, not a stall
_GRID_KEY = re.compile(r"^samples/step-(\d{8,})\.png$")


def grid_key(step: int) -> str:
    return f"samples/step-{step:08d}.png"


def grid_step(key: str) -> int | None:
    """The step of a sample grid's key; None for any other object under samples/."""
    m = _GRID_KEY.match(key)
    return int(m.group(1)) if m else None


def thin(steps: Sequence[int], most: int) -> list[int]:
    """At most `most` of the sorted steps, evenly spread, always the first and the last."""
    if len(steps) <= most:
        return list(steps)
    picks = {round(i * (len(steps) - 1) / (most - 1)) for i in range(most)}
    return [steps[i] for i in sorted(picks)]


def class_columns(images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, bytes]:
    """A conditional grid's columns, a PNG per class laid out as a row, which TensorBoard shows
    whole where a column would be scaled to its first image (samples_per_class/class_3); none
    without classes."""
    if labels is None:
        return {}
    columns = {k: images[labels == k] for k in labels.unique().tolist()}
    return {f"samples_per_class/class_{k}": grid_png(c, nrow=len(c)) for k, c in columns.items()}


class RunArtifacts:
    def __init__(
        self,
        *,
        store: Store,
        writer: BackgroundWriter | NullWriter,
        world: distributed.World,
        meta: dict,
        arch: Arch,
        sample_every: int,
        seed: int,
        startup: list[str],
        tensorboard: TensorBoardLog | None = None,
    ):
        """meta: the run's metadata (job/run/build.py run_meta); startup: the lines of the start-up
        block after the first, which says where the run starts; tensorboard: where grids go
        too (GAN_TENSORBOARD)."""
        self.store, self.writer, self.world, self.meta = store, writer, world, meta
        self.tensorboard = tensorboard
        self.arch, self.sample_every, self.seed, self.startup = arch, sample_every, seed, startup
        self.grids: dict[int, bytes] = {}  # step -> PNG, for the report

    def announce(self, resumed: int | None, images_seen: int) -> None:
        """One block that says what this run is about to do, and with what."""
        if not self.world.is_main:
            if resumed is not None:
                log.info("resumed from step %d (%d images seen)", resumed, images_seen)
            return
        start = (
            f"resumed from step {resumed} ({images_seen} images seen)"
            if resumed is not None
            else "fresh start"
        )
        lines = [f"run {self.meta['run_id']}: {start}, {self.startup[0]}", *self.startup[1:]]
        log.info("starting\n  %s", "\n  ".join(lines))

    def write_config(self) -> None:
        if self.world.is_main:
            config = json.dumps(self.meta, indent=2).encode()
            self.writer.submit("config.json", data=config)

    def restore_grids(self, step: int) -> None:
        """The grids of a resumed run up to its checkpoint's step, read back for the report."""
        if not self.world.is_main:
            return
        steps = sorted(s for k in self.store.list("samples/") if (s := grid_step(k)) is not None)
        for s in thin([s for s in steps if s <= step], MAX_GRIDS_KEPT):
            self.grids[s] = self.store.get_bytes(grid_key(s))

    def sampled(self, step: int) -> bool:
        return step in self.grids

    def maybe_sample(self, step: int, g_ema: nn.Module, last: bool = False) -> None:
        """A grid every sample_every steps, and at the end unless this step has one."""
        due = (not self.sampled(step)) if last else step % self.sample_every == 0
        if not due or not self.world.is_main:
            return
        z, labels = fixed_inputs(
            self.arch.latent_dim, GRID_SIZE, self.arch.num_classes, self.seed, self.world.device
        )
        nrow = self.arch.num_classes if self.arch.num_classes else 8
        images = generate(g_ema, z, labels)
        png = grid_png(images, nrow=nrow)
        self.grids[step] = png
        for dropped in set(self.grids) - set(thin(sorted(self.grids), MAX_GRIDS_KEPT)):
            del self.grids[dropped]
        self.writer.submit(grid_key(step), data=png, droppable=True)
        if self.tensorboard is not None:
            self.tensorboard.images(step, {"samples/grid": png, **class_columns(images, labels)})

    def report(self, records: list[dict], evals: list[dict]) -> None:
        """report.png: losses, D outputs and FID against images seen, and grids over time."""
        if not self.world.is_main:
            return
        # drawing is bounded work that can outlast a short stall timeout on a loaded machine
        with watchdog.waiting("drawing report.png", REPORT_SECONDS):
            png = write_report(
                records, evals, sorted(self.grids.items()), title=self.meta["run_id"]
            )
        self.writer.submit("report.png", data=png, replace=True)

    def export_generator(self, g_ema: nn.Module, step: int) -> None:
        """final/generator.pt: the EMA generator and its architecture (gan-job sample reads it)."""
        self.export_weights(g_ema.state_dict(), step)

    def export_weights(
        self, weights: dict, step: int, which: str = "final", scores: dict | None = None
    ) -> None:
        """<which>/generator.pt (final or best): the EMA generator's weights, its architecture
        and step, and for the best its evaluation's scores."""
        if self.world.is_main:
            export = {"arch": self.arch.to_dict(), "g_ema": weights, "step": step}
            if scores is not None:
                export["scores"] = scores
            self.writer.submit(f"{which}/generator.pt", data=serialize(export))
