"""Reading, grading and voting final answers: shared by evaluation, tree search and guided search.

`Judge(problem)` reads the final answer of a solution's text (`key`: exact integers in the
arithmetic world, the project's grader's normal form on real math) and says whether a key is
right (`correct`). Answers are voted in their `key` form, so "1/2" and "\\frac{1}{2}" count as
one answer. This module imports neither torch, Ray nor vLLM.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from mathprm.data import arith
from mathprm.data.problems import Problem


class Judge:
    """Reads and grades final answers: exact integers in the arithmetic world, the project's
    grader (math-verify / sympy) on real math. `key` is the form answers are voted in."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self.arith = problem.source.startswith("arith:")

    def key(self, text: str) -> str | None:
        if self.arith:
            found = arith._ANSWER_ANYWHERE.findall(text)
            return str(int(found[-1])) if found else None
        from mathprm.data.grading import extract_answer, normalize_answer

        answer = extract_answer(text)
        return None if answer is None else normalize_answer(answer)

    def correct(self, key: str | None) -> bool:
        if key is None or self.problem.answer is None:
            return False
        if self.arith:
            return int(key) == int(self.problem.answer)
        from mathprm.data.grading import is_equivalent

        return is_equivalent(key, self.problem.answer)


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent non-None answer; a tie goes to the one that appears first."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def weighted_vote(answers: Sequence[str | None], weights: Sequence[float]) -> str | None:
    """The non-None answer with the largest total weight (PRM-weighted majority, Uesato et al.
    2022); a tie goes to the one that appears first."""
    if len(answers) != len(weights):
        raise ValueError(f"weighted_vote: {len(answers)} answers but {len(weights)} weights")
    totals: dict[str, float] = {}
    for a, w in zip(answers, weights):
        if a is not None:
            totals[a] = totals.get(a, 0.0) + float(w)
    if not totals:
        return None
    best = max(totals.values())
    return next(a for a in totals if totals[a] == best)


def judge_grader(problem: Problem, text: str) -> bool:
    """The project's grader: exact integers on arith, math-verify/sympy on real math."""
    judge = Judge(problem)
    return judge.correct(judge.key(text))
