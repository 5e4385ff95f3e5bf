from __future__ import annotations

import json

import pytest

from mathprm.config import ConfigError, load_config
from mathprm.data.problems import ProcessBenchItem, load_problems
from mathprm.eval.processbench import (
    SUBSETS,
    ProcessBenchConfig,
    ProcessBenchOracle,
    best_threshold,
    evaluate_scorer,
    format_processbench,
    predicted_first_error,
    processbench_f1,
    run_processbench,
    two_group_threshold,
)


def item(id: str, steps: tuple[str, ...], label: int, problem: str = "What is 1+1?") -> ProcessBenchItem:
    return ProcessBenchItem(id=id, subset="toy", problem=problem, steps=steps, label=label,
                            final_answer_correct=label == -1, generator="hand")


TOY = [
    item("toy-0", ("1 + 1 = 2", "The answer is 2"), -1),
    item("toy-1", ("1 + 1 = 3", "The answer is 3"), 0),
    item("toy-2", ("1 = 1", "1 + 1 = 3", "The answer is 3"), 1),
]


class Constant:
    """Every step gets the same score: 1.0 finds no error anywhere."""

    def __init__(self, value: float) -> None:
        self.value = value

    def score(self, questions, steps_per_question):
        return [[self.value] * len(steps) for steps in steps_per_question]


def load_all() -> dict[str, list[ProcessBenchItem]]:
    return {s: load_problems(f"processbench:{s}") for s in SUBSETS}


# ------------------------------------------------------------------ predicted_first_error


def test_predicted_first_error_is_the_first_step_strictly_below_threshold():
    assert predicted_first_error([0.9, 0.4, 0.1], 0.5) == 1
    assert predicted_first_error([0.2, 0.9], 0.5) == 0
    assert predicted_first_error([0.9, 0.8], 0.5) == -1
    # A score equal to the threshold is not an error; just below it is.
    assert predicted_first_error([0.5, 0.5], 0.5) == -1
    assert predicted_first_error([0.5, 0.4999], 0.5) == 1


def test_predicted_first_error_rejects_nan():
    with pytest.raises(ValueError, match="step 1 is NaN"):
        predicted_first_error([0.9, float("nan")], 0.5)



def test_best_threshold_by_hand():
    # Solution A is right; B's first error is step 1; C's is step 0.
    scores = [[0.30, 0.25], [0.40, 0.10, 0.05], [0.20, 0.35]]
    labels = [-1, 1, 0]
    # A needs t <= 0.25, B needs 0.10 < t <= 0.40, C needs 0.20 < t <= inf. No t gets all three:
    # t in (0.20, 0.25] gets A, B, C; the midpoint candidate there is (0.20 + 0.25) / 2.
    assert best_threshold(scores, labels) == pytest.approx(0.225)
    # The oracle's 0/1 scores: any t in (0, 1] is perfect, and the lowest candidate is 0.5.
    assert best_threshold([[1.0, 1.0], [1.0, 0.0]], [-1, 1]) == pytest.approx(0.5)
    # F1 needs both kinds of solution.
    assert best_threshold([[0.3], [0.2]], [-1, -1]) is None
    with pytest.raises(ValueError, match="2 solutions but 1 labels"):
        best_threshold([[0.3], [0.2]], [-1])


def test_best_threshold_is_the_best_of_a_brute_force_search():
    import random

    rng = random.Random(0)
    for _ in range(200):
        scores = [[round(rng.random(), 2) for _ in range(rng.randint(1, 5))] for _ in range(rng.randint(2, 10))]
        labels = [rng.choice([-1, *range(len(s))]) for s in scores]
        t = best_threshold(scores, labels)
        if t is None:
            continue

        def f1(th):
            return processbench_f1(labels, [predicted_first_error(s, th) for s in scores])["f1"]

        grid = [i / 1000 for i in range(1001)]
        assert f1(t) >= max(f1(g) for g in grid) - 1e-9

