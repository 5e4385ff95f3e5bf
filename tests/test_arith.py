from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mathprm.data import arith
from mathprm.data.problems import Problem


def make(start: int, ops: list[tuple[str, int]]) -> Problem:
    """A hand-made problem, built the way `generate` builds one."""
    steps = arith.chain_steps(start, ops)
    return Problem(
        id="arith:test:hand",
        question=arith.plain_question(start, ops),
        answer=steps[-1].removeprefix("The answer is "),
        source="arith:test",
        solution="\n".join(steps),
        metadata={"start": start, "ops": [o for o, _ in ops], "operands": [n for _, n in ops]},
    )


# 17 + 25 = 42, 42 * 3 = 126, 126 - 48 = 78
P = make(17, [("+", 25), ("*", 3), ("-", 48)])
GOOD = ["17 + 25 = 42", "42 * 3 = 126", "126 - 48 = 78", "The answer is 78"]


def values(p: Problem) -> list[int]:
    start, ops = arith.chain(p)
    out = [start]
    for op, n in ops:
        out.append(arith.apply_op(out[-1], op, n))
    return out


def test_reference_format_and_question():
    assert P.question == "Start with 17. Add 25, then multiply by 3, then subtract 48. What is the result?"
    assert arith.solution_steps(P) == GOOD
    assert P.solution.split(arith.STEP_SEPARATOR) == GOOD
    assert P.answer == "78"


def test_generate_is_deterministic_and_depends_on_seed():
    a = arith.generate("hard", 50, seed=3)
    assert a == arith.generate("hard", 50, seed=3)
    assert {p.question for p in a}.isdisjoint({p.question for p in arith.generate("hard", 50, seed=4)})
    w = arith.generate("medium", 30, seed=3, word_problems=0.5)
    assert w == arith.generate("medium", 30, seed=3, word_problems=0.5)
    assert {p.metadata["phrasing"] for p in w} == {"plain", "word"}


def test_ids_are_unique_and_name_the_dataset():
    ps = arith.generate("easy", 500, seed=0)
    assert len({p.id for p in ps}) == len({p.question for p in ps}) == 500
    assert all(re.fullmatch(r"arith:easy:[0-9a-f]{12}", p.id) and p.source == "arith:easy" for p in ps)


@pytest.mark.parametrize("difficulty", ["easy", "hard"])
def test_no_leakage_between_splits_whatever_the_seeds(difficulty):
    train: set[str] = set()
    test: set[str] = set()
    for seed in range(6):
        for split, pool in (("train", train), ("test", test)):
            ps = arith.generate(difficulty, 150, seed=seed, split=split, word_problems=seed % 2 == 1)
            for p in ps:
                canonical = arith.plain_question(*arith.chain(p))
                assert arith.is_test_text(canonical) == (split == "test")
                assert arith.split_of(p) == p.metadata["split"] == split
                if p.metadata["phrasing"] == "plain":
                    assert p.question == canonical
                pool.add(canonical)
    assert len(test) > 150 and len(train) > 150
    assert train.isdisjoint(test)


def test_test_share_is_about_test_percent():
    # Over all chains the generator proposes, ~TEST_PERCENT % hash to test; a bug that
    # hashed something constant would put everything on one side.
    texts = [arith.plain_question(i, [("+", j)]) for i in range(1, 40) for j in range(1, 40)]
    share = sum(map(arith.is_test_text, texts)) / len(texts)
    assert abs(share - arith.TEST_PERCENT / 100) < 0.04


@pytest.mark.parametrize("difficulty", list(arith.PRESETS))
def test_presets_hold_over_many_samples(difficulty):
    preset = arith.PRESETS[difficulty]
    ps = arith.generate(difficulty, 300, seed=1) + arith.generate(difficulty, 300, seed=1, split="train")
    lengths = set()
    for p in ps:
        start, ops = arith.chain(p)
        lengths.add(len(ops))
        assert preset.n_ops[0] <= len(ops) <= preset.n_ops[1]
        assert preset.start[0] <= start <= preset.start[1]
        for op, n in ops:
            assert op in preset.operators
            lo, hi = preset.add_operand if op in "+-" else preset.mul_operand
            assert lo <= n <= hi
        assert all(v is not None and 0 <= v <= preset.max_value for v in values(p))
        for (op1, n1), (op2, n2) in zip(ops, ops[1:]):
            assert not (n1 == n2 and {op1, op2} in ({"+", "-"}, {"*", "/"})), "an operation undoes the previous one"
    assert lengths == set(range(preset.n_ops[0], preset.n_ops[1] + 1))
    used = {op for p in ps for op in p.metadata["ops"]}
    assert used == set(preset.operators)


