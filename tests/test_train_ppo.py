"""PPO with per-step PRM reward: episode encoding, rewards, one learner update, and real Ray Train runs."""

import dataclasses
import json

import pytest
import torch

from mathprm.config import ConfigError, load_config
from mathprm.data import arith
from mathprm.generation import Rollout, StepSample
from mathprm.models.policy import build_policy
from mathprm.models.tokenizer import build_char_tokenizer
from mathprm.prompts import Prompter
from mathprm.scorer import ArithOracle
from mathprm.steps import StepFormat
from mathprm.train.ppo import METRICS_FILE, PLOT_FILE, PPO_STAGE, PPOConfig, train_ppo
from mathprm.train.ppo_episodes import Episode, collect_episodes, encode_episode, make_batch, pick_prompts
from mathprm.train.ppo_loss import PolicyWithValue, param_groups, ppo_update
from tests.conftest import MetricsWatcher

FMT = StepFormat("\n")
TOK = build_char_tokenizer()


def test_an_episode_is_prompt_then_steps_with_rewards_on_their_last_tokens():
    ep = Episode(0, "What is 3+4?", ["3 + 4 = 7"], ["7 * 2 = 14", "The answer is 14"], finished=True,
                 truncated=False, rewards=[0.25, 1.0])
    prompt = TOK(FMT.prompt(ep.question, ep.prefix))["input_ids"]
    ids, n_prompt, ends = encode_episode(Prompter(TOK, FMT), ep, 512)
    first = TOK("7 * 2 = 14\n", add_special_tokens=False)["input_ids"]
    last = TOK("The answer is 14", add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]
    assert ids == prompt + first + last and n_prompt == len(prompt)
    assert ends == [len(prompt) + len(first) - 1, len(ids) - 1]

    batch = make_batch(Prompter(TOK, FMT), [ep, dataclasses.replace(ep, steps=["7 * 2"], finished=False, truncated=True,
                                                          rewards=[0.0])], 512)
    # Position t is about token t + 1: the action tokens are positions n_prompt - 1 .. len - 2.
    assert batch.mask[0].nonzero().flatten().tolist() == list(range(n_prompt - 1, len(ids) - 1))
    assert batch.step_mask[0].nonzero().flatten().tolist() == [e - 1 for e in ends]
    assert batch.step_rewards[0, ends[0] - 1] == 0.25 and batch.step_rewards[0, ends[1] - 1] == 1.0
    cut = TOK("7 * 2", add_special_tokens=False)["input_ids"]  # cut: no separator, no EOS
    assert batch.ids[1, n_prompt : n_prompt + len(cut)].tolist() == cut
    assert int(batch.mask[1].sum()) == len(cut) and int(batch.attention_mask[1].sum()) == n_prompt + len(cut)


def test_a_too_long_episode_is_cut_and_its_rewards_move_to_the_last_kept_token():
    ep = Episode(0, "What is 3+4?", [], ["3 + 4 = 7", "The answer is 7"], True, False, rewards=[1.0, 0.5])
    full, n_prompt, _ = encode_episode(Prompter(TOK, FMT), ep, 512)
    ids, _, ends = encode_episode(Prompter(TOK, FMT), ep, n_prompt + 3)
    assert ids == full[: n_prompt + 3] and ends == [n_prompt + 2, n_prompt + 2]
    batch = make_batch(Prompter(TOK, FMT), [ep], n_prompt + 3)
    assert batch.step_rewards[0, n_prompt + 1] == 1.5
    with pytest.raises(ValueError, match="no room for an action"):
        encode_episode(Prompter(TOK, FMT), ep, n_prompt)


class ScriptedGenerator:
    """A Generator that writes the reference step (odd samples: the reference step off by one)."""

    step_format = FMT

    def __init__(self, problems):
        self.by_q = {p.question: p for p in problems}
        self.rollout_calls = 0

    def _next(self, prefix, j):
        ref = arith.solution_steps(self.by_q[prefix.question])
        step = ref[len(prefix.steps)]
        if j % 2 and " = " in step:
            lhs, value = step.rsplit(" = ", 1)
            step = f"{lhs} = {int(value) + 1}"
        return step, len(prefix.steps) == len(ref) - 1

    def next_steps(self, prefixes, n, sampling):
        return [[StepSample(*self._step(p, j)) for j in range(n)] for p in prefixes]

    def _step(self, p, j):
        text, finished = self._next(p, j)
        return text, len(text) + 1, finished

    def rollouts(self, prefixes, n, sampling):
        self.rollout_calls += 1
        out = []
        for p in prefixes:
            rolls = []
            for j in range(n):
                steps = arith.solution_steps(self.by_q[p.question])
                if j % 2:  # a wrong first result (the later steps are unchanged, so the answer is right)
                    lhs, value = steps[0].rsplit(" = ", 1)
                    steps = [f"{lhs} = {int(value) + 1}", *steps[1:]]
                text = FMT.join(steps)
                rolls.append(Rollout(steps, text, len(text) + 1, True))
            out.append(rolls)
        return out


