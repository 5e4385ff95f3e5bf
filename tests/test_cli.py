"""The `mathprm` command and the jobs: clean errors, real runs against the shared Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mathprm.cli import main

from .conftest import REPO


def test_grade_command(capsys):
    assert main(["grade", "\\dfrac{1}{2}", "0.5"]) == 0
    assert capsys.readouterr().out.strip() == "equivalent"
    assert main(["grade", "3", "4"]) == 1


def test_unknown_command_and_bad_args(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert main(["grade", "1"]) == 2
    assert main(["check-data", "limit=zero"]) == 2
    assert "'limit'" in capsys.readouterr().err
    assert main(["--help"]) == 0


def _run(args: list[str], cwd, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_bad_input_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "x"}\n')
    r = _run([sys.executable, "-m", "mathprm.cli", "check-data", f"datasets=[{bad}]"], tmp_path)
    assert r.returncode == 2, r.stderr
    assert "bad.jsonl:1: field 'answer'" in r.stderr and "Traceback" not in r.stderr
    r = _run([sys.executable, "-m", "mathprm.cli", "check-data", "--config", str(tmp_path / "none.yaml")], tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.ray
def test_job_script_runs_on_existing_cluster(ray_cluster, tmp_path):
    """`python jobs/check_data.py` joins a running cluster through RAY_ADDRESS, as under `ray job submit`."""
    r = _run(
        [sys.executable, str(REPO / "jobs" / "check_data.py"), "--config", str(REPO / "jobs/configs/check_data.yaml"),
         "datasets=[sample:gsm8k, arith:easy]", "limit=20", f"out_dir={tmp_path}"],
        tmp_path,
        {"RAY_ADDRESS": ray_cluster["address"]},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| sample:gsm8k | 20 | 20 |" in r.stdout and "| arith:easy | 20 | 20 |" in r.stdout
    assert json.loads((tmp_path / "arith_easy" / "summary.json").read_text())["equivalent"] == 20


@pytest.mark.ray
def test_demo_runs_every_stage_small(ray_cluster, tmp_path, monkeypatch, capsys):
    """The whole demo at toy sizes: data check (bundled samples), SFT, evaluation; then reuse."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path / "nowhere"))
    args = ["data.limit=10", "sft.preset=test", "sft.num_problems=64", "sft.batch_size=8", "sft.max_steps=10",
            "sft.log_every=5", "sft.checkpoint_every=10", "sft.time_budget_min=null", "eval.limit=3",
            "eval.strategies=greedy,majority@2,pass@2", "eval.max_solution_tokens=24", "mcts.limit=2",
            "mcts.num_solutions=2", "mcts.rollouts_per_step=2", "mcts.max_solution_tokens=24", "mcts.num_actors=1",
            "prm.epochs=1", "prm.batch_size=1", "prm.num_workers=1", "prm.val_fraction=0", "prm.log_every=1",
            "prm.eval_every=1", "prm.checkpoint_every=1", "prm_eval.limit=2", "prm_eval.n=2",
            "prm_eval.max_solution_tokens=24", "search.limit=2", "search.max_solution_tokens=24",
            "search.max_steps=3", "search.max_step_tokens=12",
            "search.strategies=greedy,majority@1,majority@2,best_of_n@2,guided@1,guided@2,beam@2,dvts@2",
            "ppo.updates=2", "ppo.num_problems=20", "ppo.prompts_per_update=2", "ppo.group_size=2",
            "ppo.minibatch_size=4", "ppo.eval_problems=2", "ppo.max_step_tokens=12", "ppo.max_solution_tokens=24",
            "ppo.cpus_per_worker=1"]
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    assert "bundled with mathprm" in out
    assert "| sample:math500 | 10 | 10 |" in out
    assert (tmp_path / "runs/demo/data_check/sample_gsm8k/summary.json").exists()
    assert (tmp_path / "runs/arith/policy/sft_summary.json").exists()
    report = json.loads((tmp_path / "runs/arith/eval/policy_arith_hard.json").read_text())
    assert set(report["strategies"]) == {"greedy", "majority@2", "pass@2"}
    assert report["n_problems"] == 3
    for name in ("greedy", "majority@2", "pass@2"):
        assert name in out
    summary = json.loads((tmp_path / "runs/arith/mcts/summary.json").read_text())
    assert (summary["problems"], summary["searched_this_run"], summary["dataset"]) == (2, 2, "arith:hard")
    assert "[demo] 4/7 step labels" in out and "[demo] 5/7 the PRM" in out and "[demo] 6/7 PRM-guided" in out
    assert (tmp_path / "runs/arith/prm/prm_config.json").exists()
    prm_report = json.loads((tmp_path / "runs/arith/prm_eval.json").read_text())
    assert prm_report["n_problems"] == 2 and {"step_auroc", "first_error_f1", "best_of_n@2", "majority@2"} <= set(
        prm_report)
    assert "first-error F1" in out
    search = json.loads((tmp_path / "runs/arith/eval.json").read_text())
    assert set(search["strategies"]) == {"greedy", "majority@1", "majority@2", "best_of_n@2", "guided@1", "guided@2",
                                         "beam@2", "dvts@2"}
    assert search["prm"] == str((tmp_path / "runs/arith/prm").resolve()) or search["prm"].endswith("runs/arith/prm")
    assert (tmp_path / "runs/arith/accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    assert "guided@2" in out and "accuracy vs N" in out
    assert "[demo] 7/7 PPO" in out and "PPO policy" in out
    ppo_summary = json.loads((tmp_path / "runs/arith/policy-ppo/ppo_summary.json").read_text())
    assert ppo_summary["updates"] == 2 and ppo_summary["config"]["prm"].endswith("runs/arith/prm")
    ppo_eval = json.loads((tmp_path / "runs/arith/eval/policy_ppo_arith_hard.json").read_text())
    assert ppo_eval["n_problems"] == 3 and ppo_eval["policy"].endswith("policy-ppo")
    # Second run: the policy, the labels, the PRM and the PPO policy are reused, not made again.
    assert main(["demo", *args]) == 0
    out = capsys.readouterr().out
    assert "reusing the finished policy" in out and "2 already labelled" in out and "reusing the finished PRM" in out
    assert f"reusing the finished policy in {(tmp_path / 'runs/arith/policy-ppo').resolve()}" in out


def test_demo_rejects_an_unprefixed_argument(capsys):
    assert main(["demo", "limit=10"]) == 2
    assert "eval.limit=50" in capsys.readouterr().err
