"""The tree-search stage on Ray: config and input errors, the output files, resume, a killed
actor, metrics, and `ray job submit` against the shared local head."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mathprm.config import ConfigError, load_config
from mathprm.data import arith
from mathprm.data.problems import Problem
from mathprm.labels import steptable
from mathprm.labels.parts import PROBLEMS_KEY, committed_problems, problems_block, read_labels, write_labels_file
from mathprm.labels.stage import MCTSConfig, _Progress, finish, load_stage_problems, run_mcts
from mathprm.labels.steptable import StepLabel
from mathprm.labels.treesearch import ALL_RIGHT, TOO_LONG, SearchStats
from tests.conftest import metrics_text

from .conftest import MEMORISED, REPO


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _memorised() -> list[dict]:
    """The tiny policy's memorised questions as problem rows (it writes their solutions)."""
    return [{"question": q, "answer": steps[-1].rsplit(" ", 1)[1]} for q, steps in MEMORISED.items()]


def _config(policy, out, **kw) -> MCTSConfig:
    """A small, fast search: the tiny policy writes junk on arith, so rollouts are short-capped."""
    base = dict(policy=str(policy), dataset="arith:easy", limit=4, num_solutions=2, rollouts_per_step=2,
                max_solution_tokens=40, num_actors=1, batch_problems=2, out_dir=str(out), progress_every_s=2)
    return MCTSConfig(**{**base, **kw})


