"""PRM training: labelled paths from tree-search rows and TRL rows, the split, and a real Ray
Train run (2 workers, LoRA, TRL input, a kill and a resume, reuse)."""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from mathprm.config import to_dict
from mathprm.data import arith
from mathprm.labels.steptable import StepLabel
from mathprm.labels.treesearch import to_trl
from mathprm.steps import StepFormat
from mathprm.train.prm import PRM_STAGE, TrainPRMConfig, choose_threshold, train_prm
from mathprm.train.prm_data import EpochBatches, is_validation, solution_of_trl_row, solutions_of_problem

FMT = StepFormat("\n")


def _row(prefix, step, n, c, pid="p", q="q?"):
    return {"problem_id": pid, "question": q, "prefix": list(prefix), "step": step, "n_rollouts": n, "n_correct": c}


def test_paths_carry_each_label_once_and_pool_repeated_states():
    rows = [_row([], "a", 4, 3), _row(["a"], "b", 4, 4), _row(["a"], "c", 4, 0), _row([], "a", 4, 1),
            _row(["a", "c"], "d", 1, 0)]
    paths = solutions_of_problem(rows)
    assert [p["steps"] for p in paths] == [["a", "b"], ["a", "c", "d"]]
    # "a" was labelled twice (3/4 and 1/4): pooled to 4/8, given to the first path only.
    assert paths[0]["targets"] == [0.5, 1.0]
    assert math.isnan(paths[1]["targets"][0]) and paths[1]["targets"][1:] == [0.0, 0.0]
    assert all(p["problem_id"] == "p" and p["question"] == "q?" for p in paths)


def test_trl_rows_split_multi_step_completions_and_check_labels():
    row = {"prompt": "q?\n", "completions": ["a\nb", "c"], "labels": [True, 0.25]}
    sol = solution_of_trl_row(row, FMT)
    assert sol["question"] == "q?" and sol["steps"] == ["a", "b", "c"]
    assert math.isnan(sol["targets"][0]) and sol["targets"][1:] == [1.0, 0.25]
    with pytest.raises(ValueError, match="outside"):
        solution_of_trl_row({**row, "labels": [1.0, 2.0]}, FMT)
    with pytest.raises(ValueError, match="one label per completion"):
        solution_of_trl_row({**row, "labels": [1.0]}, FMT)


def test_the_validation_split_is_by_problem_and_stable():
    ids = [f"arith:hard:{i}" for i in range(2000)]
    held = [i for i in ids if is_validation(i, 0.1)]
    assert 150 < len(held) < 250 and held == [i for i in ids if is_validation(i, 0.1)]
    assert not any(is_validation(i, 0.0) for i in ids)


def test_a_run_with_other_settings_does_not_resume_the_old_checkpoint(tmp_path):
    from mathprm.config import ConfigError
    from mathprm.train.run import check_resume

    may_change = PRM_STAGE.may_change

    settings = to_dict(TrainPRMConfig())
    check_resume(tmp_path / "run", may_change, settings)
    check_resume(tmp_path / "run", may_change, {**settings, "epochs": 50})  # training longer resumes
    with pytest.raises(ConfigError, match="lr: .* started with lr=0.0005"):
        check_resume(tmp_path / "run", may_change, {**settings, "lr": 1e-3})


def test_a_damaged_checkpoint_or_run_record_is_named_before_ray_train_resumes_it(tmp_path):
    from mathprm.config import ConfigError
    from mathprm.train.run import TRAIN_STATE_FILE, check_resume

    settings = to_dict(TrainPRMConfig())
    run = tmp_path / "run"
    check_resume(run, PRM_STAGE.may_change, settings)
    state = run / "checkpoint_2026-12-07_00-00-00.000000" / TRAIN_STATE_FILE
    state.parent.mkdir()
    state.write_bytes(b"PK\x03\x04 a torch.save zip cut short")
    with pytest.raises(ConfigError, match=rf"^{state} is not a readable checkpoint \(.+\); pass overwrite=true"):
        check_resume(run, PRM_STAGE.may_change, settings)
    state.unlink()
    (run / "mathprm_run.json").write_text('{"lr": 0.0')
    with pytest.raises(ConfigError, match=r"mathprm_run.json is not a readable JSON object .*overwrite=true"):
        check_resume(run, PRM_STAGE.may_change, settings)