def test_one_step_episodes_are_rewarded_by_the_scorer_for_the_step_written():
    problems = arith.generate("medium", 6, seed=3, split="train")
    gen, oracle = ScriptedGenerator(problems), ArithOracle(problems)
    cfg = PPOConfig(prm="oracle", group_size=4, reference_prefix_fraction=1.0)
    episodes = collect_episodes(gen, oracle, problems, cfg, FMT, seed=5)
    assert gen.rollout_calls == 0  # every prefix came from a reference solution
    assert [ep.group for ep in episodes] == [g for g in range(6) for _ in range(4)]
    for ep in episodes:
        p = problems[ep.group]
        assert ep.prefix == arith.solution_steps(p)[: len(ep.prefix)]
        right = arith.check_step(p, ep.prefix, ep.steps[0])
        assert ep.rewards == [1.0 if right else 0.0]
    assert {ep.rewards[0] for ep in episodes} == {0.0, 1.0}
    # With no reference prefixes, the prefixes come from the policy's own rollouts.
    collect_episodes(gen, oracle, problems, dataclasses.replace(cfg, reference_prefix_fraction=0.0), FMT, seed=5)
    assert gen.rollout_calls == 1


def test_full_solution_episodes_get_a_reward_per_step_plus_the_outcome():
    problems = arith.generate("easy", 3, seed=4, split="train")
    cfg = PPOConfig(prm="oracle", mode="full_solution", group_size=2, outcome_reward=1.0)
    episodes = collect_episodes(ScriptedGenerator(problems), ArithOracle(problems), problems, cfg, FMT, seed=0)
    right, wrong = episodes[0], episodes[1]
    assert right.correct and right.rewards == [1.0] * (len(right.steps) - 1) + [2.0]
    # A wrong first result whose later steps still end at the gold answer: the steps get 0
    # from the scorer, the right answer still gets its outcome bonus (shaping stays explicit).
    assert wrong.correct and wrong.rewards == [0.0] * (len(wrong.steps) - 1) + [1.0]


def test_prm_none_rewards_only_the_outcome():
    from mathprm.scorer import ZeroScorer

    problems = arith.generate("easy", 3, seed=4, split="train")
    cfg = PPOConfig(prm="none", mode="full_solution", group_size=2, outcome_reward=1.0)
    episodes = collect_episodes(ScriptedGenerator(problems), ZeroScorer(), problems, cfg, FMT, seed=0)
    assert [ep.rewards for ep in episodes[:2]] == [[0.0] * (len(ep.steps) - 1) + [1.0] for ep in episodes[:2]]
    assert all(sum(ep.rewards) == float(bool(ep.correct)) for ep in episodes)


def test_prompts_replay_for_the_same_seed_rank_and_update():
    pool = arith.generate("easy", 50, seed=0, split="train")
    assert pick_prompts(pool, 8, 0, 1, 7) == pick_prompts(pool, 8, 0, 1, 7)
    assert pick_prompts(pool, 8, 0, 1, 7) != pick_prompts(pool, 8, 0, 0, 7)