# ----------------------------------------------------------------------------- no Ray


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="'methd'"):
        load_config(MCTSConfig, REPO / "mathprm/configs/mcts_arith.yaml", ["methd=omegaprm"])
    with pytest.raises(ConfigError, match="'method'"):
        load_config(MCTSConfig, None, ["method=beam"])
    with pytest.raises(ConfigError, match="trl_export"):
        load_config(MCTSConfig, None, ["trl_export=[soft, fuzzy]"])
    with pytest.raises(ConfigError, match="rollout_budget"):
        load_config(MCTSConfig, None, ["num_solutions=8", "rollout_budget=4"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(MCTSConfig, None, ["backend=tgi"])
    with pytest.raises(ConfigError, match=r"resources_per_actor\.labeller: must be a number > 0"):
        load_config(MCTSConfig, None, ["resources_per_actor={labeller: 0}"])
    cfg = load_config(MCTSConfig, REPO / "mathprm/configs/mcts_arith.yaml", ["method=omegaprm"])
    assert (cfg.method, cfg.out_dir, cfg.split) == ("omegaprm", "runs/arith/mcts", "train")


def test_problems_without_gold_are_skipped_and_none_usable_is_an_error(tmp_path):
    rows = [{"question": "What is 1+1?", "answer": "2"}, {"question": "Prove it.", "answer": ""},
            {"question": "What is 2+3?", "answer": "5"}]
    cfg = MCTSConfig(dataset=str(_jsonl(tmp_path / "p.jsonl", rows)), limit=None)
    problems, skipped = load_stage_problems(cfg)
    assert [p.answer for p in problems] == ["2", "5"] and skipped == 1
    cfg = MCTSConfig(dataset=str(_jsonl(tmp_path / "none.jsonl", rows[1:2])), limit=None)
    with pytest.raises(ValueError, match="none of its 1 problems has a usable gold answer"):
        load_stage_problems(cfg)


def test_the_job_refuses_bad_input_in_one_line_without_a_traceback(tmp_path, tiny_policy_dir):
    data = _jsonl(tmp_path / "none.jsonl", [{"question": "Prove it.", "answer": ""}])
    r = subprocess.run([sys.executable, str(REPO / "jobs/mcts.py"), f"dataset={data}", f"policy={tiny_policy_dir}",
                        f"out_dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "none of its 1 problems has a usable gold answer" in r.stderr and "Traceback" not in r.stderr


def test_arith_labels_come_from_the_split_asked_for():
    problems, skipped = load_stage_problems(MCTSConfig(dataset="arith:medium", limit=20, seed=3))
    assert skipped == 0 and {arith.split_of(p) for p in problems} == {"train"}
    problems, _ = load_stage_problems(MCTSConfig(dataset="arith:medium", limit=20, seed=3, split="test"))
    assert {arith.split_of(p) for p in problems} == {"test"}


def _labels(pid: str, n: int) -> list[StepLabel]:
    return [StepLabel(pid, "q?", tuple(f"s{j}" for j in range(i)), f"s{i}", 0.5, 2, 1, i, "math_shepherd")
            for i in range(n)]


def test_a_block_becomes_one_atomic_parquet_file_with_its_problems_in_the_metadata(tmp_path):
    problems = [Problem(id="a", question="q?", answer="1", source="t"), Problem(id="b", question="q?", answer="2", source="t"),
                Problem(id="c", question="q?", answer="3", source="t")]
    block = problems_block([(problems[0], _labels("a", 3), SearchStats(n_rollouts=6, n_tokens=60), 1.5),
                            (problems[1], [], SearchStats(n_rollouts=2), 0.5),
                            (problems[2], _labels("c", 1), SearchStats(n_rollouts=2), 0.2)], "hf:x", 7)
    assert block.num_rows == 3  # one row per problem, the empty one included
    labels_dir = tmp_path / "labels"
    labels_dir.mkdir()
    assert write_labels_file(block, labels_dir / "part-x-00000-000.parquet") == (3, 4)
    assert [p.name for p in labels_dir.iterdir()] == ["part-x-00000-000.parquet"]  # no temporary left
    table = pq.read_table(labels_dir / "part-x-00000-000.parquet")
    assert table.schema.remove_metadata() == steptable.SCHEMA
    assert steptable.from_table(table) == _labels("a", 3) + _labels("c", 1)
    assert set(table.column("generator").to_pylist()) == {"hf:x"} and set(table.column("seed").to_pylist()) == {7}
    assert b"mathprm.problems" in table.schema.metadata  # the format's key: older runs' files still resume
    done = committed_problems(labels_dir)
    assert set(done) == {"a", "b", "c"}  # b has no labels but is done: a rerun skips it
    assert (done["a"]["n_rollouts"], done["a"]["n_labels"], done["b"]["n_labels"]) == (6, 3, 0)
    # The same problem in two files is refused, not counted twice.
    write_labels_file(block.slice(0, 1), labels_dir / "part-y-00000-000.parquet")
    with pytest.raises(ValueError, match="problem 'a' is in two files"):
        committed_problems(labels_dir)


def test_a_foreign_parquet_file_in_labels_is_refused(tmp_path):
    (tmp_path / "labels").mkdir()
    pq.write_table(steptable.SCHEMA.empty_table(), tmp_path / "labels" / "part-0.parquet")
    with pytest.raises(ValueError, match="was not written by the tree-search stage"):
        committed_problems(tmp_path / "labels")


def test_problems_without_labels_are_counted_by_reason_in_the_summary_and_the_progress_line(tmp_path):
    problems = [Problem(id=x, question="q?", answer="1", source="t") for x in "abcd"]
    block = problems_block([(problems[0], _labels("a", 2), SearchStats(n_rollouts=4), 0.1),
                            (problems[1], [], SearchStats(n_rollouts=8, no_labels=ALL_RIGHT), 0.1),
                            (problems[2], [], SearchStats(n_rollouts=8, no_labels=ALL_RIGHT), 0.1),
                            (problems[3], [], SearchStats(skipped_too_long=1, no_labels=TOO_LONG), 0.0)], "hf:x", 0)
    out = tmp_path / "mcts"
    write_labels_file(block, out / "labels" / "part-x-00000-000.parquet")
    summary = finish(_config(tmp_path / "policy", out, dataset="t.jsonl", trl_export=[]), problems, 0, set("abcd"), 1.0)
    assert summary["no_labels"] == {ALL_RIGHT: 2, TOO_LONG: 1} and summary["labels"] == 2
    assert json.loads((out / "summary.json").read_text())["no_labels"] == summary["no_labels"]
    line = _Progress(out / "labels", 4, 0, 10.0).line()
    assert line.endswith(f"; 3 without labels (2 {ALL_RIGHT}, 1 {TOO_LONG})"), line


def test_unreadable_part_files_are_named_and_repair_moves_them_aside(tmp_path):
    labels_dir = tmp_path / "labels"
    a = Problem(id="a", question="q?", answer="1", source="t")
    block = problems_block([(a, _labels("a", 3), SearchStats(), 0.1)], "hf:x", 0)
    write_labels_file(block, labels_dir / "part-a.parquet")
    good = read_labels(tmp_path)
    data = (labels_dir / "part-a.parquet").read_bytes()
    bad = {"part-b.parquet": data[: len(data) // 2], "part-c.parquet": b"",  # truncated, empty
           "part-d.parquet": random.Random(0).randbytes(600)}
    for name, content in bad.items():
        (labels_dir / name).write_bytes(content)
        with pytest.raises(ConfigError, match=rf"^{labels_dir / name} is not a readable Parquet file \(.+\); "
                                              "move it aside or rerun with repair=true$"):
            committed_problems(labels_dir)
        (labels_dir / name).unlink()
    pq.write_table(steptable.SCHEMA.empty_table(), labels_dir / "part-e.parquet")  # another program's table
    with pytest.raises(ConfigError, match="part-e.parquet was not written by the tree-search stage.*repair=true$"):
        committed_problems(labels_dir)
    for name, content in bad.items():
        (labels_dir / name).write_bytes(content)
    assert set(committed_problems(labels_dir, repair=True)) == {"a"}
    corrupt = tmp_path / "corrupt"
    assert sorted(p.name for p in corrupt.iterdir()) == ["part-b.parquet", "part-c.parquet", "part-d.parquet",
                                                          "part-e.parquet"]  # moved aside, never deleted
    assert (corrupt / "part-b.parquet").read_bytes() == bad["part-b.parquet"]
    assert [p.name for p in labels_dir.iterdir()] == ["part-a.parquet"] and read_labels(tmp_path).equals(good)


def test_a_damaged_run_json_or_an_out_dir_that_is_a_file_is_one_line(tmp_path, model_dirs, capsys):
    from mathprm.cli import main

    out = tmp_path / "mcts"
    (out / "labels").mkdir(parents=True)
    args = ["mcts", f"policy={model_dirs[0]}", "dataset=arith:easy", "limit=2"]
    (out / "run.json").write_text('{"policy": "x", "data')  # cut short
    assert main([*args, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'run.json'} is not a readable JSON object" in err and "overwrite=true" in err
    assert err.count("\n") == 1
    (out / "run.json").unlink()
    (out / "labels" / "part-x.parquet").write_bytes(b"")
    assert main([*args, f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'labels' / 'part-x.parquet'} is not a readable Parquet file" in err and err.count("\n") == 1
    (tmp_path / "a-file").write_text("not a directory")
    assert main([*args, f"out_dir={tmp_path / 'a-file'}"]) == 2
    assert "a-file is a file, not a directory" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real Ray


@pytest.mark.ray
def test_the_stage_writes_labels_trl_rows_and_a_summary_then_resumes(ray_cluster, tiny_policy_dir, tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", [*_memorised(), {"question": "No answer here.", "answer": None}])
    out = tmp_path / "mcts"
    cfg = _config(tiny_policy_dir, out, dataset=str(data), separator="\n", limit=None, temperature=0.2)
    summary = run_mcts(cfg)
    assert (summary["problems"], summary["skipped_without_gold"], summary["searched_this_run"]) == (2, 1, 2)
    table = read_labels(out)
    assert table.schema == steptable.SCHEMA
    labels = steptable.from_table(table)
    # The policy knows these two solutions by heart: at a low temperature it writes them, and
    # every step reaches the answer.
    assert {(lab.step, lab.score) for lab in labels} == {(s, 1.0) for steps in MEMORISED.values() for s in steps}
    assert summary["labels"] == len(labels) == summary["n_labels"]
    assert summary["rollouts_per_s"] > 0 and summary["n_rollouts"] > 0
    soft, hard = pq.read_table(out / "trl/soft.parquet"), pq.read_table(out / "trl/hard.parquet")
    assert soft.column_names == ["prompt", "completions", "labels"]
    assert soft.num_rows == hard.num_rows >= 2
    assert hard.schema.field("labels").type.value_type == "bool"
    assert soft.schema.field("labels").type.value_type == "double"
    # Rerun: nothing left to search, same table.
    again = run_mcts(cfg)
    assert again["searched_this_run"] == 0 and read_labels(out).equals(table)
    # Another method into the same directory is refused, naming the field.
    with pytest.raises(ValueError, match="method"):
        run_mcts(_config(tiny_policy_dir, out, dataset=str(data), separator="\n", limit=None, temperature=0.2,
                         method="omegaprm"))


@pytest.mark.ray
def test_resume_searches_only_the_problems_without_a_committed_file(ray_cluster, tiny_policy_dir, tmp_path):
    out = tmp_path / "mcts"
    cfg = _config(tiny_policy_dir, out, limit=4, batch_problems=1)
    first = run_mcts(cfg)
    files = sorted((out / "labels").glob("part-*.parquet"))
    assert first["searched_this_run"] == 4 and len(files) == 4
    before = read_labels(out)
    lost = pq.read_schema(files[1]).metadata[PROBLEMS_KEY]
    files[1].unlink()  # as if the run had been killed before this batch was committed
    (out / "labels" / ".part-zzz.parquet.tmp-0123abcd").write_bytes(b"half a file")  # and left this
    damaged = files[2].read_bytes()[:100]
    files[2].write_bytes(damaged)  # and a disk fault cut this one short
    with pytest.raises(ConfigError, match=rf"{files[2].name} is not a readable Parquet file .*repair=true$"):
        run_mcts(cfg)
    second = run_mcts(dataclasses.replace(cfg, repair=True))
    assert second["searched_this_run"] == 2 and (out / "corrupt" / files[2].name).read_bytes() == damaged
    assert not list((out / "labels").glob(".*"))
    assert set(committed_problems(out / "labels")) >= {row["problem_id"] for row in json.loads(lost)}
    after = read_labels(out)
    key = ["problem_id", "depth", "step"]
    assert after.sort_by([(k, "ascending") for k in key]).equals(before.sort_by([(k, "ascending") for k in key]))
    # A smaller limit would leave labels of unselected problems: refused before any search.
    with pytest.raises(ConfigError, match="limit changed"):
        run_mcts(_config(tiny_policy_dir, out, limit=2, batch_problems=1))
    assert read_labels(out).num_rows == after.num_rows


@pytest.mark.ray
def test_labels_gsm8k_with_a_chat_model_through_its_template(ray_cluster, qwen_policy_dir, tmp_path):
    """The labelling job's Ray shell on the real path: the tiny Qwen2 instruct policy (BPE, chat
    template, two EOS ids) labels GSM8K questions on an actor; every stored step and prefix is
    the assistant turn's text (no template text, no separator) with a score in [0, 1]."""
    out = tmp_path / "gsm8k"
    summary = run_mcts(_config(qwen_policy_dir, out, dataset="sample:gsm8k", limit=2, num_solutions=2,
                               rollouts_per_step=1, max_solution_tokens=24, generator_options={"device": "cpu"}))
    assert summary["problems"] == 2 and summary["dataset"] == "sample:gsm8k"
    assert "quality" not in summary  # exact step truth exists only in the arithmetic world
    table = read_labels(out)
    assert table.num_rows > 0
    assert set(table.column("problem_id").to_pylist()) <= set(committed_problems(out / "labels"))
    template = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n", "system\n")
    for row in table.to_pylist():
        for step in [*row["prefix"], row["step"]]:
            assert not any(mark in step for mark in template) and "\n\n" not in step, step
        assert 0.0 <= row["score"] <= 1.0 and row["generator"].endswith(str(qwen_policy_dir))


N_LOST = 16  # problems of the node-loss test


@pytest.mark.ray
def test_a_node_lost_mid_labelling_loses_and_duplicates_nothing(ray_cluster, tiny_policy_dir, tmp_path):
    """Node loss on a real multi-node cluster (loopback): two worker nodes join the test cluster,
    each offering one `labeller` resource, which the job's one expander actor needs. Once the
    first batch is committed, the node running the expander is removed (its raylet and every
    process on it killed); the actor comes back on the other node and every problem is in the
    output exactly once. The actors' Ray metrics appear on their node's Prometheus endpoint."""
    from ray.util.state import list_actors

    cluster = ray_cluster["cluster"]
    nodes = {n.node_id: n for n in (cluster.add_node(num_cpus=1, resources={"labeller": 1}) for _ in range(2))}
    out = tmp_path / "mcts"
    # The memorised questions, again and again: every problem has whole steps to complete, so
    # the run lasts long enough to lose a node on any CPU (on arith the junk may have no steps).
    data = _jsonl(tmp_path / "p.jsonl", [_memorised()[i % 2] for i in range(N_LOST)])
    args = [sys.executable, str(REPO / "jobs/mcts.py"), f"policy={tiny_policy_dir}", f"dataset={data}",
            'separator="\\n"', f"limit={N_LOST}", "num_solutions=4", "rollouts_per_step=8", "max_solution_tokens=64",
            "num_actors=1", "cpus_per_actor=0.5", "resources_per_actor={labeller: 1}", "batch_problems=1",
            f"out_dir={out}", "progress_every_s=2"]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster["address"]}
    labels_dir = out / "labels"
    lost, victim, seen_metrics = None, None, False
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while lost is None and proc.poll() is None and time.monotonic() < deadline:
            if victim is None:  # looked up before the first commit: a lookup takes a second, the run not much more
                on = [a.node_id for a in list_actors(address=f"http://{ray_cluster['webui_url']}",
                                                     filters=[("state", "=", "ALIVE")]) if "Expander" in a.class_name]
                victim = nodes.get(on[0]) if on else None
            if victim is not None and labels_dir.exists() and list(labels_dir.glob("part-*.parquet")):
                lost = len(committed_problems(labels_dir))
                cluster.remove_node(nodes.pop(victim.node_id), allow_graceful=False)
            time.sleep(0.1)
        def metrics_seen() -> bool:
            return any("mathprm_mcts_problems" in metrics_text(n.metrics_export_port) for n in nodes.values())

        while proc.poll() is None and time.monotonic() < deadline:
            seen_metrics = seen_metrics or metrics_seen()
            time.sleep(1)
        log = proc.communicate(timeout=60)[0]
        seen_metrics = seen_metrics or metrics_seen()
    finally:
        if proc.poll() is None:
            proc.kill()
        for node in nodes.values():
            cluster.remove_node(node)
    assert proc.returncode == 0, log[-4000:]
    assert lost is not None and lost < N_LOST, f"the node must go mid-run; committed then: {lost}\n{log[-3000:]}"
    table = read_labels(out)
    done = committed_problems(labels_dir)
    assert len(done) == N_LOST
    assert set(table.column("problem_id").to_pylist()) <= set(done)
    rows = list(zip(table.column("problem_id").to_pylist(), table.column("prefix").to_pylist(),
                    table.column("step").to_pylist()))
    assert len(rows) == len(set(map(str, rows))), "a labelled step appears twice"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == N_LOST and summary["labels"] == len(rows)
    assert f"[mcts] {N_LOST}/{N_LOST} problems" in log
    assert seen_metrics, "mathprm_mcts_* metrics never reached the surviving node's metrics endpoint"


@pytest.mark.ray
def test_ray_job_submit_runs_the_job_on_the_local_head(ray_cluster, tiny_policy_dir, tmp_path):
    out = tmp_path / "submitted"
    data = _jsonl(tmp_path / "p.jsonl", _memorised())  # whole steps to label on any CPU
    entry = [sys.executable, "jobs/mcts.py", "--config", "mathprm/configs/mcts_arith.yaml", f"policy={tiny_policy_dir}",
             "method=math_shepherd", f"dataset={data}", 'separator="\\n"', "limit=2", "num_solutions=2", "rollouts_per_step=2",
             "max_solution_tokens=32", "num_actors=1", f"out_dir={out}"]
    ray_bin = Path(sys.executable).with_name("ray")
    r = subprocess.run([str(ray_bin), "job", "submit", "--address", f"http://{ray_cluster['webui_url']}",
                        "--working-dir", str(REPO), "--", *entry],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "succeeded" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problems"] == 2 and summary["labels"] > 0


def test_relative_paths_are_refused_inside_a_ray_job_working_dir_copy(tmp_path, monkeypatch):
    from mathprm.ray_utils import check_job_paths

    check_job_paths(out_dir="runs/x")  # a normal checkout: fine
    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    check_job_paths(out_dir=str(tmp_path / "out"), policy=None)
    with pytest.raises(ValueError, match=r"out_dir: 'runs/arith/mcts' is relative.*out_dir=\$PWD/runs/arith/mcts"):
        check_job_paths(policy=str(tmp_path), out_dir="runs/arith/mcts")
