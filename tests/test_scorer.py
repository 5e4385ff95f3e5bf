"""The Scorer contract's pieces: aggregations, shape checks and the arithmetic oracle."""

from __future__ import annotations

import math

import pytest

from mathprm import arith
from mathprm.scorer import AGGREGATIONS, ArithOracle, aggregate, check_shapes, load_scorer


def test_aggregations_by_hand():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8
    assert aggregate(s, "min") == 0.5
    assert math.isclose(aggregate(s, "prod"), 0.36)
    assert math.isclose(aggregate(s, "mean"), 2.2 / 3)
    assert set(AGGREGATIONS) == {"last", "min", "prod", "mean"}
    with pytest.raises(ValueError, match="no steps"):
        aggregate([], "min")
    with pytest.raises(ValueError, match="aggregation: unknown 'max'"):
        aggregate(s, "max")


def test_malformed_batches_are_named():
    with pytest.raises(ValueError, match="2 questions but 1 step lists"):
        check_shapes(["a", "b"], [["x"]])
    with pytest.raises(ValueError, match="steps of question 0"):
        check_shapes(["a"], ["x\ny"])
    with pytest.raises(ValueError, match="unknown scorer backend 'nope'"):
        load_scorer("nope", "/tmp")


def test_the_oracle_scores_one_until_the_first_wrong_step():
    p = arith.generate("medium", 1, seed=5, split="test")[0]
    good = arith.solution_steps(p)
    value = good[0].rsplit(" ", 1)[1]
    bad = [good[0].replace(f"= {value}", f"= {int(value) + 1}"), *good[1:]]
    oracle = ArithOracle([p])
    assert oracle.score([p.question, p.question], [good, bad]) == [[1.0] * len(good), [0.0] * len(bad)]
    with pytest.raises(ValueError, match="does not know the question"):
        oracle.score(["What is 1+1?"], [["1 + 1 = 2"]])
