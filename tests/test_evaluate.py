"""`mathprm evaluate`: strategies, voting, pass@k and scoring in-process; real runs on the tiny policy."""

from __future__ import annotations

import json
import math

import pytest

from mathprm.cli import main
from mathprm.config import ConfigError, parse_args
from mathprm.data import arith
from mathprm.data.answers import majority_vote
from mathprm.data.problems import Problem
from mathprm.eval.evaluate import EvalConfig, eval_strategy, run_evaluation
from mathprm.generation import Rollout
from mathprm.stats import pass_at_k
from mathprm.steps import StepFormat
from tests.conftest import MEMORISED


def test_eval_strategy():
    assert eval_strategy("greedy").k == 1
    assert eval_strategy("majority@16").kind == "majority"
    assert eval_strategy("pass@4").name == "pass@4"
    for bad in ("best", "pass@0", "pass@", "majority@x", "greedy@2"):
        with pytest.raises(ValueError, match="strategies"):
            eval_strategy(bad)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert pass_at_k(16, 0, 16) == 0.0
    assert pass_at_k(16, 1, 16) == 1.0  # n == k: "any of them"
    assert pass_at_k(10, 9, 2) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 2)


def test_majority_vote_ties_go_to_the_first_and_none_is_ignored():
    assert majority_vote(["3", None, "4", "4", "3"]) == "3"
    assert majority_vote([None, "7", "8", "8"]) == "8"
    assert majority_vote([None, None]) is None


def test_cli_style_arguments_and_list_fields():
    cfg = parse_args(EvalConfig, ["--policy", "p", "--dataset=arith:easy", "--limit", "5",
                                  "--strategies", "greedy,majority@4,pass@4", "--max-solution-tokens", "64"])
    assert (cfg.policy, cfg.dataset, cfg.limit, cfg.max_solution_tokens) == ("p", "arith:easy", 5, 64)
    assert cfg.strategies == ["greedy", "majority@4", "pass@4"]
    with pytest.raises(ConfigError, match="top@3"):
        parse_args(EvalConfig, ["--strategies", "greedy,top@3"])
    with pytest.raises(ConfigError, match="--limit needs a value"):
        parse_args(EvalConfig, ["--limit"])


class ScriptedGenerator:
    """Hands out fixed completions (a test double for the contract; the real backends run below)."""

    step_format = StepFormat("\n")
    context_length = 1 << 20

    def __init__(self, greedy: dict[str, str], samples: dict[str, list[str]]) -> None:
        self.greedy, self.samples = greedy, samples

    def room(self, prefix):
        return self.context_length

    def rollouts(self, prefixes, n, sampling):
        out = []
        for p in prefixes:
            texts = [self.greedy[p.question]] if sampling.greedy else self.samples[p.question][:n]
            assert len(texts) == n
            out.append([Rollout(t.split("\n"), t, len(t) + 1, True) for t in texts])
        return out