@pytest.mark.parametrize("advantage, critic", [("gae", "shared"), ("gae", "separate"), ("grpo", "shared")])
def test_one_update_makes_the_rewarded_step_more_likely(advantage, critic):
    # One prompt, four samples: two write the right step (reward 1), two a wrong one (reward 0).
    torch.manual_seed(0)
    lm = build_policy("test", TOK, seed=0)
    model = PolicyWithValue(lm, value_head=advantage == "gae", critic=critic)
    good = Episode(0, "What is 3+4?", [], ["3 + 4 = 7"], False, False, rewards=[1.0])
    bad = dataclasses.replace(good, steps=["3 + 4 = 8"], rewards=[0.0])
    batch = make_batch(Prompter(TOK, FMT), [good, bad, good, bad], 512)
    cfg = PPOConfig(prm="oracle", advantage=advantage, critic=critic, group_size=4, ppo_epochs=4, minibatch_size=4,
                    lr=3e-3, kl_coef=0.0)

    def action_logp():
        with torch.no_grad():
            logits, _ = model(batch.ids, batch.attention_mask)
        from mathprm.train.ppo_loss import token_logprobs

        return (token_logprobs(logits, batch.ids) * batch.mask).sum(-1)

    before = action_logp()
    frozen = before.clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    stats = ppo_update(model, lambda b: torch.zeros_like(b.mask), batch, optimizer, cfg, 0.0, seed=0)
    after = action_logp()
    assert after[0] > frozen[0] + 0.05 and after[1] < frozen[1] - 0.05
    assert stats["optimizer_steps"] == 4 and 0.0 <= stats["clip_frac"] <= 1.0
    assert (stats["value_loss"] > 0) == (advantage == "gae")


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_the_value_loss_moves_the_policy_only_with_a_shared_critic(critic):
    torch.manual_seed(0)
    lm = build_policy("test", TOK, seed=0)
    model = PolicyWithValue(lm, value_head=True, critic=critic)
    torch.nn.init.normal_(model.v_head.weight)  # a zero head passes no gradient back at all
    ep = Episode(0, "What is 3+4?", [], ["3 + 4 = 7"], False, False, rewards=[1.0])
    batch = make_batch(Prompter(TOK, FMT), [ep, ep], 512)
    _, values = model(batch.ids, batch.attention_mask)
    (values**2).mean().backward()
    policy_grad = sum(float(p.grad.abs().sum()) for p in model.lm.parameters() if p.grad is not None)
    assert (policy_grad > 0) == (critic == "shared")
    assert float(model.v_head.weight.grad.abs().sum()) > 0
    if critic == "separate":
        assert sum(float(p.grad.abs().sum()) for p in model.critic_lm.parameters()) > 0


class _TextScorer:
    """A scorer whose step scores follow the sampled text (a hash): rewards that differ within a
    group whatever a random policy writes, so every update really moves the weights."""

    def score(self, questions, steps_per_question):
        return [[(sum(map(ord, step)) % 5) / 4 for step in steps] for steps in steps_per_question]


def _learn(seed: int, updates: int = 2) -> dict[str, torch.Tensor]:
    """`updates` PPO updates of a fresh `test` policy, on-policy, as the training loop runs them."""
    import copy

    from mathprm.models.gen_hf import HFGenerator
    from mathprm.train.ppo_episodes import sampling_seed
    from mathprm.train.ppo_loss import token_logprobs

    torch.manual_seed(0)
    lm = build_policy("test", TOK, seed=0)
    reference = copy.deepcopy(lm).eval().requires_grad_(False)
    model = PolicyWithValue(lm, value_head=False)
    optimizer = torch.optim.AdamW(param_groups(model, 1e-3, None))
    generator = HFGenerator.from_model(lm, TOK, FMT)
    cfg = PPOConfig(prm="oracle", mode="full_solution", advantage="grpo", group_size=4, ppo_epochs=2,
                    minibatch_size=4, lr=1e-3, kl_coef=0.05, max_step_tokens=8, max_solution_tokens=24)
    problems = arith.generate("easy", 3, seed=0, split="train")

    def ref_logp(batch):
        with torch.no_grad():
            return token_logprobs(reference(input_ids=batch.ids, attention_mask=batch.attention_mask).logits, batch.ids)

    for update in range(updates):
        episodes = collect_episodes(generator, _TextScorer(), problems, cfg, FMT, sampling_seed(seed, 0, update))
        ppo_update(model, ref_logp, make_batch(Prompter(TOK, FMT), episodes, 512), optimizer, cfg, cfg.kl_coef,
                   sampling_seed(seed, 0, -update))
    return {k: v.detach().clone() for k, v in lm.state_dict().items()}


