"""SFT: examples, collate, batch order, schedule and config in-process; one real TorchTrainer run."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

from mathprm.config import ConfigError, parse_args, to_dict
from mathprm.data import arith
from mathprm.models.policy import build_policy
from mathprm.models.tokenizer import build_char_tokenizer
from mathprm.train import sft
from mathprm.train.run import optimizer_step
from mathprm.train.sft import IGNORE_INDEX, BatchOrder, SFTBatch, SFTConfig, build_example, mixture_counts
from tests.conftest import kill_after_first_checkpoint


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_labels_mask_the_prompt(tok):
    # prompt "ab\n" -> <s>=1, a=70, b=71, \n=4; solution "ba" -> 71, 70, then </s>=2.
    ex = build_example(tok, "ab", "ba")
    assert ex.input_ids == [1, 70, 71, 4, 71, 70, 2]
    assert ex.labels == [IGNORE_INDEX] * 4 + [71, 70, 2]


def test_collate_pads_right_and_ignores_padding(tok):
    batch = SFTBatch.collate([build_example(tok, "ab", "ba"), build_example(tok, "a", "b")], tok.pad_token_id)
    assert batch.input_ids.tolist() == [[1, 70, 71, 4, 71, 70, 2], [1, 70, 4, 71, 2, 0, 0]]
    assert batch.attention_mask.tolist() == [[1] * 7, [1] * 5 + [0, 0]]
    assert batch.labels[1].tolist() == [IGNORE_INDEX] * 3 + [71, 2] + [IGNORE_INDEX] * 2


def test_loss_is_on_the_solution_only(tok):
    """Changing the prompt's labels cannot matter; the HF loss equals CE over solution + eos."""
    model = build_policy("test", tok, seed=0)
    batch = SFTBatch.collate([build_example(tok, "12+3", "12 + 3 = 15\nThe answer is 15")], tok.pad_token_id)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    logits, labels = out.logits[0, :-1], batch.labels[0, 1:]
    keep = labels != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
    assert torch.allclose(out.loss, expected, atol=1e-6)
    assert int(keep.sum()) == len("12 + 3 = 15\nThe answer is 15") + 1


def test_mixture_counts_sum_and_follow_weights():
    # 2.5 / 2.5 / 5: one leftover problem goes to the first of the tied remainders.
    assert mixture_counts({"easy": 1, "medium": 1, "hard": 2}, 10) == {"easy": 3, "medium": 2, "hard": 5}
    assert mixture_counts({"easy": 1, "hard": 3}, 8) == {"easy": 2, "hard": 6}
    assert sum(mixture_counts({"easy": 1, "medium": 1, "hard": 1}, 10).values()) == 10


def test_batch_order_covers_each_epoch_once_and_replays():
    lengths = [random.Random(i).randint(5, 300) for i in range(10)]
    order = BatchOrder(lengths, 2, "s", bucket=2)
    first_epoch = [i for step in range(5) for i in order(step)]
    assert sorted(first_epoch) == list(range(10))
    # A pure function of the step: a fresh instance, asked out of order, gives the same batches.
    fresh = BatchOrder(lengths, 2, "s", bucket=2)
    assert [fresh(s) for s in (7, 3, 12)] == [order(s) for s in (7, 3, 12)]
    assert order(5) != order(0) or order(6) != order(1)  # the next epoch is reshuffled
    assert len(BatchOrder([4, 5, 6], 8, "s")(0)) == 8  # a pool smaller than a batch repeats


def test_bucketing_cuts_padding():
    rng = random.Random(0)
    lengths = [rng.randint(50, 400) for _ in range(4096)]

    def padded(bucket: int) -> int:
        order = BatchOrder(lengths, 32, "s", bucket=bucket)
        return sum(32 * max(lengths[i] for i in order(step)) for step in range(order.per_epoch))

    assert padded(16) < 0.75 * padded(1)
    # Still random at the scale of the run: batch sizes of examples are not in length order.
    order = BatchOrder(lengths, 32, "s", bucket=16)
    means = [sum(lengths[i] for i in order(step)) for step in range(16)]
    assert means != sorted(means)


def test_learning_rate_warms_up_then_decays():
    cfg = SFTConfig(lr=1e-3, warmup_steps=10, max_steps=100)
    assert cfg.learning_rate(0, 0.0) == pytest.approx(1e-4)
    assert cfg.learning_rate(9, 0.09) == pytest.approx(1e-3)
    assert cfg.learning_rate(10, 0.0) == pytest.approx(1e-3)
    assert cfg.learning_rate(99, 1.0) == pytest.approx(1e-4)  # ends at MIN_LR_RATIO * lr


