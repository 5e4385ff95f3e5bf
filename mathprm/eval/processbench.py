"""ProcessBench: can a step scorer find the first wrong step of a solution?

ProcessBench (Zheng et al. 2024, "ProcessBench: Identifying Process Errors in Mathematical
Reasoning", arXiv:2412.06559) gives 3,400 model-written solutions to GSM8K, MATH,
OlympiadBench and Omni-MATH problems, each with the human label of its earliest wrong step
(-1 when every step is right). A critic predicts that index; per subset the metric is

    error_acc   = % of erroneous solutions whose predicted index equals the label exactly
    correct_acc = % of correct solutions predicted -1
    F1          = 2 * error_acc * correct_acc / (error_acc + correct_acc)

and the headline number is the mean F1 over the four subsets.

A `Scorer` becomes a critic the usual way for process reward models: the first step whose
score falls below a threshold is the predicted error (`predicted_first_error`, as in the
Qwen2.5-Math-PRM report, Zhang et al. 2025). The threshold is a config field; by default a
PRM's own, picked on its validation labels (`best_threshold`), else 0.5.

Departures from the paper, for runs on part of the benchmark or with small PRMs:

- `limit` N takes a seeded sample of N solutions per subset, as many erroneous as correct
  (`balanced_sample`; the files open with a run of erroneous ones, so the first N would leave
  F1 undefined). Where a subset still has no erroneous (or no correct) solutions, which only
  `limit: 1` can cause, its accuracy and F1 are None instead of a division by zero.
- A solution longer than the PRM's context, which a published PRM refuses rather than cut
  (`TooLongError`), is skipped: one line says so, and it counts in `skipped_too_long`, not in
  any accuracy.
- A mathprm PRM reads its own step separator after every step, so one trained on steps cut
  at another separator than ProcessBench's "\\n\\n" is refused up front
  (`mathprm.scorer.check_step_separator`, a one-line ConfigError naming `prm`).

`evaluate_scorer` is the pure core; `run_processbench` loads the data, builds the scorer,
and writes the report JSON atomically. This module imports neither torch nor Ray.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

from mathprm import atomic
from mathprm.config import ConfigError
from mathprm.data.problems import ProcessBenchItem, default_separator, load_problems
from mathprm.scorer import (
    Scorer,
    TooLongError,
    build_scorer,
    check_shapes,
    check_step_separator,
    default_threshold,
    parse_prm,
)

SUBSETS = ("gsm8k", "math", "olympiadbench", "omnimath")


def predicted_first_error(scores: Sequence[float], threshold: float) -> int:
    """Index of the first step scored strictly below `threshold`, else -1 (no error found).

    A score equal to the threshold counts as right. NaN is a ValueError: it compares False
    with everything and would silently pass as a right step.
    """
    for i, s in enumerate(scores):
        if math.isnan(s):
            raise ValueError(f"scores: step {i} is NaN")
        if s < threshold:
            return i
    return -1


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b), the F1 of two accuracies; 0 when both are 0."""
    return 2 * a * b / (a + b) if a + b else 0.0


def processbench_f1(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, Any]:
    """ProcessBench's per-subset metric (module docstring), accuracies and F1 in percent.

    A group with no samples has accuracy None, and then F1 is None too: the harmonic mean of
    a missing number is not 0. F1 is 0 when both accuracies are 0.
    """
    if len(labels) != len(predictions):
        raise ValueError(f"processbench_f1: {len(labels)} labels but {len(predictions)} predictions")
    erroneous = [p == y for y, p in zip(labels, predictions) if y != -1]
    correct = [p == -1 for y, p in zip(labels, predictions) if y == -1]
    error_acc = 100.0 * sum(erroneous) / len(erroneous) if erroneous else None
    correct_acc = 100.0 * sum(correct) / len(correct) if correct else None
    f1 = None if error_acc is None or correct_acc is None else harmonic_mean(error_acc, correct_acc)
    return {"error_acc": error_acc, "correct_acc": correct_acc, "f1": f1,
            "n_erroneous": len(erroneous), "n_correct": len(correct)}