def test_the_same_seed_trains_the_same_weights_and_another_seed_does_not():
    """Sampling and minibatch order follow (seed, update) only, never the clock or global RNG
    state: what lets a step-bounded run (the demo's PPO stage) repeat byte for byte."""
    first, again, other = _learn(seed=0), _learn(seed=0), _learn(seed=1)
    start = build_policy("test", TOK, seed=0).state_dict()
    assert any(not torch.equal(first[k], start[k]) for k in first), "the updates did not move the policy"
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_the_critic_gets_its_own_learning_rate():
    lm = build_policy("test", TOK, seed=0)
    model = PolicyWithValue(lm, value_head=True, critic="separate")
    policy_group, critic_group = param_groups(model, 1e-5, 1e-3)
    assert policy_group["lr"] == 1e-5 and critic_group["lr"] == 1e-3
    n_critic = sum(p.numel() for p in critic_group["params"])
    assert n_critic == sum(p.numel() for p in [*model.v_head.parameters(), *model.critic_lm.parameters()])
    assert sum(p.numel() for p in policy_group["params"]) == sum(p.numel() for p in lm.parameters())
    no_critic = PolicyWithValue(build_policy("test", TOK, seed=0), value_head=False)
    assert [g["lr"] for g in param_groups(no_critic, 1e-5, None)] == [1e-5]


@pytest.mark.parametrize("overrides, field", [(["group_size=1"], "group_size"), (["mode=outcome"], "mode"),
                                              (["reference_prefix_fraction=2"], "reference_prefix_fraction"),
                                              (["kl_target=0"], "kl_target"), (["temperature=0"], "temperature"),
                                              (["prm=oracle", "dataset=gsm8k"], "prm"),
                                              (["critic=separate", "lora_r=8"], "critic"),
                                              (["critic_lr=0"], "critic_lr"),
                                              (["prm=none", "mode=one_step"], "prm"),
                                              (["prm=none", "outcome_reward=0"], "prm"),
                                              (["strategy=fsdp", "rollout.replicas=0"], "strategy"),
                                              (["strategy=fsdp", "lora_r=8"], "strategy"),
                                              (["strategy=zero3"], "strategy"),
                                              (["placement=elsewhere"], "placement"),
                                              (["rollout.backend=tgi"], "rollout.backend"),
                                              (["rollout.max_staleness=2"], "rollout.max_staleness"),
                                              (["rollout.replicas=0", "rollout.max_staleness=1"],
                                               "rollout.max_staleness"),
                                              (["reward.replicas=-1"], "reward.replicas"),
                                              (["rollout.num_gpus=-1"], "rollout.num_cpus / num_gpus")])
def test_config_errors_name_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(PPOConfig, "mathprm/configs/ppo_arith.yaml", ["advantage=grpo", *overrides])


# ----------------------------------------------------------------------------- real Ray Train


def _cfg(policy, out, **kw) -> PPOConfig:
    values = dict(policy=str(policy), prm="oracle", dataset="arith:easy", num_problems=40, eval_dataset="arith:easy",
                  eval_problems=4, prompts_per_update=2, group_size=2, updates=3, minibatch_size=2, ppo_epochs=1,
                  lr=1e-3, max_step_tokens=12, max_solution_tokens=40, eval_every=2, checkpoint_every=1,
                  num_workers=2, out_dir=str(out))
    return PPOConfig(**{**values, **kw})


@pytest.mark.ray
@pytest.mark.slow
def test_two_lora_workers_with_a_rollout_engine_export_metrics_and_save_a_merged_hf_policy(
        ray_cluster, qwen_policy_dir, published_prms, tmp_path):
    """The real path on Ray Train: the tiny Qwen2 chat policy on GSM8K, rewarded per step by a
    published PRM (qwen kind) plus the outcome; full_solution + grpo + LoRA on two DDP workers
    sampling through one hf rollout engine that gets the merged LoRA weights after every update
    (the sampler's log-probs equal the learners'). A killed run's resume is tested in
    tests/test_ppo_roles.py (a killed engine and reward worker) and for the trainer skeleton in
    tests/test_sft.py (a killed driver); the one_step + gae path on the arithmetic models runs in
    the quick demo (tests/test_cli.py)."""
    from transformers import AutoModelForCausalLM

    from mathprm.train.ppo_roles import RolloutConfig

    out = tmp_path / "ppo"
    cfg = _cfg(qwen_policy_dir, out, prm=f"qwen:{published_prms['qwen']}", dataset="sample:gsm8k", num_problems=20,
               eval_dataset="sample:gsm8k", max_step_tokens=8, max_solution_tokens=24, mode="full_solution",
               advantage="grpo", outcome_reward=1.0, lora_r=4, entropy_coef=0.01,  # the bonus moves a junk policy
               updates=4, rollout=RolloutConfig(replicas=1, num_cpus=0))
    names = ["mathprm_ppo_updates", "mathprm_ppo_reward", "mathprm_ppo_kl", "mathprm_ppo_tokens",
             "mathprm_ppo_staleness"]
    with MetricsWatcher(ray_cluster["metrics_export_port"], names) as watcher:
        assert train_ppo(cfg) == out.resolve()
    assert watcher.seen == set(names), f"missing on the metrics endpoint: {set(names) - watcher.seen}"
    summary = json.loads((out / PPO_STAGE.summary_file).read_text())
    assert summary["updates"] == 4 and summary["config"]["num_workers"] == 2
    history = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [h["update"] for h in history] == [0, 1, 2, 3, 4]
    assert all(h["staleness"] == 0 and h["logp_gap"] < 1e-3 for h in history[1:])  # merged LoRA weights synced
    for key in ("reward", "kl", "clip_frac", "entropy", "tokens_per_s", "rollout_accuracy"):
        assert all(key in h for h in history[1:]), key
    assert all(h["value_loss"] == 0.0 for h in history[1:])  # grpo: no critic
    assert "held_out_accuracy" in history[0] and "held_out_accuracy" in history[2]
    assert (out / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob("adapter_*"))  # merged: a plain HF directory
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in name or "v_head" in name for name, _ in model.named_parameters())
    base = dict(AutoModelForCausalLM.from_pretrained(qwen_policy_dir).named_parameters())
    assert any(not torch.equal(p, base[n]) for n, p in model.named_parameters())  # the adapters moved the weights


