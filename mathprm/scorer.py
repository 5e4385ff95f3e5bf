"""The `Scorer` contract: a question and its solution steps in, one score per step out.

A score in [0, 1] is the estimated probability that the solution is still on its way to the
right answer after that step (the quantity tree search labels and the PRM learns). Anything
that can judge steps implements it, batched over solutions:

- `mathprm.prm.PRMScorer`: a trained process reward model, every step of a solution in one
  forward pass;
- `ArithOracle`: the arithmetic world's exact checker (1.0 while every step so far is right,
  then 0.0), for tests and upper bounds;
- later, the Serve deployment's handle adapter.

Backends are picked by name from `SCORERS` and imported only when chosen. Aggregations of a
solution's step scores into one solution score (`last`, `min`, `prod`, `mean`) live beside
the contract, because best-of-n and guided search both need them. This module imports
neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from mathprm import arith
from mathprm.problems import Problem


class Scorer(Protocol):
    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        """For solution i (`questions[i]` + `steps_per_question[i]`), one score per step, in order."""
        ...


AGGREGATIONS: dict[str, Callable[[Sequence[float]], float]] = {
    "last": lambda s: s[-1],  # the PRM's value of the whole solution (Math-Shepherd's choice)
    "min": min,  # a solution is as good as its weakest step (Lightman et al. 2023 use prod / min)
    "prod": math.prod,  # the probability that every step is right, if they were independent
    "mean": lambda s: sum(s) / len(s),
}


def aggregate(scores: Sequence[float], how: str) -> float:
    """One solution score from its step scores; ValueError for an unknown `how` or no steps."""
    if how not in AGGREGATIONS:
        raise ValueError(f"aggregation: unknown {how!r}; choose one of {', '.join(AGGREGATIONS)}")
    if not scores:
        raise ValueError("aggregation: a solution with no steps has no score")
    return float(AGGREGATIONS[how](scores))


def check_shapes(questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> None:
    """ValueError naming the argument when a batch is malformed (shared by the implementations)."""
    if len(questions) != len(steps_per_question):
        raise ValueError(f"score: {len(questions)} questions but {len(steps_per_question)} step lists")
    for i, (q, steps) in enumerate(zip(questions, steps_per_question)):
        if not isinstance(q, str):
            raise ValueError(f"score: question {i} must be a string, got {type(q).__name__}")
        if isinstance(steps, str) or not all(isinstance(s, str) for s in steps):
            raise ValueError(f"score: steps of question {i} must be a list of strings")


class ArithOracle:
    """Exact step scores for arithmetic-world problems: 1.0 while steps 0..i are all right
    (`arith.step_labels`, ProcessBench's first-error truth), else 0.0. It knows the problems it
    was given; a question it does not know is a ValueError naming it."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.by_question = {p.question: p for p in problems}

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        check_shapes(questions, steps_per_question)
        out = []
        for q, steps in zip(questions, steps_per_question):
            if q not in self.by_question:
                raise ValueError(f"score: the arith oracle does not know the question {q[:80]!r}")
            out.append([float(ok) for ok in arith.step_labels(self.by_question[q], list(steps))])
        return out


class ZeroScorer:
    """Every step scores 0.0: no step reward at all, for PPO on the outcome alone (`prm: none`),
    the baseline that shows what a PRM's step rewards add."""

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        check_shapes(questions, steps_per_question)
        return [[0.0] * len(steps) for steps in steps_per_question]


SCORERS: dict[str, str] = {
    "prm": "mathprm.prm:PRMScorer",
}


def load_scorer(backend: str, path: str, **options: Any) -> Scorer:
    """The `backend` scorer for the directory `path` (e.g. a PRM saved by `mathprm train-prm`)."""
    if backend not in SCORERS:
        raise ValueError(f"unknown scorer backend {backend!r}; backends: {', '.join(SCORERS)}")
    module_name, cls_name = SCORERS[backend].split(":")
    return getattr(importlib.import_module(module_name), cls_name)(path, **options)