def test_scores_and_diagnostics_on_scripted_solutions(tmp_path):
    """Two arith problems; every number below follows from the scripted texts by hand."""
    a, b = arith.generate("easy", 2, seed=3)
    ref_a, ref_b = a.solution, b.solution
    wrong_a = ref_a.replace(f"The answer is {a.answer}", f"The answer is {int(a.answer) + 1}")
    garbage = "1 2 3"
    gen = ScriptedGenerator(
        greedy={a.question: ref_a, b.question: garbage},
        # a: 1 right of 4, majority wrong; b: 3 right of 4, one unparseable.
        samples={a.question: [wrong_a, wrong_a, ref_a, garbage], b.question: [ref_b, garbage, ref_b, ref_b]},
    )
    cfg = EvalConfig(strategies=["greedy", "majority@4", "pass@4", "pass@2"], out=str(tmp_path / "r.json"))
    report = run_evaluation(cfg, generator=gen, problems=[a, b])
    s = report["strategies"]
    assert s["greedy"]["accuracy"] == 0.5
    assert s["majority@4"]["accuracy"] == 0.5  # a votes the wrong answer, b the right one
    assert s["pass@4"]["accuracy"] == 1.0
    assert s["pass@2"]["accuracy"] == pytest.approx((0.5 + 1.0) / 2)  # a: 1 - C(3,2)/C(4,2)
    assert s["pass@2"]["samples_per_problem"] == 2
    assert s["greedy"]["generated_tokens"] == len(ref_a) + 1 + len(garbage) + 1
    assert s["pass@2"]["generated_tokens"] == 2 * (len(wrong_a) + 1) + (len(ref_b) + 1) + (len(garbage) + 1)
    sampled = report["diagnostics"]["sampled"]
    assert sampled["parseable"] == 6 / 8
    # easy = 2 operations + answer line = 3 steps. wrong_a: 2 of 3 steps right; garbage: 0 of 1.
    assert sampled["step_accuracy"] == pytest.approx((2 * 2 + 3 + 0 + 3 * 3 + 0) / (3 * 6 + 1 * 2))
    assert sampled["first_error_histogram"] == {"0": 2, "2": 2}
    assert json.loads((tmp_path / "r.json").read_text()) == report
    lines = (tmp_path / "r.problems.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [a.id, b.id]


def _memorised_problems() -> list[Problem]:
    return [Problem(id=f"m{i}", question=q, answer=s[-1].split()[-1], source="test")
            for i, (q, s) in enumerate(MEMORISED.items())]


def test_hf_backend_on_the_tiny_policy(tiny_policy_dir, tmp_path):
    cfg = EvalConfig(policy=str(tiny_policy_dir), strategies=["greedy", "pass@2"], temperature=0.5,
                     separator="\n", max_solution_tokens=48, out=str(tmp_path / "hf.json"))
    report = run_evaluation(cfg, problems=_memorised_problems())
    assert report["strategies"]["greedy"]["accuracy"] == 1.0  # memorised, graded by the real grader
    assert report["diagnostics"]["greedy"]["parseable"] == 1.0
    assert report["strategies"]["pass@2"]["n_problems"] == 2


@pytest.mark.vllm
def test_vllm_backend_agrees_on_greedy(vllm_generator, tiny_policy_dir, tmp_path):
    cfg = EvalConfig(policy=str(tiny_policy_dir), backend="vllm", strategies=["greedy", "majority@2"],
                     separator="\n", max_solution_tokens=48, out=str(tmp_path / "v.json"))
    report = run_evaluation(cfg, generator=vllm_generator, problems=_memorised_problems())
    assert report["strategies"]["greedy"]["accuracy"] == 1.0
    assert report["strategies"]["greedy"]["generated_tokens"] == sum(
        len("\n".join(s)) + 1 for s in MEMORISED.values())  # characters + EOS


def test_cli_evaluate_writes_the_report(tiny_policy_dir, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = main(["evaluate", "--policy", str(tiny_policy_dir), "--dataset", "arith:easy", "--limit", "2",
               "--strategies", "greedy,pass@2", "--max-solution-tokens", "32", "--out", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert set(report["strategies"]) == {"greedy", "pass@2"}
    assert report["strategies"]["pass@2"]["samples_per_problem"] == 2
    assert report["n_problems"] == 2
    assert "step_accuracy" in report["diagnostics"]["greedy"]
    assert "greedy" in capsys.readouterr().out


def test_cli_evaluate_bad_input_is_one_line(tmp_path, capsys):
    assert main(["evaluate", "--policy", str(tmp_path / "nope"), "--limit", "1"]) == 2
    assert "not a Hugging Face model directory" in capsys.readouterr().err
    assert main(["evaluate", "--strategies", "greedy,best@2"]) == 2
    assert "best@2" in capsys.readouterr().err


# ----------------------------------------------------------------------------- PRM strategies


def test_prm_strategies_from_the_pool_and_step_by_step_with_the_oracle(tmp_path):
    """The noisy scripted policy (right with p=0.45 per operation, greedy always wrong) and the
    exact oracle as PRM: PRM strategies must beat greedy and majority, k must help, and the
    accuracy-vs-k plot must be written."""
    from tests.test_search import NoisyArithPolicy

    problems = arith.generate("medium", 12, seed=9, split="test")
    policy = NoisyArithPolicy(problems, p_correct=0.45)
    strategies = ["greedy", "majority@8", "pass@8", "best_of_n@1", "best_of_n@8", "weighted_majority@8",
                  "guided@1", "guided@8", "dvts@8", "beam@4"]
    cfg = EvalConfig(dataset="arith:medium", strategies=strategies, prm="oracle", temperature=0.8, beam_width=2,
                     batch_problems=5, out=str(tmp_path / "e.json"))
    report = run_evaluation(cfg, generator=policy, problems=problems)  # prm=oracle: ArithOracle(problems)
    s = {name: v["accuracy"] for name, v in report["strategies"].items()}
    assert s["greedy"] == 0.0
    # An exact verifier: best_of_n@8 is right exactly when some sample is (pass@8 with n == k).
    assert s["best_of_n@8"] == s["pass@8"] > s["majority@8"]
    assert s["weighted_majority@8"] == s["pass@8"]  # wrong solutions weigh 0 under min
    assert s["guided@8"] >= 10 / 12 and s["guided@8"] > s["guided@1"] and s["dvts@8"] > s["majority@8"]
    assert s["best_of_n@1"] == pytest.approx(sum(r["samples"][0]["correct"] for r in map(
        json.loads, (tmp_path / "e.problems.jsonl").read_text().splitlines())) / 12)
    g8 = report["strategies"]["guided@8"]
    assert g8["samples_per_problem"] == 8 and g8["generated_tokens"] > report["strategies"]["guided@1"]["generated_tokens"]
    assert report["strategies"]["best_of_n@8"]["prm_scored_solutions"] == 8 * 12
    assert "prm_scored_solutions" not in report["strategies"]["majority@8"]
    plot = tmp_path / "e.accuracy_vs_n.png"
    assert report["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "e.problems.jsonl").read_text().splitlines()[0])
    assert set(record["search"]) == {"guided@1", "guided@8", "dvts@8", "beam@4"}
    assert all(len(x["scores"]) == x["steps"] for x in record["samples"])  # one score per judged step


def test_prm_strategies_need_a_prm_and_a_matching_separator(tmp_path, tiny_policy_dir):
    with pytest.raises(ConfigError, match="prm: guided@8, best_of_n@4 need a PRM"):
        parse_args(EvalConfig, ["--strategies", "greedy,guided@8,best_of_n@4"])
    with pytest.raises(ConfigError, match="strategies"):
        parse_args(EvalConfig, ["--strategies", "guided"])
    with pytest.raises(ConfigError, match="aggregation"):
        parse_args(EvalConfig, ["--aggregation", "max"])
    with pytest.raises(ConfigError, match="prm: the oracle knows only"):
        parse_args(EvalConfig, ["--prm", "oracle", "--dataset", "gsm8k", "--strategies", "guided@2"])
    with pytest.raises(ConfigError, match="beam_width"):
        parse_args(EvalConfig, ["--beam-width", "0"])
    with pytest.raises(ConfigError, match="tie_break: unknown 'last'"):
        parse_args(EvalConfig, ["--tie-break", "last"])
    cfg = EvalConfig(policy=str(tiny_policy_dir), prm=str(tmp_path / "none"), strategies=["guided@2"],
                     out=str(tmp_path / "x.json"))
    with pytest.raises((FileNotFoundError, ValueError), match="none"):
        run_evaluation(cfg)


@pytest.mark.ray
def test_on_ray_the_actor_pool_gives_the_in_process_result(ray_cluster, tiny_policy_dir, tmp_path):
    """jobs/evaluate.py's path: problems on a Ray Data actor pool (2 actors, each with the real
    hf generator and a real PRM) give exactly the in-process report."""
    from mathprm.models.prm import build_prm, save_prm
    from mathprm.models.tokenizer import build_char_tokenizer

    prm = tmp_path / "prm"
    save_prm(build_prm(str(tiny_policy_dir)), build_char_tokenizer(), StepFormat("\n"), prm, {"base": "tiny"})
    common = dict(policy=str(tiny_policy_dir), prm=str(prm), dataset="arith:easy", limit=4, batch_problems=2,
                  strategies=["greedy", "majority@2", "best_of_n@2", "guided@1", "guided@2"], max_solution_tokens=40,
                  max_step_tokens=16, max_steps=3, temperature=0.9, device="cpu")
    local = run_evaluation(EvalConfig(**common, out=str(tmp_path / "local.json")))
    remote = run_evaluation(EvalConfig(**common, use_ray=True, num_actors=2, out=str(tmp_path / "ray.json")))
    assert remote["strategies"] == local["strategies"]
    # The same records; PRM scores to float rounding (an actor's torch runs on other threads).
    ray_rows, local_rows = ([json.loads(x) for x in (tmp_path / f"{name}.problems.jsonl").read_text().splitlines()]
                            for name in ("ray", "local"))
    assert _close(ray_rows, local_rows)
    assert (tmp_path / "ray.accuracy_vs_n.png").is_file()


def _close(a, b) -> bool:
    """Equal JSON values, floats within 1e-6 (relative or absolute)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-6,
                                                                                           abs_tol=1e-6)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_close, a, b))
    return a == b