def test_prm_none_needs_no_directory_and_scores_zero():
    from mathprm.train.ppo import load_scorer, ppo_step_format

    cfg = PPOConfig(prm="none", mode="full_solution", outcome_reward=1.0, advantage="grpo")
    assert ppo_step_format(cfg).separator == arith.STEP_SEPARATOR
    scorer = load_scorer(cfg, [], torch.device("cpu"))
    assert scorer.score(["q", "r"], [["a", "b"], ["c"]]) == [[0.0, 0.0], [0.0]]


@pytest.mark.parametrize("mode", ["one_step", "full_solution"])
def test_blank_separator_only_and_cut_samples_make_episodes_that_encode(mode):
    """PPO's side of the sampled-step rule (`mathprm.steps`): a prefix built from the policy's
    own rollout holds no blank step (the generator's `prompt()` raises on one), and a blank or
    cut action still encodes, with one reward per written step."""
    from mathprm.scorer import ZeroScorer
    from tests.conftest import OddPolicy

    problems = arith.generate("easy", 8, seed=4, split="train")
    # prm only validates here (the scorer is given): none needs full_solution, one_step takes the oracle's name.
    cfg = PPOConfig(prm="none" if mode == "full_solution" else "oracle", mode=mode, outcome_reward=1.0, group_size=3,
                    reference_prefix_fraction=0.0)
    for only_odd in (False, True):
        policy = OddPolicy(FMT, only_odd=only_odd)
        episodes = collect_episodes(policy, ZeroScorer(), problems, cfg, FMT, seed=7)
        assert len(episodes) == 3 * len(problems) and policy.prompts
        assert all(not any(not s.strip() for s in ep.prefix) for ep in episodes)
        assert all(len(ep.rewards) == len(ep.steps) for ep in episodes if ep.steps)
        batch = make_batch(Prompter(TOK, FMT), [ep for ep in episodes if ep.steps], 512)
        assert batch.step_mask.sum() == sum(len(ep.steps) for ep in episodes if ep.steps)


def test_one_step_prefixes_cut_gsm8k_references_where_they_put_steps():
    """GSM8K writes a step per line; the policy's steps end in "\\n\\n". Prefixes come from the
    reference's lines (they used to be split on "\\n\\n" and so were always empty)."""
    import random
    import types

    from mathprm.data.problems import load_problems
    from mathprm.train.ppo_episodes import _one_step_prefixes

    problems = load_problems("sample:gsm8k", limit=20)
    fmt = StepFormat("\n\n")
    cfg = types.SimpleNamespace(reference_prefix_fraction=1.0)  # every prefix from a reference: no rollouts
    prefixes = _one_step_prefixes(None, problems, cfg, fmt, None, random.Random(0))
    assert sum(bool(pre) for pre in prefixes) >= len(problems) // 2
    for p, pre in zip(problems, prefixes):
        lines = p.solution.split("\n")
        assert pre == lines[: len(pre)] and len(pre) < len(lines)  # the reference's first lines, one left to write
        fmt.prompt(p.question, pre)  # a prefix the policy's format can write