@pytest.mark.parametrize("difficulty", list(arith.PRESETS))
def test_reference_solutions_pass_every_check(difficulty):
    for p in arith.generate(difficulty, 100, seed=2, word_problems=0.5):
        steps = p.solution.split(arith.STEP_SEPARATOR)
        assert steps == arith.solution_steps(p)
        assert len(steps) == len(p.metadata["ops"]) + 1
        assert all(arith.check_step(p, steps[:i], s) for i, s in enumerate(steps))
        assert arith.step_labels(p, steps) == [True] * len(steps)
        assert arith.first_error(p, steps) == -1
        assert steps[-1] == f"The answer is {p.answer}" and int(p.answer) == values(p)[-1]
        assert arith.is_correct(p, p.solution)


def test_whitespace_around_a_step_is_tolerated():
    assert arith.check_step(P, [], "  17 + 25 = 42 \t")
    assert arith.check_step(P, GOOD[:3], " The answer is 78.")


@pytest.mark.parametrize(
    "previous, step",
    [
        ([], "17 + 25 = 43"),  # bad arithmetic
        ([], "17 + 24 = 41"),  # wrong operand, right sum
        ([], "17 - 25 = -8"),  # wrong operator
        ([], "18 + 25 = 43"),  # wrong start value
        (GOOD[:1], "42 - 48 = -6"),  # skipped the multiplication
        (GOOD[:1], "43 * 3 = 129"),  # not the previous written result
        (GOOD[:1], "42 * 3 = 126 = 126"),
        (GOOD[:1], "42*3=126"),  # not the reference format
        (GOOD[:1], "042 * 3 = 126"),
        (GOOD[:1], "42 x 3 = 126"),
        (GOOD[:1], "42 * 3 = 126\n126 - 48 = 78"),  # two steps in one
        (GOOD[:2], "The answer is 126"),  # answer too early
        (GOOD[:3], "The answer is 79"),  # wrong final answer
        (GOOD[:3], "The answer is seventy-eight"),
        (GOOD[:3], "78 + 0 = 78"),  # an operation the problem does not have
        (GOOD, "The answer is 78"),  # anything after the answer
        (GOOD, "78 - 0 = 78"),
        (["17 + 25 = 42", "hmm"], "126 - 48 = 78"),  # nothing written to continue from
        ([], ""),
        ([], "   "),
        ([], "The answer is"),
        ([], "17 + 25 = " + "9" * 5000),  # would raise in int() past its digit limit
        ([], "١٧ + ٢٥ = ٤٢"),  # non-ASCII digits
    ],
)
def test_wrong_steps_are_caught(previous, step):
    assert not arith.check_step(P, previous, step)


def test_exact_division_only():
    p = make(12, [("/", 4), ("*", 5)])
    assert arith.check_step(p, [], "12 / 4 = 3")
    assert not arith.check_step(p, [], "12 / 4 = 4")
    assert not arith.check_step(p, ["12 / 4 = 3"], "3 / 4 = 0")
    # A wrong earlier result that the next division cannot divide exactly: no integer c is right.
    assert arith.check_step(p, ["12 / 4 = 13"], "13 * 5 = 65")
    q = make(30, [("+", 2), ("/", 4)])
    assert not any(arith.check_step(q, ["30 + 2 = 33"], f"33 / 4 = {c}") for c in range(-20, 20))


def test_correct_arithmetic_on_a_wrong_result_is_consistent_but_labelled_wrong():
    steps = ["17 + 25 = 42", "42 * 3 = 127", "127 - 48 = 79", "The answer is 79"]
    assert [arith.check_step(P, steps[:i], s) for i, s in enumerate(steps)] == [True, False, True, True]
    assert arith.step_labels(P, steps) == [True, False, False, False]
    assert arith.first_error(P, steps) == 1
    assert not arith.is_correct(P, "\n".join(steps))
    # check_step looks back only at the step before; an earlier error is step_labels' job.
    assert arith.check_step(P, ["no idea", "42 * 3 = 126"], "126 - 48 = 78")
    assert arith.step_labels(P, ["no idea", "42 * 3 = 126", "126 - 48 = 78"]) == [False] * 3


@pytest.mark.parametrize(
    "steps, expected",
    [
        (GOOD, -1),
        (GOOD[:2], -1),  # unfinished but right so far: no step is wrong
        ([], -1),
        (["17 + 25 = 43", *GOOD[1:]], 0),
        (["17 + 25 = 42", "42 - 48 = -6", "-6 * 3 = -18", "The answer is -18"], 1),  # operations out of order
        (["17 + 25 = 42", "42 * 3 = 126", "The answer is 126"], 2),  # skipped the last operation
        ([*GOOD[:3], "The answer is 79"], 3),
        ([*GOOD, "The answer is 78"], 4),
        (["", *GOOD], 0),
    ],
)
def test_first_error(steps, expected):
    assert arith.first_error(P, steps) == expected
    labels = arith.step_labels(P, steps)
    assert labels == [expected == -1 or i < expected for i in range(len(steps))]


