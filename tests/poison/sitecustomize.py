"""Imported by every Python process of a test that puts this folder first on PYTHONPATH: in a
torchrun worker of rank POISON_RANK, D's weights turn NaN after step POISON_STEP (a non-finite
loss on demand, in a real job)."""

import os

if (
    "POISON_STEP" in os.environ
    and "LOCAL_RANK" in os.environ
    and os.environ.get("RANK") == os.environ.get("POISON_RANK", "0")
):
    import torch

    from job.train import Trainer

    _step = Trainer.train_step

    def _poisoned_step(self, real, labels):
        stats = _step(self, real, labels)
        if self.run_state.step + 1 == int(os.environ["POISON_STEP"]):
            with torch.no_grad():
                next(self.nets.d.parameters()).fill_(float("nan"))
        return stats

    Trainer.train_step = _poisoned_step
