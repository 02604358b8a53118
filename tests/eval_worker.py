"""Run under torchrun by test_evaluate_run.py (and called in one process): measure() of a
stand-in generator on every rank; each rank saves what it got."""

import sys
from pathlib import Path

import torch

from job.infra import distributed
from job.quality import evaluator, extractors, reference
from tests.helpers import Painter, idx_images


def main(out: Path, features: str) -> None:
    world = distributed.setup("cpu")
    extractor = extractors.load_extractor(features, 1, 28, world.device)
    real = reference.real_reference(extractor, idx_images(120, seed=0)[0], world.device)
    g = Painter(*idx_images(200, seed=1), mode="ignore")
    found = evaluator.measure(
        extractor, real if world.is_main else reference.RealReference(real.state), g, 4, 10, 150,
        seed=2, device=world.device, rank=world.rank, world_size=world.world_size, batch=16,
        labels_checked=True, keep_features=True,
    )  # fmt: skip
    torch.save(found, out / f"rank{world.rank}-of-{world.world_size}.pt")
    distributed.leave(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
