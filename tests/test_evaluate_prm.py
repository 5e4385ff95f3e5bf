"""`mathprm evaluate-prm`'s core: sampling, scoring and the metrics, on hand-made solutions."""

from __future__ import annotations

import pytest

from mathprm.data import arith
from mathprm.eval.prm import PRMEvalConfig, sample_and_score, summarise
from mathprm.generation import Rollout
from mathprm.scorer import ArithOracle
from mathprm.steps import StepFormat

FMT = StepFormat("\n")


class ScriptedPolicy:
    """A Generator that returns given solutions (the contract's `rollouts`, nothing sampled):
    the metrics are then known by hand."""

    def __init__(self, solutions: dict[str, list[list[str]]]) -> None:
        self.solutions, self.step_format = solutions, FMT

    def rollouts(self, prefixes, n, sampling):
        out = []
        for p in prefixes:
            sols = self.solutions[p.question][:n]
            out.append([Rollout(steps=s, text=FMT.join(s), n_tokens=len(FMT.join(s)), finished=True) for s in sols])
        return out


def _wrong(step: str) -> str:
    lhs, value = step.rsplit(" = ", 1)
    return f"{lhs} = {int(value) + 1}"


def test_the_oracle_scores_perfectly_and_best_of_n_beats_a_wrong_majority():
    problems = arith.generate("easy", 2, seed=3, split="test")
    good = [arith.solution_steps(p) for p in problems]
    # Problem 0: one right solution and two identical wrong ones (error at step 1, the wrong
    # value carried on, so both end on the same wrong answer): majority picks the wrong answer,
    # best-of-n the right one.
    g0 = good[0]
    bad0 = [g0[0], _wrong(g0[1])]
    wrong_value = bad0[1].rsplit(" = ", 1)[1]
    bad0 += [f"The answer is {wrong_value}"] if len(g0) == 3 else [f"{wrong_value} + 0 = {wrong_value}",
                                                                    f"The answer is {wrong_value}"]
    # Problem 1: three right solutions.
    policy = ScriptedPolicy({problems[0].question: [bad0, g0, bad0], problems[1].question: [good[1]] * 3})
    cfg = PRMEvalConfig(prm="oracle", dataset="arith:easy", n=3, limit=2)
    records = sample_and_score(problems, policy, ArithOracle(problems), cfg, batch_index=0)
    assert [s["first_error"] for s in records[0]["solutions"]] == [1, -1, 1]
    assert [s["correct"] for s in records[0]["solutions"]] == [False, True, False]
    report = summarise(records, 3, "min", 0.5)
    assert report["step_auroc"] == 1.0
    assert report["first_error_f1"] == 100.0
    assert report["best_of_n@3"] == 1.0  # the oracle finds the right solution of problem 0
    assert report["majority@3"] == 0.5  # the wrong answer outvotes it there
    assert report["pass@3"] == 1.0
    assert report["n_solutions"] == 6 and report["wrong_steps"] == 2 * (len(bad0) - 1)


def test_a_constant_scorer_finds_no_error_and_ranks_nothing():
    records = [{"id": "a", "gold": "1", "solutions": [
        {"steps": ["x", "y"], "scores": [0.9, 0.9], "key": "2", "correct": False, "tokens": 3, "first_error": 0},
        {"steps": ["x", "z"], "scores": [0.9, 0.9], "key": "1", "correct": True, "tokens": 3, "first_error": -1},
    ]}]
    report = summarise(records, 2, "last", 0.5)
    # No step is below the threshold: the erroneous solution is missed (0 %), the correct one
    # is right (100 %): F1 = 0. Ties go to the first solution, which is wrong.
    assert report["processbench"]["error_acc"] == 0 and report["processbench"]["correct_acc"] == 100
    assert report["first_error_f1"] == 0
    assert report["best_of_n@2"] == 0.0 and report["step_auroc"] == 0.5


@pytest.mark.parametrize("override, field", [("prm=none", "prm"), ("prm=''", "prm"),
                                             ("aggregation=max", "aggregation"),
                                             ("threshold=2", "threshold"), ("n=0", "n"),
                                             ("dataset=gsm8k", "prm")])
def test_config_errors_name_the_field(override, field):
    from mathprm.config import ConfigError, load_config

    extra = ["prm=oracle"] if override.startswith("dataset") else []
    with pytest.raises(ConfigError, match=field):
        load_config(PRMEvalConfig, None, [*extra, override])


@pytest.mark.ray
def test_on_ray_the_actor_pool_gives_the_in_process_result(ray_cluster, tiny_policy_dir, tmp_path, monkeypatch):
    """jobs/eval_prm.py's path, with a policy path relative to the driver's directory (the
    actors run elsewhere): the Ray Data actor pool gives exactly the in-process records."""
    import json

    from mathprm.eval.prm import run_prm_evaluation

    monkeypatch.chdir(tiny_policy_dir.parent)
    common = dict(prm="oracle", policy=tiny_policy_dir.name, dataset="arith:easy", limit=3, n=2,
                  batch_problems=2, max_solution_tokens=24, device="cpu")
    local = run_prm_evaluation(PRMEvalConfig(**common, out=str(tmp_path / "local.json")))
    remote = run_prm_evaluation(PRMEvalConfig(**common, use_ray=True, num_actors=1, out=str(tmp_path / "ray.json")))
    assert remote["n_solutions"] == local["n_solutions"] == 6
    assert [json.loads(x)["solutions"] for x in (tmp_path / "ray.problems.jsonl").read_text().splitlines()] == [
        json.loads(x)["solutions"] for x in (tmp_path / "local.problems.jsonl").read_text().splitlines()]


