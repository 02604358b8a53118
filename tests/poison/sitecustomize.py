"""Imported by every Python process of a test that puts this folder first on PYTHONPATH: in a
torchrun worker of rank POISON_RANK, D's weights turn NaN after step POISON_STEP (a non-finite
loss on demand, in a real job). With POISON_FILE instead, in a job of one process: after every
step once that file exists, so that a test picks the moment. With SLOW_REFERENCE_SECONDS: each
batch of the real FID reference takes that much longer."""

import os

if (
    "POISON_STEP" in os.environ
    and "LOCAL_RANK" in os.environ
    and os.environ.get("RANK") == os.environ.get("POISON_RANK", "0")
) or "POISON_FILE" in os.environ:
    import torch

    from job.gan.step import GanStep

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

if "SLOW_REFERENCE_SECONDS" in os.environ:
    import time

    from job.quality import evaluator, reference

    _reference, _three_channels, _in_reference = (
        evaluator.real_reference,
        reference.three_channels,
        [],
    )

    def _slow_reference(*args, **kwargs):
        _in_reference.append(True)
        try:
            return _reference(*args, **kwargs)
        finally:
            _in_reference.pop()

    def _slow_batch(x):
        if _in_reference:
            time.sleep(float(os.environ["SLOW_REFERENCE_SECONDS"]))
        return _three_channels(x)

    evaluator.real_reference, reference.three_channels = _slow_reference, _slow_batch
