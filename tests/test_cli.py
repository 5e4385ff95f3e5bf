"""The `mathprm` command and the jobs: clean errors, real runs against the shared Ray cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_an_input_error_raised_in_a_ray_worker_is_its_own_line_and_a_bug_is_not_one():
    """Ray hands a task's error back as `RayTaskError(cause)` and an actor's constructor error as
    an `ActorDiedError` that keeps only the worker's traceback text; both print the one line of
    the error inside. Built here as Ray builds them (no cluster needed)."""
    import traceback

    from ray.exceptions import ActorDiedError, RayTaskError

    from mathprm.cli import input_error
    from mathprm.models import ModelLoadError, loading

    line = "/models/p: the model there does not load (RuntimeError: size mismatch for mlp.up_proj); repair or replace"
    try:
        with loading("/models/p"):
            raise RuntimeError("size mismatch\nfor mlp.up_proj")
    except ModelLoadError as e:
        error, text = e, "ray::MapWorker(MapBatches(Expander)).__init__()\n" + traceback.format_exc()
    assert str(error).startswith(line)
    task = RayTaskError("Expander.__call__", text, error)
    assert input_error(task.as_instanceof_cause()).startswith(line)
    died = ActorDiedError(RayTaskError("Expander.__init__", text, error, actor_id="ab" * 16))
    assert input_error(died).startswith(line) and "\n" not in input_error(died)
    assert input_error(RuntimeError("a bug")) is None  # printed with its traceback
    assert input_error(ActorDiedError()) is None  # a dead node, not the input


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
        [sys.executable, str(REPO / "jobs" / "check_data.py"), "--config", str(REPO / "mathprm/configs/check_data.yaml"),
         "datasets=[sample:gsm8k, arith:easy]", "limit=20", f"out_dir={tmp_path}"],
        tmp_path,
        {"RAY_ADDRESS": ray_cluster["address"]},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| sample:gsm8k | 20 | 20 |" in r.stdout and "| arith:easy | 20 | 20 |" in r.stdout
    assert json.loads((tmp_path / "arith_easy" / "summary.json").read_text())["equivalent"] == 20


@pytest.mark.ray
def test_quick_demo_runs_every_stage_writes_the_report_then_reuses_everything(ray_cluster, tmp_path, monkeypatch,
                                                                              capsys):
    """`make demo QUICK=1`: every stage tiny under runs/quick (bundled samples), then a rerun that
    reuses every stage."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path / "nowhere"))
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    root = tmp_path / "runs/quick"
    assert "bundled with mathprm" in out
    assert "| sample:math500 | 10 | 10 |" in out
    assert (root / "data_check/sample_gsm8k/summary.json").exists()
    assert (root / "policy/sft_summary.json").exists() and not (tmp_path / "runs/arith").exists()
    report = json.loads((root / "eval/policy_arith_hard.json").read_text())
    assert set(report["strategies"]) == {"greedy", "majority@2", "pass@2"} and report["n_problems"] == 3
    summary = json.loads((root / "mcts/summary.json").read_text())
    assert (summary["problems"], summary["searched_this_run"], summary["dataset"]) == (2, 2, "arith:hard")
    for n, title in enumerate(["data check", "base policy", "the checker", "evaluating the base policy", "step labels",
                               "the PRM", "PRM-guided", "PPO"], 1):
        assert f"[demo] {n}/8 {title}" in out
    checker = json.loads((root / "checker/sft_summary.json").read_text())
    assert checker["config"]["init_from"] == str((root / "policy").resolve())
    assert (root / "prm/prm_config.json").exists()
    prm_base = json.loads((root / "prm/prm_summary.json").read_text())["config"]["base"]
    assert Path(prm_base).resolve() == (root / "checker").resolve()
    prm_report = json.loads((root / "prm_eval.json").read_text())
    assert prm_report["n_problems"] == 2 and {"step_auroc", "first_error_f1", "best_of_n@2", "majority@2"} <= set(
        prm_report)
    search = json.loads((root / "eval.json").read_text())
    assert set(search["strategies"]) == {"greedy", "majority@1", "majority@2", "best_of_n@2", "guided@1", "guided@2",
                                         "beam@2", "dvts@2"}
    assert search["prm"].endswith("runs/quick/prm")
    assert (root / "accuracy_vs_n.png").read_bytes()[:4] == b"\x89PNG"
    ppo_summary = json.loads((root / "policy-ppo/ppo_summary.json").read_text())
    assert ppo_summary["updates"] == 2 and ppo_summary["config"]["prm"].endswith("runs/quick/prm")
    ppo_eval = json.loads((root / "eval/policy_ppo_arith_hard.json").read_text())
    assert ppo_eval["n_problems"] == 3 and ppo_eval["policy"].endswith("policy-ppo")
    assert "PPO policy" in out and "| **total** |" in out
    md = (root / "report.md").read_text()
    for part in ("## Stage times", "## 1. Data check", "## 6. The PRM", "![accuracy vs N](accuracy_vs_n.png)",
                 "![PPO curves](policy-ppo/ppo_curves.png)"):
        assert part in md, part
    # Second run: every stage is reused, none is made again.
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "reusing the finished policy" in out and "2 already labelled" in out and "reusing the finished PRM" in out
    assert f"reusing the finished policy in {(root / 'policy-ppo').resolve()}" in out
    assert out.count("(same settings and models)") == 4  # the four evaluations
    timing = out[out.index("| stage | minutes |"):]
    assert timing.count("| reused |") == 7  # all but the data check, which has its own reuse line


def test_the_demo_names_a_damaged_cached_report_and_evaluates_again(tmp_path, capsys):
    from mathprm.demo import _reused_report
    from mathprm.labels.treesearch import TreeSearchConfig

    out, cfg, runs = tmp_path / "eval.json", TreeSearchConfig(), []

    def run() -> dict:
        runs.append(1)
        out.write_text(json.dumps({"accuracy": 0.5}))
        return {"accuracy": 0.5}

    assert _reused_report(out, cfg, [], run) == ({"accuracy": 0.5}, False)
    assert _reused_report(out, cfg, [], run) == ({"accuracy": 0.5}, True) and len(runs) == 1
    out.write_text('{"accur')  # cut short
    assert _reused_report(out, cfg, [], run) == ({"accuracy": 0.5}, False) and len(runs) == 2
    assert f"[demo] {out} is not a readable JSON object" in capsys.readouterr().out


def test_demo_rejects_an_unprefixed_argument(capsys):
    assert main(["demo", "limit=10"]) == 2
    assert "eval.limit=50" in capsys.readouterr().err
    assert main(["demo", "--quick", "ppo.updates"]) == 2
