"""Learning-rate decay over the run's budget: GAN_MAX_STEPS, or GAN_MAX_MINUTES when that
comes first.

A GAN trained for a known budget ends better with its learning rates brought down towards the
end (the EMA generator then averages a settling G instead of a wandering one). The budget may be
steps or minutes; progress is whichever is further along, from 0 at the start to 1 at the end.
"""

from __future__ import annotations

import math


def progress(step: int, max_steps: int, time_progress: float) -> float:
    """How far the run is through its budget, 0 to 1."""
    return min(1.0, max(step / max_steps, time_progress))


def time_progress(at_start: float, elapsed_seconds: float, max_minutes: float) -> float:
    """Progress through the time budget. A resumed run goes on from the progress its checkpoint
    recorded (at_start; the Trainer passes 0 for a run that had finished its budget) and
    spreads the rest over this process's GAN_MAX_MINUTES; without a time budget it stays where
    it was."""
    if not max_minutes:
        return at_start
    return min(1.0, at_start + (1.0 - at_start) * elapsed_seconds / (max_minutes * 60))


def lr_factor(kind: str, start: float, at: float) -> float:
    """The learning rates' multiplier at progress `at`: 1 until `start`, then down to 0 at the
    end of the budget, along a straight line (linear) or half a cosine (cosine)."""
    if kind == "none" or at <= start:
        return 1.0
    x = min(1.0, (at - start) / (1.0 - start))
    return 1.0 - x if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * x))