@pytest.mark.parametrize("bf16", [False, True])
def test_an_optimizer_step_on_the_sft_loss_lowers_it(tok, bf16):
    torch.manual_seed(0)
    model = build_policy("test", tok, seed=0)
    batch = SFTBatch.collate([build_example(tok, "Start with 3. Add 4.", "3 + 4 = 7\nThe answer is 7")], tok.pad_token_id)
    opt = torch.optim.AdamW(model.parameters())
    losses = [optimizer_step(model, opt, 1e-2, lambda: sft.sft_loss(model, batch), bf16=bf16) for _ in range(15)]
    assert next(model.parameters()).dtype == torch.float32  # autocast leaves the weights alone
    assert losses[-1] < losses[0] * 0.7


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("mixture={impossible: 1}", "mixture"),
        ("mixture={easy: 0}", "mixture"),
        ("preset=huge", "preset"),
        ("lr=0", "lr"),
        ("batch_size=0", "batch_size"),
        ("word_fraction=1.5", "word_fraction"),
        ("max_length=4096", "max_length"),
        ("time_budget_min=0", "time_budget_min"),
        ("checkpoint_every=75", "checkpoint_every"),
        ("snapshot_every=75", "snapshot_every"),
        ("stop_at_accuracy=0", "stop_at_accuracy"),
        ("stop_at_accuracy=1.5", "stop_at_accuracy"),
        ("stop_at_accuracy=0.5|eval_difficulty=extreme", "eval_difficulty"),
        ("stop_at_accuracy=0.5|eval_every=75", "eval_every"),
        ("stop_at_accuracy=0.5|eval_problems=1", "eval_problems"),
    ],
)
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        parse_args(SFTConfig, override.split("|"))


def test_held_out_problems_are_train_split_fresh_and_fixed():
    cfg = SFTConfig(stop_at_accuracy=0.5, eval_problems=20, num_problems=200, num_workers=2)
    problems = sft.held_out_problems(cfg)
    assert len(problems) == 20 and all(not arith.is_test_text(p.question) for p in problems)
    assert [p.question for p in problems] == [p.question for p in sft.held_out_problems(cfg)]
    tok = build_char_tokenizer()
    trained = {tok.decode(e.input_ids) for r in range(2) for e in sft.training_examples(cfg, tok, r, 2)[0]}
    assert not any(p.question in text for p in problems for text in trained)


def test_job_config_parses():
    cfg = parse_args(SFTConfig, ["--config", "mathprm/configs/sft_arith.yaml"])
    assert cfg.out_dir == "runs/arith/policy" and cfg.mixture == {"easy": 1.0, "medium": 3.0, "hard": 6.0}


def test_cli_sft_rejects_a_bad_field_with_status_2(capsys):
    from mathprm.cli import main

    assert main(["sft", "lr=0"]) == 2
    assert "lr" in capsys.readouterr().err


def test_init_from_starts_from_the_saved_weights(tok, tmp_path):
    saved = build_policy("test", tok, seed=3)
    saved.save_pretrained(tmp_path / "policy")
    loaded = sft._initial_model(SFTConfig(init_from=str(tmp_path / "policy"), preset="tiny"), tok)
    assert loaded.config.hidden_size == saved.config.hidden_size  # the directory's architecture, not the preset's
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), loaded.state_dict().values()))
    fresh = sft._initial_model(SFTConfig(preset="test", seed=3), tok)
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), fresh.state_dict().values()))


def test_a_bad_init_from_is_refused_naming_the_field_before_any_work(tok, tmp_path, capsys):
    from mathprm.cli import main

    with pytest.raises(ConfigError, match=r"init_from: .*\(no config.json\)"):
        sft.check_init_from(tmp_path, tok)
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 5}))
    with pytest.raises(ConfigError, match="init_from: .* vocabulary of 5 tokens"):
        sft.check_init_from(tmp_path, tok)
    assert main(["sft", f"init_from={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out'}"]) == 2
    assert "init_from" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_checker_config_starts_from_the_policy_and_anneals_without_a_stop():
    cfg = parse_args(SFTConfig, ["--config", "mathprm/configs/checker_arith.yaml"])
    assert cfg.init_from == "runs/arith/policy" and cfg.stop_at_accuracy is None and cfg.seed != 0
    assert cfg.out_dir == "runs/arith/checker" and cfg.time_budget_min is not None


