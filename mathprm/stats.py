"""Statistics the evaluations share: AUROC of scores against binary truths, and pass@k.

Pure Python: the labelling stage, PRM training and both evaluations import these from here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative,
    ties counting one half. Computed as the Mann-Whitney U statistic over average ranks
    (Mann & Whitney 1947; Hanley & McNeil 1982): AUROC = (R+ - n+(n+ + 1)/2) / (n+ n-), with R+
    the sum of the positives' ranks, tied scores sharing the mean of their ranks."""
    if len(scores) != len(labels):
        raise ValueError(f"scores and labels differ in length: {len(scores)} != {len(labels)}")
    n_pos = sum(bool(y) for y in labels)
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auroc needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        mean_rank = (i + j) / 2 + 1  # ranks i+1 .. j+1 share their mean
        rank_sum += mean_rank * sum(bool(labels[order[t]]) for t in range(i, j + 1))
        i = j + 1
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)
