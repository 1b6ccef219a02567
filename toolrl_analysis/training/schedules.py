"""Learning-rate schedules: the multiplier of the base rate at each scheduler step.

Both training commands decay with the same cosine, to 10% of the base rate; they differ in how the warm-up
meets it, and each keeps its own because runs and tests were tuned with it:
- `warmup_then_cosine` (train-base): a linear warm-up, then the cosine over the remaining steps;
- `cosine_under_warmup` (train-grpo, `schedule = "cosine"`): the cosine runs over all steps from step 0, and
  the warm-up ramp multiplies it.
`warmup_stable_decay` (train-base, `schedule = "wsd"`) holds the rate until the last `decay_steps`, then
decays it linearly to 0 (Hu et al. 2024, MiniCPM): a run at constant rate can be branched into its decay at
any checkpoint, and the branch is the run that had asked for that schedule from the start.
"""

from __future__ import annotations

import math


def linear_warmup(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps, reaching 1 at the last warm-up step; 1 without warm-up."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def cosine_decay(progress: float) -> float:
    """1 at progress 0, down to 0.1 at progress 1 and after."""
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_then_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return linear_warmup(step, warmup_steps)
    return cosine_decay((step - warmup_steps) / max(1, total_steps - warmup_steps))


def cosine_under_warmup(step: int, warmup_steps: int, total_steps: int) -> float:
    return linear_warmup(step, warmup_steps) * cosine_decay(step / max(1, total_steps))


def warmup_stable_decay(step: int, warmup_steps: int, total_steps: int, decay_steps: int) -> float:
    """Linear warm-up, 1 until `total_steps - decay_steps`, then linearly down to 0 at `total_steps`."""
    start = total_steps - decay_steps
    if step >= start and decay_steps > 0:
        return max(0.0, (total_steps - step) / decay_steps)
    return linear_warmup(step, warmup_steps)
