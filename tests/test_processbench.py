from __future__ import annotations

import json

import pytest

from mathprm.config import ConfigError, load_config
from mathprm.data.problems import ProcessBenchItem, load_problems
from mathprm.eval.processbench import (
    SUBSETS,
    ProcessBenchConfig,
    ProcessBenchOracle,
    balanced_sample,
    best_threshold,
    evaluate_scorer,
    format_processbench,
    predicted_first_error,
    processbench_f1,
    run_processbench,
    two_group_threshold,
)
from mathprm.scorer import TooLongError, default_threshold, parse_prm


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


# ------------------------------------------------------------------ limit: a balanced, seeded sample


def test_balanced_sample_takes_both_kinds_by_seed(data_dir):
    items = load_problems("processbench:gsm8k")
    assert all(it.label != -1 for it in items[:40])  # why the first N will not do

    def ids(limit, seed, pool=items):
        return [it.id for it in balanced_sample(pool, limit, seed)]

    chosen = balanced_sample(items, 6, seed=0)
    assert sorted(it.label == -1 for it in chosen) == [False] * 3 + [True] * 3
    assert ids(6, 0) == ids(6, 0)  # the same seed draws the same ids
    assert ids(6, 1) != ids(6, 0)
    assert ids(6, 0) == [it.id for it in items if it.id in set(ids(6, 0))]  # in the file's order
    assert sum(it.label == -1 for it in balanced_sample(items, 7, 0)) == 3  # the odd one is erroneous
    assert ids(len(items) + 5, 0) == [it.id for it in items]
    # Fewer correct solutions than half: all of them, and erroneous ones for the rest.
    few = [it for it in items if it.label != -1][:10] + [it for it in items if it.label == -1][:2]
    assert sum(it.label == -1 for it in balanced_sample(few, 8, 0)) == 2 and len(ids(8, 0, few)) == 8


def test_run_processbench_limit_gives_an_f1_in_every_subset(data_dir, tmp_path):
    def run(seed):
        report = run_processbench(ProcessBenchConfig(prm="oracle", limit=4, seed=seed, out=str(tmp_path / "pb.json")))
        return report, {name: [p["id"] for p in preds] for name, preds in report["predictions"].items()}

    report, ids = run(0)
    for name in SUBSETS:
        m = report["subsets"][name]
        assert (m["n_erroneous"], m["n_correct"], m["f1"]) == (2, 2, 100.0), name
    assert report["average_f1"] == 100.0 and report["seed"] == 0
    assert "-" not in format_processbench(report).split()
    assert run(0)[1] == ids
    assert all(run(1)[1][name] != ids[name] for name in SUBSETS)


# ------------------------------------------------------------------ solutions longer than the context