def test_damaged_training_data_is_named_before_ray_data_reads_it(tmp_path):
    from mathprm.config import ConfigError
    from mathprm.train.prm_data import data_step_format, solutions_dataset

    (tmp_path / "run.json").write_text("")
    with pytest.raises(ConfigError, match=r"run.json is not a readable JSON object .*separator="):
        data_step_format(str(tmp_path), None)
    assert data_step_format(str(tmp_path), "\n").separator == "\n"  # a separator given: run.json unread
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "part-0.parquet").write_bytes(b"PAR1 and then nothing")
    with pytest.raises(ConfigError, match=r"part-0.parquet is not a readable Parquet file .*repair=true"):
        solutions_dataset(str(tmp_path), StepFormat("\n"))


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = TrainPRMConfig(lr=1e-3, warmup_steps=10)
    assert cfg.learning_rate(0, 100) == pytest.approx(1e-4)
    assert cfg.learning_rate(9, 100) == pytest.approx(1e-3)
    assert cfg.learning_rate(100, 100) == pytest.approx(1e-4)
    assert cfg.learning_rate(40, 100) < cfg.learning_rate(20, 100)


def test_the_separator_comes_from_the_tree_search_run(tmp_path):
    from mathprm.train.prm_data import data_step_format

    (tmp_path / "run.json").write_text(json.dumps({"dataset": "arith:hard", "separator": None}))
    assert data_step_format(str(tmp_path), None).separator == "\n"
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "gsm8k", "separator": None}))
    assert data_step_format(str(tmp_path), None).separator == "\n\n"
    assert data_step_format(str(tmp_path), "; ").separator == "; "


@pytest.mark.parametrize("override, field", [("epochs=0", "epochs"), ("val_fraction=1", "val_fraction"),
                                             ("eval_every=15", "eval_every"), ("separator=''", "separator"),
                                             ("lora_r=-1", "lora_r"), ("hidden_head=false lora_r=4", "hidden_head")])
def test_config_errors_name_the_field(override, field):
    from mathprm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=field):
        load_config(TrainPRMConfig, None, override.split())


# ----------------------------------------------------------------------------- real Ray Train


def _labels(n_problems: int) -> list[StepLabel]:
    """Exact labels for arith:easy problems: the reference path scored 1, and at each depth a
    wrong branch (the result off by one) scored 0."""
    labels = []
    for p in arith.generate("easy", n_problems, seed=11, split="train"):
        steps = arith.solution_steps(p)
        for d, step in enumerate(steps):
            labels.append(StepLabel(p.id, p.question, tuple(steps[:d]), step, 1.0, 4, 4, d, "math_shepherd"))
            if " = " in step:
                lhs, value = step.rsplit(" = ", 1)
                wrong = f"{lhs} = {int(value) + 1}"
                labels.append(StepLabel(p.id, p.question, tuple(steps[:d]), wrong, 0.0, 4, 0, d, "math_shepherd"))
    return labels


def _cfg(data, tiny_policy_dir, out, **kw) -> TrainPRMConfig:
    values = dict(data=str(data), base=str(tiny_policy_dir), epochs=3, batch_size=8, lr=2e-3, warmup_steps=2,
                  log_every=2, eval_every=4, checkpoint_every=4, val_fraction=0.2, num_workers=2, out_dir=str(out))
    return TrainPRMConfig(**{**values, **kw})


