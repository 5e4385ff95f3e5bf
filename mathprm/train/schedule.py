"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay.

Pure (math only). SFT passes `progress` as the larger of the step fraction and the time-budget
fraction, so a run that stops on the clock still anneals; PRM training passes the step fraction
after warm-up; `benchmarks/prm_verifier.py` the time fraction.
"""

from __future__ import annotations

import math

MIN_LR_RATIO = 0.1  # the cosine decays to this fraction of the peak rate


def warmup_cosine(lr: float, warmup_steps: int, step: int, progress: float, min_ratio: float = MIN_LR_RATIO) -> float:
    """The rate at 0-based `step`: `lr * (step + 1) / warmup_steps` while warming up, then
    `lr` cosine-annealed to `min_ratio * lr` as `progress` goes from 0 to 1 (clamped)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, max(0.0, progress))))
    return lr * (min_ratio + (1.0 - min_ratio) * cosine)
