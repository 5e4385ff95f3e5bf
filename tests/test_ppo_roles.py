"""PPO at scale: rollout engines and reward workers as Ray actors, weight sync with versions,
token-exact learning on the sampler's log-probs, FSDP learners, placements, and resume."""


import json

import pytest
import torch

from mathprm.generation import Prefix, Sampling
from mathprm.prompts import Prompter
from mathprm.steps import StepFormat
from mathprm.train.ppo_episodes import Episode, make_batch
from mathprm.train.ppo_loss import token_logprobs
from mathprm.train.ppo_roles import RolloutEngine, _chunks

QWEN_FMT = StepFormat("\n\n")


def _perturbed(model, seed: int = 0) -> dict[str, torch.Tensor]:
    """The model's weights moved by noise (what a learner's update does), as a CPU state dict."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v + 0.05 * torch.randn(v.shape, generator=gen)).detach() if v.is_floating_point() else v
            for k, v in model.state_dict().items()}


def _learner_logprobs(model, ids, temperature=1.0) -> list[float]:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    return token_logprobs(logits, torch.tensor([ids]), temperature)[0].tolist()


def test_chunks_split_every_item_once_in_order():
    for n_items in range(0, 9):
        for parts in range(1, 5):
            got = [i for r in _chunks(n_items, parts) for i in r]
            assert got == list(range(n_items)) and all(len(r) for r in _chunks(n_items, parts))


def test_the_hf_sampler_returns_the_log_probs_the_learner_computes_for_what_it_drew(qwen_policy_dir):
    from transformers import AutoModelForCausalLM

    engine = RolloutEngine("hf", str(qwen_policy_dir), QWEN_FMT.separator, None)
    learner = AutoModelForCausalLM.from_pretrained(qwen_policy_dir)
    sampling = Sampling(temperature=0.8, max_solution_tokens=12, seed=3, logprobs=True)
    version, rolls = engine.rollouts([Prefix("What is 2+3?"), Prefix("Natalia sold 48 clips.")], 2, sampling)
    assert version == 0
    prompter = Prompter(engine.generator.tokenizer, QWEN_FMT, None)
    episodes = []
    for question, group in zip(["What is 2+3?", "Natalia sold 48 clips."], rolls):
        for r in group:
            assert len(r.logprobs) == len(r.token_ids) > 0
            prompt = prompter.ids(question, [])
            ref = _learner_logprobs(learner, prompt + list(r.token_ids), 0.8)[len(prompt) - 1:]
            assert max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-4
            episodes.append(Episode(0, question, [], list(r.steps) or [""], r.finished, r.truncated,
                                    rewards=[0.0] * max(len(r.steps), 1), action_ids=r.token_ids,
                                    action_logprobs=r.logprobs))
    batch = make_batch(prompter, episodes, 512)  # the log-probs land on the action tokens' positions
    assert bool(batch.sampled.all())
    for row, ep in enumerate(episodes):
        positions = batch.mask[row].nonzero().flatten()
        assert torch.allclose(batch.sample_logp[row, positions], torch.tensor(ep.action_logprobs))
        assert float(batch.sample_logp[row].abs().sum()) == pytest.approx(sum(abs(x) for x in ep.action_logprobs))
    greedy = engine.rollouts([Prefix("What is 2+3?")], 1, Sampling(temperature=0, max_solution_tokens=4,
                                                                     logprobs=True))[1]
    assert greedy[0][0].logprobs == ()  # greedy draws nothing


def test_an_hf_engine_holds_the_learners_weights_after_a_sync_and_tags_their_version(qwen_policy_dir):
    from transformers import AutoModelForCausalLM

    engine = RolloutEngine("hf", str(qwen_policy_dir), QWEN_FMT.separator, None)
    learner = AutoModelForCausalLM.from_pretrained(qwen_policy_dir)
    ids = engine.generator.tokenizer("The answer is 5.\n\nSo 2 + 3 = 5.")["input_ids"]
    before = engine.logprobs(ids)
    learner.load_state_dict(_perturbed(learner))
    assert engine.load_weights(7, learner.state_dict()) == 7 and engine.get_version() == 7
    after = engine.logprobs(ids)
    assert max(abs(a - b) for a, b in zip(after, _learner_logprobs(learner, ids))) < 1e-3
    assert max(abs(a - b) for a, b in zip(after, before)) > 1e-2  # the sync changed what it computes
    with pytest.raises(ValueError, match="do not fit"):
        engine.load_weights(8, {"not.a.weight": torch.zeros(1)})


def test_lora_merged_state_is_what_merge_and_unload_saves_and_leaves_the_model_alone(qwen_policy_dir):
    import copy

    from transformers import AutoModelForCausalLM

    from mathprm.train.run import add_lora, lora_merged_state

    lm = add_lora(AutoModelForCausalLM.from_pretrained(qwen_policy_dir), 4, 16, 0.0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at zero: give the adapters something to merge
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    merged = lora_merged_state(lm)
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())  # untouched
    reference = copy.deepcopy(lm).merge_and_unload().state_dict()
    assert set(merged) == set(reference)
    assert max(float((merged[k] - reference[k]).abs().max()) for k in reference) < 1e-6


@pytest.mark.vllm
def test_a_vllm_engine_reloads_the_learners_weights_and_samples_with_their_log_probs(vllm_generator, tiny_policy_dir):
    """The shared engine (tiny char policy) through a RolloutEngine: after a sync its log-probs of
    a fixed sequence and of what it draws equal the learner's within 1e-3; the original weights
    go back at the end (the engine is shared by the run)."""
    from transformers import AutoModelForCausalLM

    engine = RolloutEngine.__new__(RolloutEngine)
    engine.backend, engine.generator, engine.version = "vllm", vllm_generator, 0
    engine.run_dir = tiny_policy_dir.parent / "engine-sync"
    learner = AutoModelForCausalLM.from_pretrained(tiny_policy_dir)
    original = {k: v.clone() for k, v in learner.state_dict().items()}
    ids = vllm_generator.prompter.ids("What is 2+3?", ["2 + 3 = 5"])
    try:
        learner.load_state_dict(_perturbed(learner, seed=1))
        engine.load_weights(3, learner.state_dict())
        got = engine.logprobs(ids)
        assert max(abs(a - b) for a, b in zip(got, _learner_logprobs(learner, ids))) < 1e-3
        _, rolls = engine.rollouts([Prefix("What is 1+1?")], 2,
                                   Sampling(temperature=1.0, max_solution_tokens=10, seed=5, logprobs=True))
        prompt = vllm_generator.prompter.ids("What is 1+1?", [])
        for r in rolls[0]:
            ref = _learner_logprobs(learner, prompt + list(r.token_ids))[len(prompt) - 1:]
            assert len(r.logprobs) == len(r.token_ids) and max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-3
    finally:
        engine.load_weights(0, original)
    assert max(abs(a - b) for a, b in zip(engine.logprobs(ids), _learner_logprobs(
        AutoModelForCausalLM.from_pretrained(tiny_policy_dir), ids))) < 1e-3


# ----------------------------------------------------------------------------- real Ray Train runs


def _cfg(policy, out, **kw):
    from mathprm.train.ppo import PPOConfig

    values = dict(policy=str(policy), prm="oracle", dataset="arith:easy", num_problems=40, eval_dataset="arith:easy",
                  eval_problems=4, prompts_per_update=3, group_size=2, updates=3, minibatch_size=6, ppo_epochs=1,
                  lr=1e-4, max_step_tokens=12, max_solution_tokens=40, eval_every=2, checkpoint_every=1,
                  mode="full_solution", advantage="grpo", outcome_reward=1.0, num_workers=1, out_dir=str(out))
    return PPOConfig(**{**values, **kw})


def _history(out) -> list[dict]:
    from mathprm.train.ppo import METRICS_FILE

    return [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]


@pytest.mark.ray
def test_rollout_engines_and_reward_workers_train_what_the_learner_trains_alone(ray_cluster, tiny_policy_dir,
                                                                                published_prms, tmp_path):
    """Same config and seeds, colocated: one learner sampling and scoring itself vs one learner
    with an hf rollout engine and a reward worker holding a published PRM (qwen kind). Same
    episodes (each prefix keeps its seed), same rewards, the same losses: the same curves. The
    weights agree to well within what training moved them: the engine's log-probs differ from
    the learner's own sampler's by float rounding (~1e-5, another thread count), and AdamW turns
    the near-zero gradients of an update with no reward signal into steps of its full rate."""
    from transformers import AutoModelForCausalLM

    from mathprm.train.ppo import train_ppo
    from mathprm.train.ppo_roles import RewardConfig, RolloutConfig

    prm = f"qwen:{published_prms['qwen']}"
    alone = train_ppo(_cfg(tiny_policy_dir, tmp_path / "alone", prm=prm, updates=2, eval_problems=2))
    actors = train_ppo(_cfg(tiny_policy_dir, tmp_path / "actors", prm=prm, updates=2, eval_problems=2,
                            placement="colocated",
                            rollout=RolloutConfig(replicas=1, num_cpus=0.5), reward=RewardConfig(replicas=1, num_cpus=0.5)))
    a, b = _history(alone), _history(actors)
    assert [h["update"] for h in b] == [0, 1, 2]
    for key in ("reward", "kl", "held_out_accuracy", "rollout_accuracy", "entropy", "pg_loss"):
        assert [h.get(key) for h in a] == pytest.approx([h.get(key) for h in b], abs=1e-5), key
    assert all(h["staleness"] == 0 and h["logp_gap"] < 1e-3 for h in b[1:])  # synced before every sample
    assert all(h["rss_mb_rollout"] > 0 and h["rss_mb_reward"] > 0 and h["rss_mb_learner"] > 0 for h in b[1:])
    assert "rss_mb_rollout" not in a[1] and any(h["reward"] != 0 for h in b[1:])
    wa = AutoModelForCausalLM.from_pretrained(alone).state_dict()
    wb = AutoModelForCausalLM.from_pretrained(actors).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_policy_dir).state_dict()
    moved = max(float((wa[k] - base[k]).abs().max()) for k in wa)
    assert moved > 1e-5 and max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 0.5 * moved


@pytest.mark.ray
def test_fsdp_learners_with_separate_roles_one_update_ahead_survive_a_killed_learner_engine_and_reward_worker(
        ray_cluster, qwen_policy_dir, published_prms, tmp_path):
    """The cluster shape on CPU: two FSDP learners on the head node, a rollout engine and a reward
    worker (published qwen PRM) on a node of their own, the next update sampled while the learners
    train (max_staleness 1). After the first checkpoint a learner, the engine and the reward worker
    are killed (SIGKILL) together: the group resumes from that checkpoint with new roles synced to
    it, and the run ends with every update counted once and no episode staler than allowed."""
    from ray.util.state import list_actors

    from mathprm.train.ppo import PPO_STAGE, train_ppo
    from mathprm.train.ppo_roles import RewardConfig, RolloutConfig
    from tests.conftest import TrainWorkerKiller

    def role_actors() -> list:
        return [a for a in list_actors(address=f"http://{ray_cluster['webui_url']}", detail=True, limit=10000)
                if a.class_name in ("RolloutEngine", "RewardWorker")]

    before = {a.actor_id for a in role_actors()}  # other tests' roles
    cluster = ray_cluster["cluster"]
    node = cluster.add_node(num_cpus=0, resources={"roles": 2})  # no CPU: the learners cannot land there
    out = tmp_path / "ppo"
    cfg = _cfg(qwen_policy_dir, out, prm=f"qwen:{published_prms['qwen']}", dataset="sample:gsm8k", num_problems=20,
               eval_dataset="sample:gsm8k", eval_problems=2, max_step_tokens=8, max_solution_tokens=24, updates=4,
               eval_every=3, num_workers=2, strategy="fsdp", placement="separate",
               rollout=RolloutConfig(replicas=1, num_cpus=0, resources={"roles": 1}, max_staleness=1),
               reward=RewardConfig(replicas=1, num_cpus=0, resources={"roles": 1}))
    snapshot = tmp_path / "ray_train" / "ppo-ppo" / "checkpoint_manager_snapshot.json"
    try:
        with TrainWorkerKiller(snapshot, ray_cluster["webui_url"], ("RayTrainWorker", "RolloutEngine", "RewardWorker"),
                               together=True) as killer:
            assert train_ppo(cfg) == out.resolve()
        assert len(killer.killed) == 3, f"killed {killer.killed}: the run ended first"
        roles = [a for a in role_actors() if a.actor_id not in before]
        assert len(roles) >= 4  # two attempts, two roles each
        assert {a.node_id for a in roles} == {node.node_id}  # separate: on the roles' node only
    finally:
        cluster.remove_node(node)
    summary = json.loads((out / PPO_STAGE.summary_file).read_text())
    assert summary["updates"] == 4 and summary["resumed_from_update"] >= 1
    history = _history(out)
    assert [h["update"] for h in history] == list(range(5))  # each update once, across the two attempts
    assert all(h["staleness"] <= 1 for h in history[1:]) and any(h["staleness"] == 1 for h in history[1:])
    assert all(h["logp_gap"] < 5.0 for h in history[1:])


def test_colocated_roles_that_would_take_the_learners_whole_gpu_are_refused_before_ray_starts(tiny_policy_dir,
                                                                                               tmp_path):
    from mathprm.config import ConfigError
    from mathprm.train.ppo import train_ppo
    from mathprm.train.ppo_roles import RewardConfig, RolloutConfig

    cfg = _cfg(tiny_policy_dir, tmp_path / "ppo", use_gpu=True, num_workers=2, placement="colocated",
               rollout=RolloutConfig(replicas=2, num_gpus=0.5), reward=RewardConfig(replicas=2, num_gpus=0.5))
    with pytest.raises(ConfigError, match="placement: colocated roles ask 2 GPUs in all, 1.00 of each"):
        train_ppo(cfg)
    assert not (tmp_path / "ppo").exists()