class RefusesLong:
    """Refuses (TooLongError) any solution of more than two steps, as a published PRM refuses
    one longer than its context; scores the others 1.0 per step."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, questions, steps_per_question):
        self.calls.append(len(questions))
        for i, steps in enumerate(steps_per_question):
            if len(steps) > 2:
                raise TooLongError(f"solution {i} is too long", i, 10 * len(steps), 20)
        return [[1.0] * len(steps) for steps in steps_per_question]


def test_a_solution_longer_than_the_context_is_skipped_and_counted():
    lines: list[str] = []
    items = [TOY[2], TOY[0], TOY[1]]
    scorer = RefusesLong()
    report = evaluate_scorer(scorer, {"toy": items}, 0.5, 3, progress=lines.append)
    assert scorer.calls == [3, 2]  # the refused one left the batch; the rest was scored again
    assert report["predictions"]["toy"] == [{"id": "toy-0", "label": -1, "predicted": -1},
                                            {"id": "toy-1", "label": 0, "predicted": -1}]
    assert report["skipped"] == {"toy": ["toy-2"]} and report["skipped_too_long"] == 1
    m = report["subsets"]["toy"]
    assert (m["n_items"], m["skipped_too_long"], m["n_erroneous"], m["n_correct"]) == (2, 1, 1, 1)
    assert lines[0] == "[processbench] toy: skipped toy-2: 30 tokens, longer than the PRM's context of 20"
    assert "skipped 1 solutions longer than the PRM's context" in format_processbench(report)
    # Every solution of a subset refused: nothing to measure, and no call with an empty batch.
    report = evaluate_scorer(RefusesLong(), {"toy": [TOY[2], TOY[2]]}, 0.5, 2, progress=lambda _: None)
    assert report["subsets"]["toy"]["f1"] is None and report["skipped_too_long"] == 2


# ------------------------------------------------------------------ published PRMs on ProcessBench


def _with_context(path, n: int):
    """The tiny PRM in `path` declaring a context of `n` tokens (its rotary positions take any)."""
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(config | {"max_position_embeddings": n}))
    return path


@pytest.mark.parametrize("kind", ["qwen", "math_shepherd", "rlhflow", "skywork"])
def test_run_processbench_with_each_published_kind(data_dir, tmp_path, kind, monkeypatch):
    from mathprm.eval import processbench
    from tests.tiny_models import BUILDERS

    path = _with_context(BUILDERS[kind](tmp_path / kind), 4096)  # every sampled solution fits
    seen: list[list[float]] = []
    predict = processbench.predicted_first_error
    monkeypatch.setattr(processbench, "predicted_first_error", lambda s, t: seen.append(list(s)) or predict(s, t))
    report = run_processbench(ProcessBenchConfig(prm=f"{kind}:{path}", subsets=["gsm8k"], limit=4, batch_size=3,
                                                 out=str(tmp_path / "pb.json")))
    assert (report["backend"], report["threshold"]) == (kind, default_threshold(parse_prm(f"{kind}:{path}"))) == \
        (kind, 0.5)
    steps = {it.id: len(it.steps) for it in load_problems("processbench:gsm8k")}
    preds = report["predictions"]["gsm8k"]
    assert len(preds) == 4 and report["skipped_too_long"] == 0
    assert all(-1 <= p["predicted"] < steps[p["id"]] for p in preds)
    assert sorted(map(len, seen)) == sorted(steps[p["id"]] for p in preds)
    assert all(0.0 <= x <= 1.0 for s in seen for x in s)
    m = report["subsets"]["gsm8k"]
    assert (m["n_erroneous"], m["n_correct"]) == (2, 2)
    assert all(isinstance(m[k], float) for k in ("error_acc", "correct_acc", "f1"))
    assert isinstance(report["average_f1"], float)


def test_run_processbench_skips_what_a_published_prm_cannot_read(data_dir, tmp_path, capsys):
    from mathprm.scorer import load_scorer
    from tests.tiny_models import build_qwen_prm

    context = 600
    path = _with_context(build_qwen_prm(tmp_path / "qwen"), context)
    cfg = ProcessBenchConfig(prm=f"qwen:{path}", subsets=["gsm8k"], limit=6, out=str(tmp_path / "pb.json"))
    report = run_processbench(cfg)
    scorer = load_scorer("qwen", str(path), device="cpu")
    sample = balanced_sample(load_problems("processbench:gsm8k"), 6, 0)
    too_long = [it.id for it in sample if len(scorer.encode(it.problem, list(it.steps))[0]) > context]
    assert 0 < len(too_long) < 6  # the context lets some through, not all
    assert report["skipped"]["gsm8k"] == too_long and report["skipped_too_long"] == len(too_long)
    assert report["subsets"]["gsm8k"]["n_items"] == 6 - len(too_long) == len(report["predictions"]["gsm8k"])
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if " skipped " in line]
    assert [line.split()[3].rstrip(":") for line in skips] == too_long
    assert all(line.endswith(f"longer than the PRM's context of {context}") for line in skips)
    assert json.loads((tmp_path / "pb.json").read_text())["skipped_too_long"] == len(too_long)


# ------------------------------------------------------------------ a mathprm PRM cut at another separator


def test_a_prior_saved_with_another_separator_is_one_line_not_a_traceback(data_dir, tmp_path, capsys):
    from mathprm.cli import main
    from tests.tiny_models import build_math_shepherd_prm

    base = build_math_shepherd_prm(tmp_path / "base")  # any causal LM can be the prior's base
    assert main(["prm-prior", f"base={base}", f"out_dir={tmp_path / 'nl'}"]) == 0  # "\n", the arith world's
    run = ["processbench", "subsets=gsm8k", "limit=2", f"out={tmp_path / 'pb.json'}"]
    capsys.readouterr()
    assert main([*run, f"prm={tmp_path / 'nl'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"mathprm processbench: prm: {tmp_path / 'nl'} was trained on steps separated by '\\n', "
                          "but ProcessBench's steps are separated by '\\n\\n': use a PRM saved with separator=")
    # Saved with ProcessBench's separator, the same prior runs.
    assert main(["prm-prior", f"base={base}", f"out_dir={tmp_path / 'nn'}", 'separator="\\n\\n"']) == 0
    assert main([*run, f"prm={tmp_path / 'nn'}"]) == 0
    assert json.loads((tmp_path / "pb.json").read_text())["subsets"]["gsm8k"]["n_items"] == 2