def balanced_sample(items: Sequence[ProcessBenchItem], limit: int, seed: int) -> list[ProcessBenchItem]:
    """`limit` of `items` (one subset), as many erroneous (label != -1) as correct ones (the
    odd one erroneous; all of the smaller group when it has fewer than half), each group a
    random sample seeded by (subset, seed): the same ids for the same seed, in the file's order."""
    erroneous = [it for it in items if it.label != -1]
    correct = [it for it in items if it.label == -1]
    n_correct = min(len(correct), max(limit // 2, limit - len(erroneous)))
    n_erroneous = min(len(erroneous), limit - n_correct)
    rng = random.Random(f"processbench:{items[0].subset if items else ''}:{seed}")
    chosen = {it.id for it in rng.sample(erroneous, n_erroneous) + rng.sample(correct, n_correct)}
    return [it for it in items if it.id in chosen]


def best_threshold(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float | None:
    """The threshold that maximises `processbench_f1` of `predicted_first_error(scores[i], t)`
    against `labels[i]` (-1 or the first wrong step); None when there are no erroneous or no
    correct solutions (F1 is then undefined).

    Candidates are the midpoints between consecutive distinct scores (and just outside their
    range), so the choice does not sit on a score it was fitted on; among equal F1s the
    lowest threshold wins (fewest steps called wrong). A PRM trained on Monte-Carlo values
    scores right steps of a weak policy well below 0.5, so 0.5 is no threshold for it; this
    picks one on held-out labels (mathprm.train.prm stores it in the PRM's config).

    Each solution is right for the t in one interval: a correct one for t <= min(scores), an
    erroneous one with label y for scores[y] < t <= min(scores[:y]); counting intervals by
    bisection keeps this O((solutions + candidates) log solutions)."""
    import bisect

    if len(scores) != len(labels):
        raise ValueError(f"best_threshold: {len(scores)} solutions but {len(labels)} labels")
    n_err = sum(y != -1 for y in labels)
    n_ok = len(labels) - n_err
    if not n_err or not n_ok:
        return None
    ok_hi, err_lo, err_hi = [], [], []
    for ss, y in zip(scores, labels):
        if any(math.isnan(x) for x in ss):
            raise ValueError("best_threshold: a score is NaN")
        if y == -1:
            ok_hi.append(min(ss, default=math.inf))
        elif y < len(ss) and ss[y] < min(ss[:y], default=math.inf):  # else no threshold finds y
            err_lo.append(ss[y])
            err_hi.append(min(ss[:y], default=math.inf))
    ok_hi.sort(), err_lo.sort(), err_hi.sort()
    values = sorted({float(x) for ss in scores for x in ss})
    if not values:
        return None
    candidates = [max(0.0, values[0] - 1e-6), *((a + b) / 2 for a, b in zip(values, values[1:])),
                  min(1.0, values[-1] + 1e-6)]
    best, best_f1 = None, -1.0
    for t in candidates:
        correct = len(ok_hi) - bisect.bisect_left(ok_hi, t)  # t <= hi
        erroneous = bisect.bisect_left(err_lo, t) - bisect.bisect_left(err_hi, t)  # lo < t <= hi
        f1 = harmonic_mean(erroneous / n_err, correct / n_ok)
        if f1 > best_f1 + 1e-12:
            best, best_f1 = t, f1
    return best


def two_group_threshold(scores: Sequence[float]) -> float | None:
    """The cut that splits `scores` into two groups best (Otsu's method: the largest
    between-group variance n_low * n_high * (mean_high - mean_low)^2), as the midpoint between
    the two scores around it; None with fewer than two distinct scores. Uses no labels.

    For a PRM whose only labels are a tree search's: those are noisy both ways (a right step
    is labelled 0 when every rollout from it failed, a wrong one > 0 when a rollout recovered),
    so a threshold fitted to them is pulled into the group of wrong steps. A PRM that ranks
    well scores right steps in a tight group near its ceiling and wrong ones spread below it
    (see docs/BENCHMARKS.md); the split between the groups is the threshold."""
    values = sorted(float(x) for x in scores)
    if any(math.isnan(x) for x in values):
        raise ValueError("two_group_threshold: a score is NaN")
    n, total = len(values), sum(values)
    best, best_var, low_sum = None, -math.inf, 0.0
    for k in range(n - 1):
        low_sum += values[k]
        if values[k + 1] == values[k]:
            continue  # a cut between equal scores does not exist
        n_low, n_high = k + 1, n - k - 1
        var = n_low * n_high * ((total - low_sum) / n_high - low_sum / n_low) ** 2
        if var > best_var + 1e-15:
            best, best_var = (values[k] + values[k + 1]) / 2, var
    return best


class ProcessBenchOracle:
    """A `Scorer` that knows the human labels: step i scores 1.0 if the solution is right
    (label -1) or i comes before the first error, else 0.0. With any threshold in (0, 1] it
    is a perfect critic, the ceiling of the benchmark and a check of the evaluation plumbing.
    Solutions are looked up by (problem text, steps); an unknown one is a ValueError."""

    def __init__(self, items: Sequence[ProcessBenchItem]) -> None:
        self.labels: dict[tuple[str, tuple[str, ...]], int] = {}
        for it in items:
            key = (it.problem, tuple(it.steps))
            if self.labels.setdefault(key, it.label) != it.label:
                raise ValueError(f"ProcessBenchOracle: {it.id} repeats a solution with a different label")

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        check_shapes(questions, steps_per_question)
        out = []
        for q, steps in zip(questions, steps_per_question):
            label = self.labels.get((q, tuple(steps)))
            if label is None:
                raise ValueError(f"score: the ProcessBench oracle does not know the solution to {q[:80]!r}")
            out.append([1.0 if label == -1 or i < label else 0.0 for i in range(len(steps))])
        return out


@dataclasses.dataclass
class ProcessBenchConfig:
    prm: str = "runs/arith/prm"  # DIR | KIND:DIR | oracle (the human labels), see mathprm.scorer.parse_prm
    subsets: list[str] = dataclasses.field(default_factory=lambda: list(SUBSETS))
    threshold: float | None = None  # a step scored below it is the predicted first error; None: the
    #                                   PRM's own (mathprm.scorer.default_threshold), 0.5 for other scorers
    limit: int | None = None  # N items of each subset, half erroneous and half correct, drawn with `seed`
    seed: int = 0  # which items a `limit` draws (balanced_sample)
    batch_size: int = 8  # solutions per scorer call
    out: str = "runs/eval/processbench.json"

    def __post_init__(self) -> None:
        if parse_prm(self.prm).kind == "none":
            raise ValueError("prm: ProcessBench needs a PRM: a directory, KIND:DIR or oracle (the human labels)")
        if not self.subsets:
            raise ValueError(f"subsets: give at least one of {', '.join(SUBSETS)}")
        for s in self.subsets:
            if s not in SUBSETS:
                raise ValueError(f"subsets: unknown subset {s!r}; choose from {', '.join(SUBSETS)}")
        if len(set(self.subsets)) != len(self.subsets):
            raise ValueError(f"subsets: {self.subsets} names a subset twice")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold: must be in [0, 1], got {self.threshold}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


def evaluate_scorer(
    scorer: Scorer,
    items_by_subset: dict[str, list[ProcessBenchItem]],
    threshold: float,
    batch_size: int,
    progress: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Score every solution, predict its first error, and compute the metric per subset.

    Returns {"subsets": {name: {error_acc, correct_acc, f1, n_erroneous, n_correct, n_items,
    skipped_too_long}}, "average_f1": the mean subset F1 (None if any is None), "threshold":
    threshold, "skipped_too_long": the total, "predictions": {name: [{"id", "label",
    "predicted"}, ...]} (per scored item, in input order), "skipped": {name: [ids]}}. A
    solution the scorer refuses as longer than its context (`TooLongError`) is skipped, with a
    `progress` line, and counts in no accuracy; `n_items` counts the scored ones.
    """
    subsets: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[dict[str, Any]]] = {}
    skipped: dict[str, list[str]] = {}
    for name, items in items_by_subset.items():
        started = time.monotonic()
        scored: list[ProcessBenchItem] = []
        preds: list[int] = []
        skipped[name] = []
        next_tenth = 1  # report at each tenth of the subset, so a slow PRM shows it is alive
        for lo in range(0, len(items), batch_size):
            batch, scores = items[lo: lo + batch_size], []
            while batch:  # a refused solution leaves the batch, and the rest is scored again
                try:
                    scores = scorer.score([it.problem for it in batch], [list(it.steps) for it in batch])
                    break
                except TooLongError as e:
                    it = batch.pop(e.index)
                    skipped[name].append(it.id)
                    progress(f"[processbench] {name}: skipped {it.id}: {e.tokens} tokens, longer than the PRM's "
                             f"context of {e.context}")
            if len(scores) != len(batch):
                raise ValueError(f"score: {len(scores)} score lists for a batch of {len(batch)} "
                                 f"(from {batch[0].id})")
            for it, s in zip(batch, scores):
                if len(s) != len(it.steps):
                    raise ValueError(f"score: {it.id} has {len(it.steps)} steps but got {len(s)} scores")
                preds.append(predicted_first_error(s, threshold))
            scored += batch
            done = min(lo + batch_size, len(items))
            if 10 * done >= next_tenth * len(items):
                elapsed = time.monotonic() - started
                progress(f"[processbench] {name}: {done}/{len(items)} solutions, "
                         f"{done / max(elapsed, 1e-9):.1f} items/s")
                next_tenth = 10 * done // len(items) + 1
        labels = [it.label for it in scored]
        subsets[name] = processbench_f1(labels, preds) | {"n_items": len(scored),
                                                          "skipped_too_long": len(skipped[name])}
        predictions[name] = [{"id": it.id, "label": it.label, "predicted": p} for it, p in zip(scored, preds)]
    f1s = [m["f1"] for m in subsets.values()]
    average = sum(f1s) / len(f1s) if f1s and None not in f1s else None
    return {"subsets": subsets, "average_f1": average, "threshold": threshold,
            "skipped_too_long": sum(map(len, skipped.values())), "predictions": predictions, "skipped": skipped}


def run_processbench(cfg: ProcessBenchConfig, scorer: Scorer | None = None) -> dict[str, Any]:
    """Evaluate `cfg.prm` (or a ready `scorer`) and write `cfg.out` atomically. A PRM that does
    not fit ProcessBench's steps is a ConfigError naming `prm` (one line from the command)."""
    items_by_subset: dict[str, list[ProcessBenchItem]] = {}
    for s in cfg.subsets:
        items = load_problems(f"processbench:{s}")
        items_by_subset[s] = items if cfg.limit is None else balanced_sample(items, cfg.limit, cfg.seed)
    ref = parse_prm(cfg.prm)
    if scorer is None:
        try:
            check_step_separator(ref, default_separator(f"processbench:{cfg.subsets[0]}"), "ProcessBench")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        every = [it for items in items_by_subset.values() for it in items]
        scorer = build_scorer(ref, lambda: ProcessBenchOracle(every))
    threshold = cfg.threshold
    if threshold is None:
        threshold = default_threshold(ref)
    started = time.monotonic()
    result = evaluate_scorer(scorer, items_by_subset, threshold, cfg.batch_size)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "backend": ref.kind,
        "prm": ref.path,
        "limit": cfg.limit,
        "seed": cfg.seed,
        "elapsed_s": round(time.monotonic() - started, 1),
    } | result
    atomic.write_json(cfg.out, report)
    return report


def format_processbench(report: dict[str, Any]) -> str:
    """The report's per-subset numbers as an aligned text table, average F1 last."""
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    rows = [f"{'subset':<14} {'error acc':>9} {'correct acc':>11} {'F1':>6} {'n':>5}"]
    for name, m in report["subsets"].items():
        rows.append(f"{name:<14} {pct(m['error_acc']):>9} {pct(m['correct_acc']):>11} "
                    f"{pct(m['f1']):>6} {m['n_items']:>5}")
    rows.append(f"{'average':<14} {'':>9} {'':>11} {pct(report['average_f1']):>6}")
    if report.get("skipped_too_long"):
        rows.append(f"skipped {report['skipped_too_long']} solutions longer than the PRM's context "
                    "(in no figure above; ids under 'skipped' in the report)")
    return "\n".join(rows)
