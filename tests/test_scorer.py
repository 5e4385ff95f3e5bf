"""The Scorer contract's pieces: aggregations, shape checks and the arithmetic oracle."""

from __future__ import annotations

import math

import pytest

from mathprm.data import arith
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


def test_one_prm_grammar_for_every_stage():
    from mathprm.scorer import PRMRef, build_scorer, parse_prm

    assert parse_prm(None) == parse_prm("none") == PRMRef("none")
    assert parse_prm("oracle") == PRMRef("oracle")
    assert parse_prm("runs/arith/prm") == PRMRef("prm", "runs/arith/prm")
    assert parse_prm("prm:/abs/dir") == PRMRef("prm", "/abs/dir")
    assert parse_prm("runs/a:b") == PRMRef("prm", "runs/a:b")  # a colon is a kind only before a known KIND
    assert str(parse_prm("prm:/abs/dir")) == "/abs/dir" and str(parse_prm("oracle")) == "oracle"
    for bad, message in (("", "give none, oracle"), ("prm:", "names no directory"), (3, "give none, oracle")):
        with pytest.raises(ValueError, match=f"^prm: .*{message}"):
            parse_prm(bad)
    assert build_scorer(PRMRef("none")) is None
    problems = arith.generate("easy", 1, seed=3, split="test")
    oracle = build_scorer(PRMRef("oracle"), lambda: ArithOracle(problems))
    assert oracle.score([problems[0].question], [arith.solution_steps(problems[0])]) == [
        [1.0] * len(arith.solution_steps(problems[0]))]
    with pytest.raises(ValueError, match="^prm: oracle knows only"):
        build_scorer(PRMRef("oracle"))
    with pytest.raises(FileNotFoundError, match="not a PRM directory"):
        build_scorer(parse_prm("/nonexistent/prm"))
