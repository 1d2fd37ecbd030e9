"""Learning-rate schedule as a pure function of the step (so resume needs only the step)."""

from __future__ import annotations

import math

from pretrain.config import ScheduleConfig


def lr_multiplier(step: int, sched: ScheduleConfig, max_steps: int) -> float:
    """Factor of the peak lr for optimizer step `step` (0-based).

    warmup: linear from 1/warmup to 1 over `warmup_steps` steps.
    cosine: from 1 down to min_lr_ratio at max_steps.
    wsd:    1 until the last `decay_fraction` of the steps, then linear to min_lr_ratio.
    """
    lo = sched.min_lr_ratio
    if sched.warmup_steps and step < sched.warmup_steps:
        return (step + 1) / sched.warmup_steps
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "cosine":
        span = max(1, max_steps - sched.warmup_steps)
        progress = min(1.0, (step - sched.warmup_steps) / span)
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_steps = max(1, round(sched.decay_fraction * max_steps))
    decay_start = max(sched.warmup_steps, max_steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - lo) * progress
