from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("scale_model", REPO / "benchmarks" / "scale_model.py")
sm = importlib.util.module_from_spec(_spec)
sys.modules["scale_model"] = sm  # dataclasses look their module up by name
_spec.loader.exec_module(sm)


def _mode(rollout_s: float, eps: float) -> dict:
    return {"episodes_per_s": eps, "tokens_per_s": 100 * eps, "rollout_s_per_update": rollout_s,
            "learner_s_per_update": 1.0, "reward_s_per_update": 1.0}


def _measured(tmp_path: Path) -> Path:
    path = tmp_path / "ppo_scale.json"
    path.write_text(json.dumps({"machine": "box", "date": "2026-12-08",
                                "modes": {"in_learner": _mode(6.0, 2.0), "actors": _mode(3.0, 3.0)}}))
    return path


def test_labelling_gpu_hours_are_linear_in_steps_and_follow_the_measured_ratio():
    one = sm.labelling_gpu_hours("7B", "omegaprm", steps=1e6)
    assert sm.labelling_gpu_hours("7B", "omegaprm", steps=3e6) == pytest.approx(3 * one)
    # by hand: 1M x (72.4 / 8.75) rollouts x 400 tokens / (8,088 tok/s x 0.69) / 3600 s
    assert one == pytest.approx(1e6 * (72.4 / 8.75) * 400 / (8088 * 0.69) / 3600)
    assert sm.labelling_gpu_hours("72B", "omegaprm") > 9 * one  # ~9x slower decode per GPU


def test_ppo_gpu_hours_are_linear_in_updates():
    plan = sm.colocated_plan("7B", 8, "full")
    assert plan.gpu_hours_per_1k(8) == pytest.approx(8 * plan.update_s * 1000 / 3600)
    assert plan.update_s == pytest.approx(plan.rollout_s + plan.reward_s + plan.learner_s + plan.sync_s
                                          + sm.SWITCH_S.value)


def test_72b_full_fine_tune_does_not_fit_colocated_on_one_node():
    resident, tp = sm.colocated_memory("72B", 8, "full")
    assert tp is None and resident == pytest.approx(20 * 72e9 / 8 / 1e9)  # 180 GB a GPU
    assert sm.colocated_plan("72B", 8, "full") is None and sm.separate_plan("72B", 8, "full") is None
    assert sm.colocated_plan("72B", 64, "full") is not None  # sharded across 8 nodes it fits
    assert sm.colocated_memory("7B", 8, "full")[1] == 1  # 7B fits on one node, tp 1
    assert sm.colocated_memory("72B", 8, "lora")[1] == 8  # LoRA fits on one node with tp-8 vLLM
    choice, why = sm.pick(None, sm.separate_plan("72B", 32, "full"), 32, "72B", "full")
    assert choice == "separate" and "does not fit" in why


def test_separate_split_respects_memory_and_uses_every_gpu():
    plan = sm.separate_plan("72B", 32, "full")
    r, w, learn = plan.split
    assert r + w + learn == 32 and r % 4 == 0 and w % 4 == 0
    assert learn >= sm.min_learner_gpus("72B", "full") == 21


def test_rollout_stops_speeding_up_at_the_weight_read_floor():
    wl = sm.Workload()
    floor = wl.response_tokens * 2 * 7e9 / (sm.HBM_TBS.value * 1e12)
    assert sm.rollout_s("7B", 64, 1, wl) == pytest.approx(floor)
    assert sm.rollout_s("7B", 2, 1, wl) > 3 * floor


def test_measured_json_overrides_the_documented_defaults(tmp_path):
    default = sm.cpu_calibration(None, None)
    assert set(default) == {"vllm_over_hf"} and "BENCHMARKS.md" in default["vllm_over_hf"].source
    path = _measured(tmp_path)
    cpu = sm.cpu_calibration(sm.load_measured(path), path)
    assert cpu["rollout_share_in_learner"].value == pytest.approx(6 / 8)
    assert cpu["actors_over_in_learner"].value == pytest.approx(1.5)
    assert all(f.kind == "measured" and "box" in f.source for f in cpu.values())
    assert "rollout_share_actors" in sm.render(cpu)


@pytest.mark.parametrize("text, says", [(None, "cannot read"), ("{", "not JSON"),
                                        ('{"modes": {"in_learner": {}}}', "missing"),
                                        ('{"modes": {"in_learner": {"episodes_per_s": "x"}}}', "not a number"),
                                        ("[1]", "not a JSON object")])
def test_bad_measured_file_is_one_line_and_exit_2(tmp_path, capsys, text, says):
    path = tmp_path / "ppo_scale.json"
    if text is not None:
        path.write_text(text)
    assert sm.main(["--measured", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and says in err


def test_write_replaces_only_the_marked_block(tmp_path, capsys):
    doc = tmp_path / "SCALING.md"
    before, after = "# Title\n\nintro\n\n", "\n\n## After\n\nkept\n"
    doc.write_text(f"{before}{sm.START}\nold table\n{sm.END}{after}")
    assert sm.main(["--write", "--doc", str(doc), "--measured", str(_measured(tmp_path))]) == 0
    text = doc.read_text()
    assert text.startswith(before + sm.START) and text.endswith(sm.END + after)
    assert "old table" not in text and "### Labelling" in text
    once = text
    assert sm.main(["--write", "--doc", str(doc), "--measured", str(_measured(tmp_path))]) == 0
    assert doc.read_text() == once  # rewriting is idempotent
    doc.write_text("no markers\n")
    capsys.readouterr()
    assert sm.main(["--write", "--doc", str(doc)]) == 2
    assert "no <!-- scale:start -->" in capsys.readouterr().err and doc.read_text() == "no markers\n"