def _tiny_run(out, **overrides) -> SFTConfig:
    values = dict(
        mixture={"easy": 1.0}, num_problems=256, word_fraction=0.0, preset="test", batch_size=16,
        lr=3e-3, warmup_steps=5, max_steps=40, log_every=10, checkpoint_every=20,
        num_workers=1,
        out_dir=str(out),
    )
    return SFTConfig(**{**values, **overrides})


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_two_worker_run_resumes_stops_on_its_time_budget_saves_a_loadable_policy_and_is_reused(
        ray_cluster, tmp_path, monkeypatch):
    """One run for Ray Train's paths (each start costs ~30 s here): two DDP workers with held-out
    greedy checks on both ranks, the driver SIGKILLed after the first checkpoint, the rerun
    continuing from it until its time budget, a clean stop that still saves, then reuse."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "runs" / "policy"
    cfg = _tiny_run(out, num_workers=2, max_steps=100_000, log_every=5, checkpoint_every=5, snapshot_every=5,
                    # a policy trained for seconds never reaches 100 %, so only the budget stops it
                    stop_at_accuracy=1.0, eval_difficulty="easy", eval_problems=4, eval_every=5)
    overrides = [f"{k}={json.dumps(v)}" for k, v in to_dict(cfg).items() if v is not None]
    kill_after_first_checkpoint(["sft", *overrides], ray_cluster["gcs_address"],
                                tmp_path / "runs" / "ray_train" / "sft-policy" / "checkpoint_manager_snapshot.json",
                                300)
    assert not out.exists()  # nothing half-written where the policy goes

    # The budget counts the killed run's training time too; a resumed run trains at least one step.
    cfg = dataclasses.replace(cfg, time_budget_min=0.2)
    assert sft.train_sft(cfg) == out.resolve()
    summary = json.loads((out / sft.SFT_STAGE.summary_file).read_text())
    assert summary["resumed_from_step"] >= 5
    assert summary["stopped_by"] == "time_budget" and summary["resumed_from_step"] < summary["steps"] < 100_000
    history = summary["held_out_accuracy"]
    assert history and all(h["step"] % 5 == 0 and 0.0 <= h["held_out_accuracy"] < 1.0 for h in history)
    assert summary["final_loss"] < summary["first_loss"]
    assert list((tmp_path / "runs" / "ray_train" / "sft-policy").glob("checkpoint_*/train_state.pt"))
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("1+1\n")["input_ids"][0] == tokenizer.bos_token_id
    assert model.config.vocab_size == len(tokenizer)
    # snapshot_every: a loadable copy after every 5th update the resumed run made, the last one the saved policy.
    snaps = {int(d.name.split("-")[1]): d for d in (tmp_path / "runs" / "policy-snapshots").iterdir()}
    assert set(range(summary["resumed_from_step"] + 5, summary["steps"] + 1, 5)) <= set(snaps)
    assert all(step % 5 == 0 and step <= summary["steps"] for step in snaps)
    last = AutoModelForCausalLM.from_pretrained(snaps[summary["steps"]]).state_dict()
    assert all(torch.equal(v, last[k]) for k, v in model.state_dict().items())

    # Reuse: a finished policy comes back without touching Ray or rewriting it.
    monkeypatch.setattr("mathprm.ray_utils.init_ray", lambda *a, **k: pytest.fail("retrained"))
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert sft.train_sft(cfg) == out.resolve()
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_bad_max_failures_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("mathprm.ray_utils.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match="^max_failures: must be an int >= 0, got -1$"):
        sft.train_sft(dataclasses.replace(_tiny_run(tmp_path / "policy"), max_failures=-1))
    assert not (tmp_path / "policy").exists()


def test_more_problems_per_worker_than_a_difficulty_holds_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """60000 problems on one worker ask arith:easy for more distinct train problems than its
    ~5.5k (all 60000 with the test mixture, 15000 with the default one): one line naming
    num_problems, from the command too, before Ray (workers used to fail each attempt with a
    traceback)."""
    from mathprm.cli import main

    monkeypatch.setattr("mathprm.ray_utils.init_ray", lambda *a, **k: pytest.fail("Ray started"))
    with pytest.raises(ConfigError, match=r"^num_problems: 60000 over 1 worker\(s\) .*arith:easy ran out"):
        sft.train_sft(dataclasses.replace(_tiny_run(tmp_path / "policy"), num_problems=60000, num_workers=1))
    assert main(["sft", "num_problems=60000", "num_workers=1", f"out_dir={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert "num_problems: 60000" in err and "Traceback" not in err and not (tmp_path / "out").exists()
    # Two workers split 8000 (4000 easy problems each, within the pool): accepted.
    sft.check_problem_pool(dataclasses.replace(_tiny_run(tmp_path / "policy"), num_problems=8000, num_workers=2))


def test_an_interrupted_run_is_not_resumed_with_other_settings(tmp_path, monkeypatch):
    from mathprm.train.run import check_resume

    monkeypatch.setattr("mathprm.ray_utils.init_ray", lambda *a, **k: None)
    out = tmp_path / "policy"
    cfg = _tiny_run(out)
    # What the interrupted run recorded when it started.
    check_resume(tmp_path / "ray_train" / "sft-policy", sft.SFT_STAGE.may_change,
                 {**to_dict(cfg), "out_dir": str(out.resolve())})
    with pytest.raises(ConfigError, match="lr: .* started with lr=0.003"):
        sft.train_sft(dataclasses.replace(cfg, lr=1e-3))
