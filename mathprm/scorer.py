"""The `Scorer` contract: a question and its solution steps in, one score per step out.

A score in [0, 1] is the estimated probability that the solution is still on its way to the
right answer after that step (the quantity tree search labels and the PRM learns). Anything
that can judge steps implements it, batched over solutions:

- `mathprm.models.prm.PRMScorer`: a trained process reward model, every step of a solution in one
  forward pass;
- `ArithOracle`: the arithmetic world's exact checker (1.0 while every step so far is right,
  then 0.0), for tests and upper bounds;
- the Serve app's handle adapter over the PRM deployment (the same contract, async).

Which PRM a stage uses is spelled one way in every config and the Serve app (`parse_prm`):
`prm: none | oracle | DIR | KIND:DIR`, DIR a PRM directory in mathprm's format and KIND a key
of `SCORERS` (mathprm's own `prm`, and the published PRMs of `mathprm.models.published`: `qwen`,
`math_shepherd`, `rlhflow`, `skywork`); `build_scorer` turns it into a Scorer.

A scorer that refuses a solution longer than its context rather than cut it raises
`TooLongError` (which solution of the call, how long), so a caller that can do without that
solution (ProcessBench) skips it and scores the rest.

Backends are picked by name from `SCORERS` and imported only when chosen. Aggregations of a
solution's step scores into one solution score (`last`, `min`, `prod`, `mean`) live beside
the contract, because best-of-n and guided search both need them. This module imports
neither torch nor Ray.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mathprm.data import arith
from mathprm.data.problems import Problem


class TooLongError(ValueError):
    """A solution longer than a scorer's context, refused rather than cut (the published kinds,
    `mathprm.models.published`). `index` is its place in the `score` call, so a caller that can do
    without it (ProcessBench skips and counts it) leaves it out and scores the rest."""

    def __init__(self, message: str, index: int, tokens: int, context: int) -> None:
        super().__init__(message)
        self.index, self.tokens, self.context = index, tokens, context

    def __reduce__(self) -> tuple:  # pickled whole (Ray sends it between processes)
        return type(self), (str(self), self.index, self.tokens, self.context)


class Scorer(Protocol):
    """Scores solutions step by step. A scorer that keeps state per search (a prefix cache) also
    has `acquire(questions)` and `release(questions)`, which the search drivers call when searches
    on those questions start and end (`mathprm.models.prefix.PrefixCached`); the others need not
    have them."""

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
    "prm": "mathprm.models.prm:PRMScorer",  # mathprm's own format (`mathprm train-prm`, `mathprm prm-prior`)
    # Published PRMs in their published layouts (mathprm.models.published cites each format's source).
    "qwen": "mathprm.models.published:QwenPRMScorer",  # Qwen/Qwen2.5-Math-PRM-7B, -72B
    "math_shepherd": "mathprm.models.published:MathShepherdScorer",  # peiyi9979/math-shepherd-mistral-7b-prm
    "rlhflow": "mathprm.models.published:RLHFlowScorer",  # RLHFlow/Llama3.1-8B-PRM-Deepseek-Data
    "skywork": "mathprm.models.published:SkyworkPRMScorer",  # Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B, -7B
}


@dataclass(frozen=True)
class PRMRef:
    """Which PRM a stage uses, as every config and the Serve app spell it (`parse_prm`)."""

    kind: str  # "none", "oracle" (the exact step truth of the problems at hand), or a key of SCORERS
    path: str | None = None  # the directory, for the SCORERS kinds

    def __str__(self) -> str:
        return self.kind if self.path is None else (self.path if self.kind == "prm" else f"{self.kind}:{self.path}")

    def resolved(self) -> PRMRef:
        """The same PRM with an absolute directory (actors and replicas run in other directories)."""
        return self if self.path is None else PRMRef(self.kind, str(Path(self.path).resolve()))


def parse_prm(value: str | None, field: str = "prm") -> PRMRef:
    """`none` (or null) | `oracle` | `DIR` (mathprm's format) | `KIND:DIR` (KIND a key of
    `SCORERS`) -> a PRMRef; ValueError naming `field` for anything else."""
    if value is None or value == "none":
        return PRMRef("none")
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{field}: give none, oracle, a PRM directory or KIND:DIR (KIND one of "
                         f"{', '.join(SCORERS)}), got {value!r}")
    if value == "oracle":
        return PRMRef("oracle")
    kind, colon, path = value.partition(":")
    if colon and kind in SCORERS:
        if not path:
            raise ValueError(f"{field}: {value!r} names no directory after {kind}:")
        return PRMRef(kind, path)
    return PRMRef("prm", value)


def trained_separator(ref: PRMRef) -> str | None:
    """The step separator the PRM in `ref` was trained with (None: none, oracle); reading its
    config names the directory in the error when it is not a PRM. A published kind's is the
    one its scorer class declares (`separator`, from its authors' usage)."""
    if ref.path is None:
        return None
    if ref.kind != "prm":  # a published format: the separator its authors split steps at
        return _scorer_class(ref.kind).separator
    from mathprm.models.prm import read_prm_config

    return read_prm_config(ref.path)["separator"]


def check_step_separator(ref: PRMRef, separator: str, data: str) -> None:
    """ValueError naming `prm` and the fix when the PRM in `ref` cannot score steps that `data`
    gives already cut at `separator` (ProcessBench's lists of steps). A mathprm PRM reads its own
    separator after every step, so steps cut at another one are not what it learnt on (and a step
    that holds its separator is refused); a published kind builds its input from the list of steps,
    whatever cut them, and `none` and the oracle read no text."""
    if ref.kind != "prm":
        return
    trained = trained_separator(ref)
    if trained != separator:
        raise ValueError(f"prm: {ref.path} was trained on steps separated by {trained!r}, but {data}'s steps are "
                         f"separated by {separator!r}: use a PRM saved with separator={separator!r} "
                         "(mathprm prm-prior or train-prm separator=...)")


def check_oracle(ref: PRMRef, dataset: str) -> None:
    """ValueError naming `prm` when `ref` is the oracle and `dataset` has no exact step truth
    (the oracle knows only the arithmetic world's problems)."""
    if ref.kind == "oracle" and not dataset.startswith("arith:"):
        raise ValueError(f"prm: the oracle knows only the arithmetic world's problems (arith:*), not {dataset!r}")


def default_threshold(ref: PRMRef) -> float:
    """The score below which a step counts as wrong (ProcessBench's first error) for the PRM in
    `ref`: a mathprm PRM's own, picked when it was trained (`mathprm.models.prm.saved_threshold`);
    0.5 for every other scorer."""
    if ref.kind != "prm":
        return 0.5
    from mathprm.models.prm import saved_threshold

    return saved_threshold(ref.path)


def load_scorer(backend: str, path: str, **options: Any) -> Scorer:
    """The `backend` scorer for the directory `path` (e.g. a PRM saved by `mathprm train-prm`)."""
    return _scorer_class(backend)(path, **options)


def _scorer_class(backend: str) -> Any:
    if backend not in SCORERS:
        raise ValueError(f"unknown scorer backend {backend!r}; backends: {', '.join(SCORERS)}")
    module_name, cls_name = SCORERS[backend].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def build_scorer(ref: PRMRef, oracle: Callable[[], Scorer] | None = None, **options: Any) -> Scorer | None:
    """The Scorer `ref` names: None for `none`; `oracle()` for `oracle` (the caller knows its
    problems' truth: `ArithOracle` for arith problems, the human labels for ProcessBench); else
    the SCORERS backend loaded from its directory with `options` (e.g. device=)."""
    if ref.kind == "none":
        return None
    if ref.kind == "oracle":
        if oracle is None:
            raise ValueError("prm: oracle knows only problems with exact step truth (arith:*, ProcessBench)")
        return oracle()
    return load_scorer(ref.kind, ref.path, **options)