def test_two_group_threshold_by_hand():
    # Groups {0.1, 0.2} and {0.8, 0.9}: the cut between them, whatever the labels would say.
    assert two_group_threshold([0.9, 0.1, 0.8, 0.2]) == pytest.approx(0.5)
    # A tight group near the ceiling and a spread group below it (a good PRM on right and wrong
    # steps): the cut falls under the tight group, not in the middle of the range.
    # Between 0.2 and 0.42: 4 x 30 x (0.4367 - 0.09)^2 = 14.4 beats the cut at 0.15 (3 x 31 x 0.376^2 = 13.1).
    assert two_group_threshold([0.01, 0.05, 0.1, 0.2] + [0.42, 0.44, 0.45] * 10) == pytest.approx(0.31)
    assert two_group_threshold([0.5, 0.5]) is None and two_group_threshold([]) is None
    with pytest.raises(ValueError, match="NaN"):
        two_group_threshold([0.3, float("nan")])


def test_two_group_threshold_is_the_best_cut_of_a_brute_force_search():
    import random

    rng = random.Random(1)
    for _ in range(200):
        scores = [round(rng.random(), 2) for _ in range(rng.randint(2, 12))]
        t = two_group_threshold(scores)
        if t is None:
            assert len(set(scores)) == 1
            continue

        def between(th):
            low, high = [x for x in scores if x < th], [x for x in scores if x >= th]
            return len(low) * len(high) * (sum(high) / len(high) - sum(low) / len(low)) ** 2 if low and high else 0

        cuts = sorted(set(scores))
        assert between(t) >= max(between((a + b) / 2) for a, b in zip(cuts, cuts[1:])) - 1e-12
        assert t in {(a + b) / 2 for a, b in zip(cuts, cuts[1:])}

def test_processbench_f1_by_hand():
    labels = [2, 0, 3, -1, -1]
    preds = [2, 0, -1, -1, 1]
    # Erroneous (label != -1): 3 solutions, exact matches at labels 2 and 0 -> 2/3 = 66.667%.
    # Correct (label == -1): 2 solutions, one predicted -1 -> 1/2 = 50%.
    # F1 = 2 * 66.667 * 50 / (66.667 + 50) = 6666.67 / 116.667 = 57.143.
    m = processbench_f1(labels, preds)
    assert m["error_acc"] == pytest.approx(66.6667, abs=1e-3)
    assert m["correct_acc"] == pytest.approx(50.0)
    assert m["f1"] == pytest.approx(57.1429, abs=1e-3)
    assert (m["n_erroneous"], m["n_correct"]) == (3, 2)


def test_processbench_f1_needs_the_exact_index():
    # Flagging a step after (or before) the true first error is a miss, not partial credit.
    m = processbench_f1([1, 1], [2, 0])
    assert m["error_acc"] == 0.0
    assert m["correct_acc"] is None


def test_processbench_f1_is_zero_when_both_accuracies_are_zero():
    m = processbench_f1([0, -1], [-1, 0])
    assert (m["error_acc"], m["correct_acc"], m["f1"]) == (0.0, 0.0, 0.0)


def test_processbench_f1_empty_group_gives_none():
    m = processbench_f1([-1, -1], [-1, 0])
    assert m["error_acc"] is None and m["f1"] is None
    assert m["correct_acc"] == 50.0
    assert (m["n_erroneous"], m["n_correct"]) == (0, 2)


def test_processbench_f1_length_mismatch():
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        processbench_f1([0, -1], [0])


# ------------------------------------------------------------------ oracle


def test_oracle_scores_steps_before_the_label():
    oracle = ProcessBenchOracle(TOY)
    scores = oracle.score([it.problem for it in TOY], [list(it.steps) for it in TOY])
    assert scores == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0, 0.0]]


def test_oracle_rejects_an_unknown_solution():
    oracle = ProcessBenchOracle(TOY)
    with pytest.raises(ValueError, match="does not know the solution to 'What is 1\\+1\\?'"):
        oracle.score(["What is 1+1?"], [["1 + 1 = 4"]])


def test_oracle_on_real_data_is_perfect(data_dir):
    items = load_all()
    report = evaluate_scorer(ProcessBenchOracle([it for v in items.values() for it in v]), items,
                             threshold=0.5, batch_size=64, progress=lambda _: None)
    for name in SUBSETS:
        m = report["subsets"][name]
        assert (m["error_acc"], m["correct_acc"], m["f1"]) == (100.0, 100.0, 100.0), name
        assert m["n_items"] == len(items[name])
    assert report["average_f1"] == 100.0