@pytest.mark.ray
@pytest.mark.slow
def test_two_lora_workers_survive_a_killed_worker_and_save_a_loadable_prm_that_learns(ray_cluster, qwen_policy_dir,
                                                                                       tmp_path, monkeypatch):
    """One run for Ray Train's paths (each start costs ~30 s here), on the real path: the tiny
    Qwen2 chat model as the base (its chat prompts around every path), TRL stepwise rows (the
    quick demo trains the arithmetic PRM on tree-search labels), two DDP workers, LoRA adapters
    through PEFT. A worker is killed once the run has checkpointed: the group restarts from that
    checkpoint (max_failures) and the run ends at its full step count; then it is reused. (A
    killed driver's rerun resuming from the checkpoint, the same `train.run` path, is tested by
    the SFT and PPO runs.)"""
    import pyarrow as pa
    from transformers import AutoModelForCausalLM

    from mathprm.models.prm import PRMScorer, load_prm, saved_threshold
    from tests.conftest import MetricsWatcher, TrainWorkerKiller

    pq.write_table(pa.Table.from_pylist(to_trl(_labels(30), hard=False, fmt=FMT)), tmp_path / "soft.parquet")
    out = tmp_path / "resume"
    cfg = _cfg(tmp_path / "soft.parquet", qwen_policy_dir, out, separator="\n", epochs=3, checkpoint_every=2,
               eval_every=2, lora_r=4)
    names = ["mathprm_prm_steps", "mathprm_prm_loss", "mathprm_prm_val_auroc"]
    snapshot = tmp_path / "ray_train" / "prm-resume" / "checkpoint_manager_snapshot.json"
    with MetricsWatcher(ray_cluster["metrics_export_port"], names) as watcher, \
            TrainWorkerKiller(snapshot, ray_cluster["webui_url"]) as killer:
        assert train_prm(cfg) == out.resolve()
    assert watcher.seen == set(names), f"missing on the metrics endpoint: {set(names) - watcher.seen}"
    assert killer.killed, "no worker was killed: the run registered no checkpoint"
    summary = json.loads((out / PRM_STAGE.summary_file).read_text())
    assert summary["resumed_from_step"] >= 2  # the checkpoint the restarted group restored
    assert summary["steps"] == 3 * (summary["train_solutions"] // (8 * 2))  # epochs x steps per epoch
    assert summary["config"]["lora_r"] == 4 and summary["config"]["num_workers"] == 2
    assert summary["val_solutions"] > 0 and summary["train_solutions"] > summary["val_solutions"]
    # It learns: the validation BCE (one fixed set, so no batch-to-batch noise) falls below the
    # untrained PRM's, measured before the kill and kept in the checkpoint (the windowed batch
    # loss swings too much between logs to say so). Required: at least 5 % below.
    assert summary["initial_val_bce"] is not None and summary["val_bce"] < 0.95 * summary["initial_val_bce"], summary
    assert summary["val_bce"] is not None and 0.0 <= summary["val_auroc"] <= 1.0
    # The ProcessBench threshold picked at the end (on validation paths when there are enough
    # clean ones, else on labelled steps) is what the PRM's config hands evaluations.
    assert 0.0 <= summary["threshold"] <= 1.0 and saved_threshold(out) == summary["threshold"]
    assert "paths" in json.loads((out / "prm_config.json").read_text())["threshold_from"]
    assert not list(out.glob("adapter_*"))  # merged: a plain HF causal-LM directory plus the head
    assert not any("lora" in name for name, _ in AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert not any("lora" in name for name, _ in load_prm(out).named_parameters())
    scorer = PRMScorer(out, device="cpu")
    assert scorer.prompter.chat  # the base's chat template, recorded with the PRM
    p = arith.generate("easy", 1, seed=11, split="train")[0]
    assert len(scorer.score([p.question], [arith.solution_steps(p)])[0]) == len(arith.solution_steps(p))
    # Reuse: a finished PRM comes back without Ray.
    monkeypatch.setattr("mathprm.ray_utils.init_ray", lambda *a, **k: pytest.fail("retrained"))
    assert train_prm(cfg) == out.resolve()


class _Shard:
    """A stand-in for a Ray Data shard: batches of a table in the order its local shuffle seed
    gives (as Ray Data's local shuffle does), counting the passes over it."""

    def __init__(self, n: int) -> None:
        import pyarrow as pa

        self.table, self.passes = pa.table({"i": list(range(n)), "text": [f"row {i}" for i in range(n)]}), 0

    def iter_batches(self, batch_size, local_shuffle_seed=None, **_):
        import numpy as np

        self.passes += 1
        table = self.table.take(np.random.default_rng(local_shuffle_seed).permutation(self.table.num_rows))
        for lo in range(0, table.num_rows, batch_size):
            yield table.slice(lo, batch_size)


@pytest.mark.parametrize("max_bytes, passes", [(1 << 20, 1), (64, 3)])
def test_epochs_read_a_small_shard_once_and_shuffle_it_in_memory(max_bytes, passes):
    shard = _Shard(23)
    epochs = EpochBatches(shard, 5, seed=0, rank=0, max_bytes=max_bytes)
    seen = [[b.column("i").to_pylist() for b in epochs.batches(e)] for e in range(3)]
    assert shard.passes == passes  # a shard over max_bytes streams every epoch
    for batches in seen:
        rows = [i for b in batches for i in b]
        assert [len(b) for b in batches] == [5] * 4 and len(set(rows)) == 20  # full batches, no row twice
    if passes == 1:
        assert seen[0] != seen[1]  # a new order each epoch
        again = EpochBatches(_Shard(23), 5, seed=0, rank=0)
        assert [[b.column("i").to_pylist() for b in again.batches(e)] for e in range(3)] == seen  # and replayable
        # A run resumed in epoch 2 reads the shard first then: it must shuffle the same table, or
        # it would skip other batches than the ones the interrupted run trained.
        resumed = EpochBatches(_Shard(23), 5, seed=0, rank=0)
        assert [b.column("i").to_pylist() for b in resumed.batches(2)] == seen[2]
        other = EpochBatches(_Shard(23), 5, seed=0, rank=1)
        assert [b.column("i").to_pylist() for b in other.batches(0)] != seen[0]


def test_the_threshold_comes_from_validation_paths_when_there_are_enough_clean_ones(monkeypatch):
    import mathprm.train.prm as tp
    from mathprm.models.prm import PRMExample

    def example(targets):
        return PRMExample([1] * (len(targets) + 2), list(range(1, len(targets) + 1)), targets)

    # Scores are the targets shifted down a little: a PRM that ranks perfectly.
    monkeypatch.setattr(tp, "score_examples", lambda model, examples, *a: (
        [[max(0.0, t - 0.05) for t in e.targets] for e in examples], 0.0, 0))
    clean, broken = example([0.9, 0.8]), example([0.7, 0.0])
    few = [clean, broken, broken]
    t, how = choose_threshold(None, few, [broken] * 5, 0, "cpu", 8)
    assert "two groups (Otsu)" in how and "16 labelled steps" in how
    assert 0.0 < t <= 0.65  # between the wrong steps' 0.0 and the lowest right step's 0.65
    many = [clean] * 10 + [broken] * 10
    t, how = choose_threshold(None, many, [], 0, "cpu", 8)
    assert how.startswith("F1 on 20 validation paths (10 clean, 10")
    assert 0.0 < t <= 0.65


def test_a_likelihood_only_prm_gets_the_score_of_a_doubtful_token_as_its_threshold(tiny_policy_dir, monkeypatch):
    import math

    import torch

    import mathprm.train.prm as tp
    from mathprm.models.prm import DOUBT_LOGP, PRMExample, build_prm, likelihood_threshold

    def example(targets):
        return PRMExample([1] * (len(targets) + 2), list(range(1, len(targets) + 1)), targets)

    monkeypatch.setattr(tp, "score_examples", lambda model, examples, *a: (
        [[max(0.0, t - 0.05) for t in e.targets] for e in examples], 0.0, 0))
    few = [example([0.9, 0.8]), example([0.7, 0.0]), example([0.7, 0.0])]
    model = build_prm(tiny_policy_dir, features=["prefix_min_logp"], hidden_head=False)
    with torch.no_grad():
        model.feature_weights.weight.fill_(0.3)
        model.score.bias.fill_(-1.1)
    t, how = choose_threshold(model, few, [], 0, "cpu", 8)
    assert "probability 1/e" in how and t == pytest.approx(1 / (1 + math.exp(-(0.3 * -1.0 - 1.1))))
    assert DOUBT_LOGP == -1.0
    with torch.no_grad():
        model.feature_weights.weight.fill_(-0.3)  # trusts unlikely steps: no such point, Otsu
    assert likelihood_threshold(model) is None
    assert "two groups (Otsu)" in choose_threshold(model, few, [], 0, "cpu", 8)[1]
    hidden = build_prm(tiny_policy_dir, features=["prefix_min_logp"], hidden_head=True)
    both = build_prm(tiny_policy_dir, features=["prefix_min_logp", "step_min_logp"], hidden_head=False)
    assert likelihood_threshold(hidden) is None and likelihood_threshold(both) is None and likelihood_threshold(None) is None


def test_the_threshold_reuses_the_final_validation_scores(monkeypatch):
    import mathprm.train.prm as tp
    from mathprm.models.prm import PRMExample

    def example(targets):
        return PRMExample([1] * (len(targets) + 2), list(range(1, len(targets) + 1)), targets)

    many = [example([0.9, 0.8])] * 10 + [example([0.7, 0.0])] * 10
    scores = [[max(0.0, t - 0.05) for t in e.targets] for e in many]

    def no_scoring(*a):
        raise AssertionError("the validation paths were scored again")

    monkeypatch.setattr(tp, "score_examples", no_scoring)
    t, how = choose_threshold(None, many, [], 0, "cpu", 8, val_scores=scores)
    assert how.startswith("F1 on 20 validation paths") and 0.0 < t <= 0.65


def test_the_prm_prior_command_writes_an_untrained_prm_that_doubts_what_its_lm_does_not_compute(
        tiny_policy_dir, tmp_path, capsys):
    from mathprm import cli
    from mathprm.models.prm import PRMScorer, saved_threshold

    out = tmp_path / "prior"
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={out}"]) == 0
    assert (out / PRM_STAGE.summary_file).is_file() and not list(tmp_path.glob(".prior.tmp-*"))
    assert saved_threshold(out) == pytest.approx(1 / (1 + math.e))  # sigmoid(-1): a token at p = 1/e
    scorer = PRMScorer(out, device="cpu")
    right, wrong = scorer.score(["What is 2+3?"] * 2, [["2 + 3 = 5", "5 + 0 = 5"], ["2 + 3 = 6", "6 + 0 = 6"]])
    assert right[0] > saved_threshold(out) > wrong[0]  # the memorised step is sure; a digit it never saw is not
    assert right[1] > wrong[1] and wrong[1] <= wrong[0]  # the lowest log-prob so far: a doubt never goes away
    capsys.readouterr()
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={out}"]) == 0
    assert "reusing the finished PRM" in capsys.readouterr().out
    assert cli.main(["prm-prior", f"base={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'p2'}"]) == 2
    assert "nowhere is not a Hugging Face model directory" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={tmp_path}"]) == 2  # someone else's files
    assert "out_dir" in capsys.readouterr().err
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={tmp_path / 'p3'}", "separator="]) == 2
    assert "separator" in capsys.readouterr().err
    (out / PRM_STAGE.summary_file).write_text('{"steps": ')  # a finished output damaged since
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert f"{out / PRM_STAGE.summary_file} is not a readable JSON object" in err and "overwrite=true" in err
    (tmp_path / "a-file").write_text("")
    assert cli.main(["prm-prior", f"base={tiny_policy_dir}", f"out_dir={tmp_path / 'a-file'}"]) == 2
    assert "a-file is a file, not a directory" in capsys.readouterr().err


def test_a_label_set_without_a_labelled_step_is_one_line_before_ray(tmp_path):
    """A labelling run whose problems were all skipped (e.g. prompts too long for its
    max_solution_tokens) leaves part files with no rows: training refuses them in one line
    naming the data, before Ray Data reads anything."""
    from mathprm.config import ConfigError
    from mathprm.data.problems import Problem
    from mathprm.labels.parts import problems_block, write_labels_file
    from mathprm.labels.treesearch import TOO_LONG, SearchStats
    from mathprm.steps import StepFormat
    from mathprm.train.prm_data import solutions_dataset

    labels = tmp_path / "mcts" / "labels"
    labels.mkdir(parents=True)
    block = problems_block([(Problem("p1", "What is 2+3?", "5", "arith:any"), [],
                             SearchStats(skipped_too_long=1, no_labels=TOO_LONG), 0.0)], "hf:policy", 0)
    write_labels_file(block, labels / "part-test-00000-000.parquet")
    with pytest.raises(ConfigError, match="holds no labelled step"):
        solutions_dataset(str(tmp_path / "mcts"), StepFormat("\n"))
