"""Imported by every Python process of a test that puts this folder first on PYTHONPATH: in a
torchrun worker of rank POISON_RANK, D's weights turn NaN after step POISON_STEP (a non-finite
loss on demand, in a real job). With POISON_FILE instead, in a job of one process: after every
step once that file exists, so that a test picks the moment."""

import os

if (
    "POISON_STEP" in os.environ
    and "LOCAL_RANK" in os.environ
    and os.environ.get("RANK") == os.environ.get("POISON_RANK", "0")
) or "POISON_FILE" in os.environ:
    import torch

    from job.step import GanStep

    _train = GanStep.train

    def _due(step: int) -> bool:
        if "POISON_FILE" in os.environ:
            return os.path.exists(os.environ["POISON_FILE"])
        return step == int(os.environ["POISON_STEP"])

    def _poisoned_step(self, real, labels, step):
        stats = _train(self, real, labels, step)
        if _due(step + 1):
            with torch.no_grad():
                next(self.nets.d.parameters()).fill_(float("nan"))
        return stats

    GanStep.train = _poisoned_step
