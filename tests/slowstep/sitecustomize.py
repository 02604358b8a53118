"""Imported by every Python process of a test that puts this folder first on PYTHONPATH: with
SLOW_PASS_SECONDS, each pass of a training step through D (D's on real images, D's on fakes,
G's) takes that much longer: a slow but healthy step, or a hung one."""

import os

if "SLOW_PASS_SECONDS" in os.environ:
    import time

    from job.gan import augment

    _diff_augment = augment.diff_augment

    def _slow_diff_augment(*args, **kwargs):
        time.sleep(float(os.environ["SLOW_PASS_SECONDS"]))
        return _diff_augment(*args, **kwargs)

    augment.diff_augment = _slow_diff_augment