def test_all_right_scorer_on_real_data_finds_no_error(data_dir):
    items = load_all()
    report = evaluate_scorer(Constant(1.0), items, threshold=0.5, batch_size=64, progress=lambda _: None)
    for name in SUBSETS:
        m = report["subsets"][name]
        n_erroneous = sum(it.label != -1 for it in items[name])
        assert (m["n_erroneous"], m["n_correct"]) == (n_erroneous, len(items[name]) - n_erroneous)
        assert n_erroneous > 0 and m["n_correct"] > 0
        assert (m["error_acc"], m["correct_acc"], m["f1"]) == (0.0, 100.0, 0.0), name
    assert report["average_f1"] == 0.0


# ------------------------------------------------------------------ evaluate_scorer


def test_evaluate_scorer_keeps_per_item_predictions_and_reports_progress():
    lines: list[str] = []
    report = evaluate_scorer(ProcessBenchOracle(TOY), {"toy": TOY}, threshold=0.5, batch_size=2,
                             progress=lines.append)
    assert report["predictions"]["toy"] == [
        {"id": "toy-0", "label": -1, "predicted": -1},
        {"id": "toy-1", "label": 0, "predicted": 0},
        {"id": "toy-2", "label": 1, "predicted": 1},
    ]
    assert report["threshold"] == 0.5
    assert lines and lines[-1].startswith("[processbench] toy: 3/3 solutions")


def test_evaluate_scorer_average_is_none_when_a_subset_has_no_correct_solution():
    report = evaluate_scorer(Constant(0.0), {"toy": TOY, "errs": TOY[1:]}, 0.5, 8, progress=lambda _: None)
    assert report["subsets"]["errs"]["f1"] is None
    assert report["subsets"]["toy"]["f1"] is not None
    assert report["average_f1"] is None


def test_evaluate_scorer_rejects_wrong_number_of_scores():
    class DropsLastStep:
        def score(self, questions, steps_per_question):
            return [[1.0] * (len(steps) - (len(steps) == 3)) for steps in steps_per_question]

    with pytest.raises(ValueError, match="toy-2 has 3 steps but got 2 scores"):
        evaluate_scorer(DropsLastStep(), {"toy": TOY}, 0.5, 8, progress=lambda _: None)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, r"^threshold: must be in \[0, 1\], got 1.5"),
        ({"subsets": ["gsm8k", "aime"]}, r"^subsets: unknown subset 'aime'"),
        ({"subsets": []}, r"^subsets: give at least one"),
        ({"limit": 0}, r"^limit: must be >= 1"),
        ({"batch_size": 0}, r"^batch_size: must be >= 1"),
        ({"prm": "none"}, r"^prm: ProcessBench needs a PRM"),
        ({"prm": None}, r"^prm: ProcessBench needs a PRM"),
        ({"prm": ""}, r"^prm: give none, oracle, a PRM directory or KIND:DIR"),
        ({"prm": "prm:"}, r"^prm: 'prm:' names no directory"),
    ],
)
def test_config_validation_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProcessBenchConfig(**kwargs)


def test_config_from_overrides():
    cfg = load_config(ProcessBenchConfig, None, ["prm=oracle", "subsets=gsm8k,math"])
    assert (cfg.prm, cfg.subsets) == ("oracle", ["gsm8k", "math"])
    with pytest.raises(ConfigError, match="subsets: unknown subset 'mmlu'"):
        load_config(ProcessBenchConfig, None, ["subsets=gsm8k,mmlu"])


# ------------------------------------------------------------------ run_processbench


def test_run_processbench_oracle_writes_the_report(data_dir, tmp_path):
    out = tmp_path / "eval" / "pb.json"
    cfg = ProcessBenchConfig(prm="oracle", limit=5, out=str(out))
    report = run_processbench(cfg)
    written = json.loads(out.read_text())
    assert written == report
    assert set(written["subsets"]) == set(SUBSETS)
    for name in SUBSETS:
        assert written["subsets"][name]["n_items"] == 5
        assert len(written["predictions"][name]) == 5
    assert (written["backend"], written["prm"], written["threshold"], written["limit"]) == ("oracle", None, 0.5, 5)
    table = format_processbench(written)
    assert table.splitlines()[0].split() == ["subset", "error", "acc", "correct", "acc", "F1", "n"]
    assert "gsm8k" in table and "average" in table