def test_the_default_threshold_is_the_one_the_prm_was_trained_with(tiny_policy_dir, tmp_path):
    from mathprm.eval.prm import run_prm_evaluation
    from mathprm.models.prm import build_prm, save_prm, saved_threshold
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.steps import StepFormat

    prm = tmp_path / "prm"
    save_prm(build_prm(str(tiny_policy_dir)), build_char_tokenizer(), StepFormat("\n"), prm,
             {"base": "tiny", "threshold": 0.125})
    assert saved_threshold(prm) == 0.125 and saved_threshold(None) == 0.5
    common = dict(prm=str(prm), policy=str(tiny_policy_dir), dataset="arith:easy", limit=1, n=1,
                  max_solution_tokens=24, device="cpu")
    assert run_prm_evaluation(PRMEvalConfig(**common, out=str(tmp_path / "a.json")))["threshold"] == 0.125
    assert run_prm_evaluation(PRMEvalConfig(**common, threshold=0.7, out=str(tmp_path / "b.json")))["threshold"] == 0.7
    oracle = run_prm_evaluation(PRMEvalConfig(**{**common, "prm": "oracle"}, out=str(tmp_path / "c.json")))
    assert oracle["threshold"] == 0.5


# ----------------------------------------------------------------------------- a published PRM


@pytest.fixture
def qwen_dir(published_prms):
    return published_prms["qwen"]


def test_a_published_prm_ranks_scripted_arith_solutions(qwen_dir, tmp_path):
    """prm=qwen:DIR through run_prm_evaluation's own scorer path, on step lists with known truth."""
    import json

    from mathprm.data.problems import load_problems
    from mathprm.eval.prm import run_prm_evaluation

    problems = load_problems("arith:easy", limit=2, seed=0)  # the ones the run loads
    good = [arith.solution_steps(p) for p in problems]
    bad = [[_wrong(g[0]), *g[1:]] for g in good]
    policy = ScriptedPolicy({p.question: [g, b] for p, g, b in zip(problems, good, bad)})
    cfg = PRMEvalConfig(prm=f"qwen:{qwen_dir}", dataset="arith:easy", limit=2, n=2, device="cpu",
                        out=str(tmp_path / "eval.json"))
    report = run_prm_evaluation(cfg, generator=policy)
    assert report["threshold"] == 0.5  # a published PRM has no saved threshold
    assert 0.0 <= report["step_auroc"] <= 1.0 and 0.0 <= report["first_error_f1"] <= 100.0
    assert report["n_solutions"] == 4 and report["wrong_steps"] > 0
    assert all(0.0 <= report[k] <= 1.0 for k in ("best_of_n@2", "majority@2", "pass@2"))
    records = [json.loads(line) for line in (tmp_path / "eval.problems.jsonl").read_text().splitlines()]
    scores = [s["scores"] for r in records for s in r["solutions"]]
    assert [len(s) for s in scores] == [len(s["steps"]) for r in records for s in r["solutions"]]
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)


def test_a_published_prm_samples_and_scores_real_math(qwen_dir, tmp_path):
    """The whole in-process path: a policy (untrained, a char tokenizer: the PRM scores its text
    with its own tokenizer all the same) samples MATH-500 solutions, cut into steps at the PRM's
    "\\n\\n" (the dataset's too); MATH has no step truth, so the step metrics are None."""
    import json

    from mathprm.eval.prm import run_prm_evaluation
    from mathprm.models.policy import build_policy
    from mathprm.models.tokenizer import build_char_tokenizer

    tokenizer, policy = build_char_tokenizer(), tmp_path / "policy"
    build_policy("tiny", tokenizer, seed=0).save_pretrained(policy)
    tokenizer.save_pretrained(policy)
    cfg = PRMEvalConfig(prm=f"qwen:{qwen_dir}", policy=str(policy), dataset="sample:math500", limit=2, n=2,
                        max_solution_tokens=24, device="cpu", out=str(tmp_path / "eval.json"))
    report = run_prm_evaluation(cfg)
    assert (report["threshold"], report["step_auroc"], report["first_error_f1"]) == (0.5, None, None)
    assert report["n_problems"] == 2 and report["n_solutions"] == 4
    assert 0.0 <= report["best_of_n@2"] <= report["pass@2"] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "eval.problems.jsonl").read_text().splitlines()]
    solutions = [s for r in records for s in r["solutions"]]
    assert any(s["steps"] for s in solutions)
    assert all(len(s["scores"]) == len(s["steps"]) and all(0.0 <= x <= 1.0 for x in s["scores"]) for s in solutions)


def test_a_separator_against_the_published_prm_s_is_one_line_naming_it(qwen_dir, model_dirs, tmp_path):
    from mathprm.eval.prm import run_prm_evaluation

    cfg = PRMEvalConfig(prm=f"qwen:{qwen_dir}", policy=str(model_dirs[0]), dataset="arith:easy", separator="\n",
                        limit=1, n=1, device="cpu", out=str(tmp_path / "eval.json"))
    with pytest.raises(ValueError, match=r"^separator: '\\n' differs from '\\n\\n', the one the PRM was trained "
                                         r"with; leave separator unset or pick another PRM$"):
        run_prm_evaluation(cfg)
    assert not (tmp_path / "eval.json").exists()
