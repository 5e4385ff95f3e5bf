"""The CUDA / bf16 code paths: the hf generator, the PRM (scoring and a training step), an SFT
step and a PPO update, on a GPU.

These run only where CUDA is (`gpu` marker; skipped on the CPU-only CI box) and need neither
Ray nor vLLM, so they run on a bare GPU machine with torch and transformers:

    python -m pytest -m gpu tests/test_cuda.py

The CPU versions of the same behaviours are tested in test_generation, test_prm, test_sft and
test_train_ppo; here each is checked on the device, in the precision the code picks there.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mathprm.generation import Prefix, Sampling
from mathprm.prompts import Prompter
from mathprm.steps import StepFormat
from tests.conftest import MEMORISED

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU machine)")]

FMT = StepFormat("\n")


def test_the_hf_generator_runs_in_bf16_on_the_gpu_and_writes_the_memorised_solutions(tiny_policy_dir):
    from mathprm.models.gen_hf import HFGenerator

    gen = HFGenerator(str(tiny_policy_dir), FMT, batch_prefixes=2)
    assert gen.device.type == "cuda" and next(gen.model.parameters()).dtype == torch.bfloat16
    questions = list(MEMORISED)
    greedy = gen.rollouts([Prefix(q) for q in questions], 2, Sampling(temperature=0))
    for q, rolls in zip(questions, greedy):
        assert [r.steps for r in rolls] == [list(MEMORISED[q])] * 2 and all(r.finished for r in rolls)
    nxt = gen.next_steps([Prefix(questions[1], MEMORISED[questions[1]][:1])], 3, Sampling(temperature=0))
    assert [s.text for s in nxt[0]] == [MEMORISED[questions[1]][1]] * 3


def test_hot_gpu_samples_are_seeded_and_the_preallocated_cache_matches_the_growing_one(tiny_policy_dir, monkeypatch):
    import mathprm.models.gen_hf as gen_hf

    gen = gen_hf.HFGenerator(str(tiny_policy_dir), FMT)
    prefixes = [Prefix("What is 7+9?"), Prefix("What is 1+1?"), Prefix("What is 2+3?", ("2 + 3 = 5",))]
    hot = Sampling(temperature=1.5, max_solution_tokens=40, seed=7)
    first = gen.rollouts(prefixes, 6, hot)
    assert gen.rollouts(prefixes, 6, hot) == first  # per-sample generators on the device: replayable
    assert len({r.n_tokens for rs in first for r in rs}) > 2  # rows stopped at different times
    monkeypatch.setattr(gen_hf, "_preallocate", lambda cache, extra: None)
    growing = gen.rollouts(prefixes, 6, hot)
    # bf16 attention over a longer (masked) buffer may round differently, so compare the
    # distributions' footprint rather than demand identical tokens: most samples agree.
    same = sum(a == b for ra, rb in zip(first, growing) for a, b in zip(ra, rb))
    assert same >= 0.75 * sum(len(rs) for rs in first), f"only {same} of 18 samples agree"


def test_the_prm_scores_on_the_gpu_in_bf16_as_on_the_cpu_in_fp32(tiny_policy_dir, tmp_path):
    from transformers import AutoTokenizer

    from mathprm.models.prm import PRMScorer, build_prm, save_prm

    model = build_prm(tiny_policy_dir)
    with torch.no_grad():
        torch.nn.init.normal_(model.score.weight, std=0.5)  # a head that reads the hidden state
    save_prm(model, AutoTokenizer.from_pretrained(tiny_policy_dir), FMT, tmp_path / "prm", {})
    questions = list(MEMORISED) + ["What is 7+9?"]
    steps = [list(s) for s in MEMORISED.values()] + [["7 + 9 = 15", "The answer is 15"]]
    gpu = PRMScorer(tmp_path / "prm")
    assert gpu.device.type == "cuda" and gpu.model.dtype == torch.bfloat16
    on_gpu = gpu.score(questions, steps)
    on_cpu = PRMScorer(tmp_path / "prm", device="cpu").score(questions, steps)
    assert [len(s) for s in on_gpu] == [len(s) for s in steps]
    diffs = [abs(a - b) for sa, sb in zip(on_gpu, on_cpu) for a, b in zip(sa, sb)]
    assert max(diffs) < 0.05, diffs
    assert len({round(x, 3) for s in on_cpu for x in s}) > 1  # the scores differ between steps


def test_a_bf16_prm_training_step_on_the_gpu_learns_its_labels(tiny_policy_dir):
    from mathprm.models.prm import PRMExample, build_prm, collate, step_logits
    from mathprm.train.prm import prm_loss
    from mathprm.train.run import optimizer_step

    model = build_prm(tiny_policy_dir).cuda()
    batch = collate([PRMExample(list(range(3, 15)), [8, 11], [1.0, 0.0], step_ends=[8, 11], steps_from=4),
                     PRMExample(list(range(5, 18)), [9, 12], [0.0, 1.0], step_ends=[9, 12], steps_from=6)],
                    pad_id=0).to("cuda")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    losses = [optimizer_step(model, opt, 3e-3, lambda: prm_loss(model, batch), bf16=True) for _ in range(30)]
    assert model.lm.dtype == torch.float32  # autocast leaves the weights alone
    assert losses[-1] < 0.5 * losses[0], losses
    with torch.no_grad():
        probs = torch.sigmoid(step_logits(model, batch))[batch.step_mask]
    assert probs.device.type == "cuda"
    assert probs.tolist()[0] > 0.5 > probs.tolist()[1] and probs.tolist()[3] > 0.5 > probs.tolist()[2]


def test_a_bf16_sft_step_on_the_gpu_lowers_the_loss():
    from mathprm.models.policy import build_policy
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.train import sft
    from mathprm.train.run import optimizer_step

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = build_policy("tiny", tok, seed=0).cuda()
    batch = sft.SFTBatch.collate([sft.build_example(tok, "Start with 3. Add 4.", "3 + 4 = 7\nThe answer is 7")],
                        tok.pad_token_id).to("cuda")
    opt = torch.optim.AdamW(model.parameters())
    losses = [optimizer_step(model, opt, 1e-2, lambda: sft.sft_loss(model, batch), bf16=True) for _ in range(15)]
    assert next(model.parameters()).dtype == torch.float32
    assert losses[-1] < losses[0] * 0.7, losses


@pytest.mark.parametrize("advantage, critic", [("gae", "shared"), ("grpo", "shared"), ("gae", "separate")])
def test_a_bf16_ppo_update_on_the_gpu_makes_the_rewarded_step_more_likely(advantage, critic):
    from mathprm.models.policy import build_policy
    from mathprm.models.tokenizer import build_char_tokenizer
    from mathprm.train.ppo import PPOConfig
    from mathprm.train.ppo_episodes import Episode, make_batch
    from mathprm.train.ppo_loss import PolicyWithValue, ppo_update, token_logprobs

    tok = build_char_tokenizer()
    torch.manual_seed(0)
    model = PolicyWithValue(build_policy("test", tok, seed=0), value_head=advantage == "gae", critic=critic).cuda()
    good = Episode(0, "What is 3+4?", [], ["3 + 4 = 7"], False, False, rewards=[1.0])
    bad = dataclasses.replace(good, steps=["3 + 4 = 8"], rewards=[0.0])
    batch = make_batch(Prompter(tok, FMT), [good, bad, good, bad], 512).to("cuda")
    cfg = PPOConfig(prm="oracle", advantage=advantage, critic=critic, group_size=4, ppo_epochs=4, minibatch_size=4,
                    lr=3e-3, kl_coef=0.0, precision="bf16")

    def action_logp():
        with torch.no_grad():
            logits, _ = model(batch.ids, batch.attention_mask)
        return (token_logprobs(logits, batch.ids) * batch.mask).sum(-1)

    before = action_logp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    stats = ppo_update(model, lambda b: torch.zeros_like(b.mask), batch, optimizer, cfg, 0.0, seed=0)
    after = action_logp()
    # The rewarded step gains on the punished one. Not "the rewarded sequence's log-prob rises":
    # the two share every token but one, Adam's first steps move each weight by ~lr whatever
    # its gradient's size, and the shared tokens' change can outweigh the one token's (gae with
    # a separate critic: +0.19 on the CPU, -0.001 on an H200, 2026-12-04), while the margin
    # moves by ~1.9 on the CPU in every variant.
    assert (after[0] - after[1]) - (before[0] - before[1]) > 0.5 and after[1] < before[1] - 0.05
    assert stats["optimizer_steps"] == 4 and 0.0 <= stats["clip_frac"] <= 1.0
    assert all(v == v for v in stats.values() if isinstance(v, float))  # no NaN in bf16


@pytest.mark.parametrize("kind", ["qwen", "math_shepherd", "rlhflow", "skywork"])
def test_a_published_prm_scores_in_bf16_on_the_gpu_as_in_fp32_on_the_cpu(kind, tmp_path):
    from mathprm.scorer import load_scorer
    from tests.tiny_models import BUILDERS

    path = BUILDERS[kind](tmp_path / kind)
    question = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
    steps = [["She sold 48 / 2 = 24 clips in May.", "In all 48 + 24 = 72.", "The answer is 72."], ["72"]]
    on_gpu = load_scorer(kind, str(path), device="cuda")
    assert on_gpu.device.type == "cuda"
    gpu = on_gpu.score([question] * 2, steps)
    cpu = load_scorer(kind, str(path), device="cpu").score([question] * 2, steps)
    assert [len(s) for s in gpu] == [3, 1]
    for g, c in zip(gpu, cpu):
        assert g == pytest.approx(c, abs=0.05)  # bf16 against fp32


def test_the_chat_policy_writes_clean_steps_and_stops_on_its_second_eos_id_on_the_gpu(tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from mathprm.models.gen_hf import HFGenerator
    from tests.tiny_models import build_qwen_policy

    qwen = build_qwen_policy(tmp_path / "qwen")
    fmt = StepFormat("\n\n")
    gen = HFGenerator(str(qwen), fmt)
    assert gen.device.type == "cuda" and gen.prompter.chat
    samples = gen.next_steps([Prefix("What is 2 + 3?")], 4, Sampling(temperature=1.0, max_step_tokens=16, seed=1))[0]
    assert all("<|im_" not in s.text and fmt.separator not in s.text for s in samples)
    stuck = tmp_path / "stuck"
    shutil.copytree(qwen, stuck)
    weights = load_file(stuck / "model.safetensors")
    weights["model.norm.weight"] = torch.zeros_like(weights["model.norm.weight"])  # argmax = id 0 = <|endoftext|>
    save_file(weights, str(stuck / "model.safetensors"), metadata={"format": "pt"})
    (roll,) = HFGenerator(str(stuck), fmt).rollouts([Prefix("What is 2 + 3?")], 1, Sampling(temperature=0.0))[0]
    assert (roll.finished, roll.n_tokens) == (True, 1)


@pytest.mark.parametrize("kind", ["qwen", "math_shepherd", "rlhflow", "skywork"])
def test_the_prefix_caches_on_the_gpu_in_bf16_score_and_sample_as_without(kind, tmp_path):
    """A search's rounds with the PRM's prefix cache on and off, in bf16 on the GPU: the same
    scores to bf16's precision, fewer tokens, nothing held after `release`; the chat policy's
    prompt cache gives the next-token logits of a whole prefill."""
    from mathprm.models.gen_hf import HFGenerator
    from mathprm.scorer import load_scorer
    from tests.tiny_models import BUILDERS, build_qwen_policy

    path = BUILDERS[kind](tmp_path / kind)
    question = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
    so_far = ["She sold 48 / 2 = 24 clips in May.", "In all 48 + 24 = 72."]
    rounds = [[so_far[:1] + [c] for c in ("In all 48 + 24 = 72.", "In all 72.", "So 48 + 24 = 70.")],
              [so_far + [c] for c in ("The answer is 72.", "72", "The answer is 70.")]]
    plain = load_scorer(kind, str(path), device="cuda")
    cached = load_scorer(kind, str(path), device="cuda", prefix_cache_tokens=4096)
    for steps in rounds:
        want = plain.score([question] * len(steps), steps)
        got = cached.score([question] * len(steps), steps)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=0.03)  # bf16: a prefix pass and a full pass round differently
    stats = cached.cache_stats()
    assert stats["hits"] > 0 and stats["tokens_computed"] < stats["tokens_full"]
    cached.release([question])
    assert cached.cache_stats()["entries"] == 0
    if kind == "qwen":
        qwen = build_qwen_policy(tmp_path / "policy")
        fmt = StepFormat("\n\n")
        off, on = HFGenerator(str(qwen), fmt), HFGenerator(str(qwen), fmt, prefix_cache_tokens=4096)
        with torch.inference_mode():
            for steps in ([], so_far[:1], so_far):  # a search's rounds: each prompt extends the last
                encoded = [on.prompter.ids(question, steps)]
                got, want = on._prefill(encoded, [question])[0], off._prefill(encoded, [question])[0]
                assert (got - want).abs().max() <= 0.05 * want.abs().max()  # next-token logits, bf16
        assert on.cache_stats()["hits"] == 2
