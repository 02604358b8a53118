"""The batch source that feeds the training loop, and the order it draws batches in.

Small datasets are held whole as a uint8 tensor on the training device and batched by
indexing; image folders stream through a DataLoader. Both draw batches from the same
deterministic, rank-sharded epoch order, so the data position saved in a checkpoint resumes
exactly, also under another world size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from job.data.datasets import ImageData
from job.data.folder import folder_batches
from job.infra.errors import DataError


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The same permutation on every rank; each rank takes its own stride of it."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@dataclass
class Position:
    """Where a batch source is: the epoch, and the batches each rank took of it. Saved as the
    images all ranks consumed in the epoch, so that a checkpoint taken under one world size
    resumes under another (at the step where a run of that size had consumed as many)."""

    images_per_step: int  # the batch size times the world size
    epoch: int = 0
    batch_index: int = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "images_consumed": self.batch_index * self.images_per_step}

    def load_state_dict(self, state: dict, batches_in: Callable[[int], int]) -> None:
        """batches_in(epoch): the batches each rank takes of that epoch."""
        self.epoch = int(state["epoch"])
        consumed = int(state["images_consumed"]) // self.images_per_step
        self.batch_index = min(consumed, batches_in(self.epoch))

    def next_epoch_if_done(self, batches: int) -> bool:
        """Before a batch: on to the next epoch when this one's `batches` are taken."""
        if self.batch_index < batches:
            return False
        self.epoch, self.batch_index = self.epoch + 1, 0
        return True


class BatchSource:
    """Endless batches of (images in [-1, 1] on the device, labels), epoch after epoch, from
    images in memory or a folder; its position is a Position."""

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        on_device: bool = True,
    ):
        self.data, self.seed = data, seed
        self.device, self.rank, self.world_size = device, rank, world_size
        self.num_workers = num_workers
        self.per_rank = len(data) // world_size
        self.position = Position(batch_size * world_size)
        self.resize(batch_size)
        self.in_memory = data.images is not None
        if self.in_memory:
            home = device if on_device else torch.device("cpu")
            self.images, self.labels = data.images.to(home), data.labels.to(home)
            if home.type == "cpu" and device.type == "cuda":
                self.images, self.labels = self.images.pin_memory(), self.labels.pin_memory()
        self._iter = None

    def resize(self, batch_size: int) -> None:
        """Batches of batch_size per process from the next one on (a resumed run that keeps
        its checkpoint's global batch under another world size; before its position loads)."""
        self.batch_size = batch_size
        self.batches_per_epoch = self.per_rank // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"{self.data.name}: {len(self.data)} images are fewer than one batch per process "
                f"({batch_size} per process x {self.world_size} processes)"
            )
        self.position.images_per_step = batch_size * self.world_size
        self._iter = None

    @property
    def skipped_images(self) -> int:
        """Image files skipped as unreadable so far (each counted once)."""
        return self.data.folder.skipped if self.data.folder is not None else 0

    @property
    def images_per_epoch(self) -> int:
        return self.batches_per_epoch * self.batch_size * self.world_size

    def stats(self) -> dict:
        """Data throughput for the log record: nothing to add for images in memory or a folder
        (ShardSource reports its downloads)."""
        return {}

    def state_dict(self) -> dict:
        return self.position.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.position.load_state_dict(state, lambda epoch: self.batches_per_epoch)
        self._iter = None

    def _rank_batches(self) -> list[torch.Tensor]:
        order = epoch_order(len(self.data), self.seed, self.position.epoch)
        mine = order[self.rank :: self.world_size][: self.per_rank]
        usable = self.batches_per_epoch * self.batch_size
        return list(mine[:usable].view(self.batches_per_epoch, self.batch_size))

    def _loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = [b.tolist() for b in self._rank_batches()[self.position.batch_index :]]
        return folder_batches(
            self.data.folder, batches, self.num_workers, pin_memory=self.device.type == "cuda"
        )

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.position
        if pos.next_epoch_if_done(self.batches_per_epoch):
            self._iter = None
        if self.in_memory:
            if self._iter is None:
                self._iter = self._rank_batches()
            idx = self._iter[pos.batch_index].to(self.images.device, non_blocking=True)
            x = self.images[idx].to(self.device, non_blocking=True)
            y = self.labels[idx].to(self.device, non_blocking=True)
        else:
            if self._iter is None:
                self._iter = self._loader()
            x, y = next(self._iter)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
        pos.batch_index += 1
        return x.float().div_(127.5).sub_(1.0), y


def real_images(data: ImageData, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset of real images (uint8) and labels, e.g. for FID statistics."""
    if data.shards is not None:
        return data.shards.real_images(num, seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[: min(num, len(data))]
    if data.images is not None:
        return data.images[idx], data.labels[idx]
    items = [data.folder.load(int(i)) for i in idx]
    return torch.stack([item[0] for item in items]), torch.tensor([item[1] for item in items])