def test_is_correct_reads_the_last_answer():
    assert arith.is_correct(P, "The answer is 78.")
    assert arith.is_correct(P, "The answer is 5\nno wait\nThe answer is 78")
    assert not arith.is_correct(P, "The answer is 780")
    assert not arith.is_correct(P, "The answer is 78.5")
    assert not arith.is_correct(P, "The answer is 78/2")
    assert not arith.is_correct(P, "The answer is 78" + "0" * 30)
    assert arith.is_correct(P, "The answer is 78 loaves")
    assert not arith.is_correct(P, "The answer is 78\nThe answer is 5")
    assert not arith.is_correct(P, "17 + 25 = 42\n78")


def test_word_problems_state_every_operand_in_order():
    ps = arith.generate("hard", 200, seed=5, word_problems=True)
    assert {p.metadata["phrasing"] for p in ps} == {"word"}
    assert len({p.question.split(" has ")[0] for p in ps}) > 1  # several stories
    for p in ps:
        start, ops = arith.chain(p)
        numbers = [int(x) for x in re.findall(r"\b\d+\b", p.question)]
        assert numbers == [start, *(n for _, n in ops)]
        assert p.question.count("Then ") == len(ops)
        assert p.question.endswith("have now?")
        assert arith.split_of(p) == "test"


def test_metadata_survives_serialisation():
    p = arith.generate("medium", 1, seed=0, word_problems=True)[0]
    assert json.loads(json.dumps(p.metadata)) == p.metadata
    back = Problem.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back == p
    steps = p.solution.split("\n")
    assert arith.step_labels(back, steps) == [True] * len(steps)
    # A Ray Data row built from the raw dict (not to_dict) comes back as numpy arrays and scalars.
    m = {**p.metadata, "start": np.int64(p.metadata["start"]),
         "ops": np.array(p.metadata["ops"]), "operands": np.array(p.metadata["operands"])}
    ray_like = Problem(id=p.id, question=p.question, answer=p.answer, source=p.source, solution=p.solution, metadata=m)
    assert arith.step_labels(ray_like, steps) == [True] * len(steps)
    assert not arith.check_step(ray_like, [], "0 + 0 = 0")


def test_load_arith():
    ps = arith.load_arith("arith:hard", limit=20, seed=7, split="train")
    assert ps == arith.generate("hard", 20, seed=7, split="train")
    assert arith.load_arith("arith:medium", limit=3, skip_bad=True, errors=[]) == arith.generate("medium", 3, seed=0)
    assert len(arith.load_arith("arith:easy")) == arith.DEFAULT_LIMIT
    with pytest.raises(ValueError, match="easy, medium, hard"):
        arith.load_arith("arith:impossible")
    with pytest.raises(ValueError, match="arith"):
        arith.load_arith("gsm8k")


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="split"):
        arith.generate("easy", 1, seed=0, split="validation")
    with pytest.raises(ValueError, match="word_problems"):
        arith.generate("easy", 1, seed=0, word_problems=2)
    with pytest.raises(ValueError, match="distinct"):
        arith.generate("easy", 5000, seed=0)
    with pytest.raises(ValueError, match="Preset.operators"):
        arith.Preset(n_ops=(1, 2), start=(1, 9), add_operand=(1, 9), mul_operand=(2, 5), operators="+^", max_value=99)
    with pytest.raises(ValueError, match="Preset.n_ops"):
        arith.Preset(n_ops=(3, 2), start=(1, 9), add_operand=(1, 9), mul_operand=(2, 5), operators="+-", max_value=99)


def test_grading_reads_the_answer_line():
    # The contract with mathprm.data.grading: the last step is the line its extract_answer reads.
    from mathprm.data.grading import extract_answer

    for p in arith.generate("hard", 50, seed=0, word_problems=0.5):
        assert extract_answer(p.solution) == p.answer
    assert extract_answer("\n".join(GOOD[:3] + ["The answer is 78."])) == "78"


def test_can_reach_gold_follows_the_written_value_through_the_remaining_operations():
    p = Problem(id="x", question="q", answer="3", source="arith:hard",
                metadata={"start": 50, "ops": ["+", "/"], "operands": [1, 17]})
    assert arith.can_reach_gold(p, []) and arith.can_reach_gold(p, ["50 + 1 = 51"])
    assert not arith.can_reach_gold(p, ["50 + 1 = 52"])  # 52 / 17 is not exact: no way on
    # A wrong quotient that lands back on the gold value: reachable again, though the
    # first-error truth stays wrong for good.
    steps = ["50 + 1 = 52", "52 / 17 = 3"]
    assert arith.can_reach_gold(p, steps) and not arith.step_labels(p, steps)[-1]
    assert arith.can_reach_gold(p, ["50 + 1 = 51", "51 / 17 = 3", "The answer is 3"])
    assert not arith.can_reach_gold(p, ["50 + 1 = 51", "51 / 17 = 3", "The answer is 4"])
    assert not arith.can_reach_gold(p, ["garbage"])
