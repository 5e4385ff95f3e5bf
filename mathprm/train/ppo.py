"""PPO with per-step PRM reward, on Ray Train.

    mathprm train-ppo --config mathprm/configs/ppo_arith.yaml     # runs/arith/policy + prm -> runs/arith/policy-ppo

Episodes (`mode`):
- `one_step`: the prompt is a question plus a solution prefix, cut at a random
  step from the problem's reference solution (share `reference_prefix_fraction`) or from one
  of the policy's own rollouts; the action is the next step; its reward is the PRM's score
  of that step (the last score of prefix + step).
- `full_solution` (Math-Shepherd's PPO): the policy writes a whole solution; every step gets
  its PRM score as reward at the step's last token, plus `outcome_reward` on the last step
  when the final answer is right.
An action that hits its token limit without ending gets `truncated_reward` instead of a PRM
score. Each prompt is sampled `group_size` times. All shaping is in the config.

Advantages (`advantage`):
- `gae`: a value head on the policy's last hidden state, per-token rewards = step rewards
  minus `kl_coef` x k1 KL to the frozen reference (InstructGPT), GAE(gamma, lam), advantages
  whitened per batch; `whiten_rewards` rescales the step rewards first.
- `grpo`: no critic; step rewards normalised within each prompt's group, advantage = the
  normalised rewards still to come (DeepSeekMath's process supervision), and the KL to the
  reference enters the loss as `kl_coef` x k3.
`kl_target` makes the coefficient adaptive (Ziegler et al. 2019). The maths and the update are in
`mathprm.train.ppo_loss`, the episodes in `mathprm.train.ppo_episodes`; this module is the config
and the Ray Train loop on the trainer skeleton (`mathprm.train.run`).

Distributed shape: three roles on Ray (`mathprm.train.ppo_roles`), each a config section.
- Learners: a `TorchTrainer` with `num_workers` workers (gloo on CPU, NCCL on GPU) holding the
  policy, its frozen reference and the value head; `strategy` ddp (replicas, `prepare_model`) or
  fsdp (FSDP2 shards, `mathprm.train.run.shard`; checkpoints gathered whole on rank 0).
- Rollout engines (`rollout`): actors holding a copy of the policy (`hf` or `vllm`) that sample
  with their token ids and sampling log-probs. After every update rank 0 sends the policy's
  weights (LoRA merged) through the object store, tagged with the update count as their version;
  each episode carries the version it was sampled under, and none older than
  `rollout.max_staleness` updates is trained on (1: the next update is sampled while the learners
  train). `rollout.replicas: 0` is the small shape: each learner samples with the weights it is
  training (`HFGenerator.from_model`, no copy).
- Reward workers (`reward`): actors holding the Scorer (a mathprm PRM, a published PRM kind, the
  oracle); `reward.replicas: 0`: each learner holds its own.
`placement: colocated` puts the roles on the learners' nodes (sharing their GPUs: the learners
then ask 1 - the roles' share of a GPU each); `separate` lets Ray place them anywhere (a node pool
through `resources`). Each learner samples its own prompts (a pure function of seed, rank and
update; every prefix carries its own sampling seed, so the engines' split does not change the
episodes), and a killed learner, engine or reward worker restarts the group from the last
checkpoint (`max_failures`), the engines synced to it before the first sample. The learner trains
on the token ids the sampler drew (`Episode.action_ids`), not on the text encoded again, and its
importance ratio's old log-probs are the sampler's (`Episode.action_logprobs`); the prompt is the
sampler's (`mathprm.prompts`: the chat template when the policy has one).

Every update prints a progress line and reports metrics (mean reward,
KL, clip fraction, entropy, value loss, tokens/s) through `ray.train.report`; every
`eval_every` updates the workers measure greedy accuracy on held-out problems together.
Checkpoints every `checkpoint_every` updates; a killed run resumes from the latest one. The
final policy is a plain HF directory (LoRA merged), with `ppo_summary.json`, the metric
history `ppo_metrics.jsonl` and the curves `ppo_curves.png`, written once, atomically.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mathprm.config import ConfigError, from_dict, to_dict
from mathprm.data.answers import judge_grader
from mathprm.data.problems import Problem, token_caps
from mathprm.generation import MIN_TEMPERATURE
from mathprm.models import check_model_dir, loading
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.scorer import ArithOracle, ZeroScorer, build_scorer, check_oracle, parse_prm, trained_separator
from mathprm.steps import StepFormat, step_format_for
from mathprm.train import ppo_loss as ppo
from mathprm.train.ppo_episodes import collect_episodes, make_batch, pick_prompts, sampling_seed
from mathprm.train.ppo_loss import PolicyWithValue, PPOBatch, param_groups, ppo_update
from mathprm.train.ppo_roles import PLACEMENTS, EngineGroup, RewardConfig, RewardGroup, RolloutConfig
from mathprm.train.run import STRATEGIES, Stage, Worker, add_lora, greedy_accuracy, launch, shard

PPO_STAGE = Stage("ppo", "ppo", "policy", "ppo_summary.json", may_change=(
    "updates", "time_budget_min", "eval_every", "checkpoint_every", "out_dir", "overwrite",
    "ray_address", "num_cpus", "max_failures"))
METRICS_FILE = "ppo_metrics.jsonl"
PLOT_FILE = "ppo_curves.png"


@dataclasses.dataclass
class PPOConfig:
    policy: str = "runs/arith/policy"  # HF causal-LM directory: the initial policy and the frozen reference
    prm: str = "runs/arith/prm"  # DIR | KIND:DIR (mathprm.scorer.parse_prm); "oracle": the arithmetic world's
    # exact step checker; "none": no step reward, only outcome_reward (full_solution): the baseline a PRM must beat
    dataset: str = "arith:hard"  # training problems (train split for arith:*), a dataset name or a table path
    num_problems: int = 4000  # size of the training pool
    # held-out problems; None: the dataset's test split for arith:*, to be given for any other dataset
    eval_dataset: str | None = None
    eval_problems: int = 100
    # the system message of a chat prompt when the policy's tokenizer has a chat template (mathprm.prompts)
    system_prompt: str | None = DEFAULT_SYSTEM
    mode: Literal["one_step", "full_solution"] = "one_step"
    advantage: Literal["gae", "grpo"] = "gae"
    critic: Literal["shared", "separate"] = "shared"  # gae: value head on the policy's hidden state, or on its own copy
    reference_prefix_fraction: float = 0.5  # one_step: prefixes cut from reference solutions (rest: own rollouts)
    outcome_reward: float = 0.0  # full_solution: added to the last step's reward when the answer is right
    truncated_reward: float = 0.0  # the reward of a step or solution cut by its token limit (no PRM score)
    prompts_per_update: int = 32  # per worker
    group_size: int = 4  # samples per prompt (grpo needs >= 2)
    updates: int = 100
    time_budget_min: float | None = None  # stop cleanly (and still save) after this many minutes
    ppo_epochs: int = 1  # passes over each update's episodes
    minibatch_size: int = 128  # episodes per optimiser step, per worker (small ones let the policy drift)
    lr: float = 2e-5
    critic_lr: float | None = None  # gae: the value head's (and separate critic's) learning rate; None: lr
    clip: float = 0.2  # policy ratio clip
    value_clip: float = 0.2
    vf_coef: float = 0.5
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05  # initial KL coefficient (fixed when kl_target is null)
    kl_target: float | None = None  # adaptive KL: the per-episode KL to steer toward
    kl_horizon: int = 10000
    entropy_coef: float = 0.0
    whiten_rewards: bool = False
    max_grad_norm: float = 1.0
    temperature: float = 1.0  # sampling temperature; log-probs are taken at the same temperature
    max_step_tokens: int | None = None  # None: the dataset's (mathprm.data.problems.token_caps: arith 64/384, MATH 512/2048)
    max_solution_tokens: int | None = None
    separator: str | None = None  # step separator; None: the PRM's (prm_config.json), else the dataset's
    lora_r: int = 0  # > 0: LoRA adapters (PEFT); the reference is then the base with adapters off
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    eval_every: int = 10  # updates between held-out greedy evaluations (0: only at the start and end)
    checkpoint_every: int = 10  # updates between rank-0 checkpoints
    seed: int = 0
    eval_seed: int = 1
    # worker-group restarts from the last checkpoint after a worker or its node dies (Ray Train FailureConfig)
    max_failures: int = 2
    num_workers: int = 1  # learners (Ray Train workers)
    cpus_per_worker: int = 1  # Ray gives each learner this many CPUs (and torch as many threads)
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"  # learners hold replicas (DDP) or shards (FSDP2; needs rollout engines)
    # Rollout engines (replicas 0: each learner samples with its own weights, HF) and reward
    # workers (replicas 0: each learner holds the Scorer); mathprm.train.ppo_roles.
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    placement: Literal["colocated", "separate"] = "colocated"  # the roles on the learners' nodes, or anywhere
    precision: Literal["fp32", "bf16"] = "fp32"
    out_dir: str = "runs/arith/policy-ppo"
    overwrite: bool = False
    ray_address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
        if self.eval_dataset is None:
            if not self.dataset.startswith("arith:"):
                raise ValueError(f"eval_dataset: give held-out problems for {self.dataset} (a dataset name or a table "
                                 "path); only arith:* has a test split of its own")
            self.eval_dataset = self.dataset
        steps, solutions = token_caps(self.dataset)
        self.max_step_tokens = steps if self.max_step_tokens is None else self.max_step_tokens
        self.max_solution_tokens = solutions if self.max_solution_tokens is None else self.max_solution_tokens
        for name in ("num_problems", "eval_problems", "prompts_per_update", "group_size", "updates", "ppo_epochs",
                     "minibatch_size", "max_step_tokens", "max_solution_tokens", "checkpoint_every", "num_workers",
                     "cpus_per_worker", "kl_horizon"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {getattr(self, name)!r}")
        if self.advantage == "grpo" and self.group_size < 2:
            raise ValueError(f"group_size: grpo compares the samples of a prompt, so it needs >= 2, got {self.group_size}")
        if self.mode not in ("one_step", "full_solution"):
            raise ValueError(f"mode: must be one_step or full_solution, got {self.mode!r}")
        if self.advantage not in ("gae", "grpo"):
            raise ValueError(f"advantage: must be gae or grpo, got {self.advantage!r}")
        if self.critic not in ("shared", "separate"):
            raise ValueError(f"critic: must be shared or separate, got {self.critic!r}")
        if self.critic == "separate" and self.lora_r:
            raise ValueError("critic: separate copies the whole model, which defeats lora_r > 0; "
                             "use critic=shared or advantage=grpo with LoRA")
        if not 0.0 <= self.reference_prefix_fraction <= 1.0:
            raise ValueError(f"reference_prefix_fraction: must be in [0, 1], got {self.reference_prefix_fraction}")
        for name in ("lr", "clip", "value_clip", "max_grad_norm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.critic_lr is not None and not self.critic_lr > 0:
            raise ValueError(f"critic_lr: must be > 0 or null, got {self.critic_lr}")
        for name in ("vf_coef", "kl_coef", "entropy_coef", "eval_every", "lora_r"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"gamma / lam: need gamma in (0, 1] and lam in [0, 1], got {self.gamma} / {self.lam}")
        if self.kl_target is not None and not self.kl_target > 0:
            raise ValueError(f"kl_target: must be > 0 or null, got {self.kl_target}")
        if self.time_budget_min is not None and not self.time_budget_min > 0:
            raise ValueError(f"time_budget_min: must be > 0 or null, got {self.time_budget_min}")
        if not MIN_TEMPERATURE <= self.temperature <= 2:
            raise ValueError(f"temperature: PPO samples, so it must be in [{MIN_TEMPERATURE:g}, 2], got {self.temperature}")
        prm_kind = parse_prm(self.prm).kind  # ValueError naming prm for a malformed value
        check_oracle(parse_prm(self.prm), self.dataset)
        if prm_kind == "none" and not (self.mode == "full_solution" and self.outcome_reward != 0):
            raise ValueError("prm: none leaves only the outcome reward, so it needs mode=full_solution and "
                             f"outcome_reward != 0, got mode={self.mode} outcome_reward={self.outcome_reward}")
        if self.separator is not None:
            StepFormat(self.separator)
        self.rollout.check("rollout")
        self.reward.check("reward")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: must be one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.strategy == "fsdp" and not self.rollout.replicas:
            raise ValueError("strategy: fsdp shards the policy over the learners, which then cannot sample on "
                             "their own; give rollout engines (rollout.replicas >= 1)")
        if self.strategy == "fsdp" and self.lora_r:
            raise ValueError("strategy: fsdp with lora_r > 0 is not supported; use ddp for LoRA (its full "
                             "weights stay frozen, so each learner's replica costs little)")


# ----------------------------------------------------------------------------- episodes (pure)


# ----------------------------------------------------------------------------- the policy with a value head


# ----------------------------------------------------------------------------- one update (pure torch)


# ----------------------------------------------------------------------------- Ray shell


def ppo_step_format(cfg: PPOConfig) -> StepFormat:
    """The steps the policy writes and the reward scores (`step_format_for`: the config's, else
    the PRM's, else the dataset's)."""
    return step_format_for(cfg.dataset, cfg.separator, trained_separator(parse_prm(cfg.prm)))


def load_pools(cfg: PPOConfig) -> tuple[list[Problem], list[Problem]]:
    """(training pool, held-out problems); for arith:* the train and test splits, so no
    held-out problem is ever trained on."""
    from mathprm.data.problems import load_problems

    def load(spec: str, n: int, seed: int, split: str) -> list[Problem]:
        kw = {"seed": seed, "split": split} if spec.startswith("arith:") else {}
        return list(load_problems(spec, limit=n, **kw))

    train = load(cfg.dataset, cfg.num_problems, cfg.seed, "train")
    held_out = load(cfg.eval_dataset, cfg.eval_problems, cfg.eval_seed, "test")
    if not train:
        raise ConfigError(f"dataset: {cfg.dataset} gave no problems")
    return train, held_out


def train_ppo(cfg: PPOConfig) -> Path:
    """Train (or reuse, or resume) the PPO policy; returns its directory."""

    def prepare(out: Path) -> tuple[dict, dict]:
        check_model_dir(cfg.policy, "policy")
        try:
            fmt = ppo_step_format(cfg)
        except FileNotFoundError as e:
            raise ConfigError(f"prm: {e}") from None
        load_pools(cfg)  # fail here, not inside a worker, on a bad dataset name
        settings = {**to_dict(cfg), "policy": str(Path(cfg.policy).resolve()), "separator": fmt.separator,
                    "prm": str(parse_prm(cfg.prm).resolved()), "out_dir": str(out)}
        resources = {"CPU": cfg.cpus_per_worker}
        shared = cfg.rollout.replicas * cfg.rollout.num_gpus + cfg.reward.replicas * cfg.reward.num_gpus
        if cfg.use_gpu and cfg.placement == "colocated" and shared:  # the roles take a share of each learner's GPU
            share = shared / cfg.num_workers
            if share >= 1:
                raise ConfigError(f"placement: colocated roles ask {shared:g} GPUs in all, {share:.2f} of each "
                                  f"learner's GPU; give them fractions that leave the learners some (or separate)")
            resources["GPU"] = round(1 - share, 4)
        return settings, {"resources_per_worker": resources}

    return launch(PPO_STAGE, cfg, _train_loop, prepare,
                  {"policy": cfg.policy, "prm": parse_prm(cfg.prm).path, "out_dir": cfg.out_dir})


def load_scorer(cfg: PPOConfig, pool: Sequence[Problem], device: torch.device, batch_size: int = 32):
    """The step reward's Scorer; `prm: none` scores every step 0 (only the outcome rewards)."""
    scorer = build_scorer(parse_prm(cfg.prm), lambda: ArithOracle(pool), device=str(device), batch_size=batch_size)
    return scorer if scorer is not None else ZeroScorer()


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathprm.models.gen_hf import HFGenerator

    fmt = StepFormat(config["separator"])
    cfg = from_dict(PPOConfig, config)  # the loop's config is `to_dict`'s: nested sections as dicts
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    pool, held_out = load_pools(cfg)
    with loading(cfg.policy):
        tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
        lm = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32)
    max_length = int(getattr(lm.config, "max_position_embeddings", 0) or 1 << 30)
    if cfg.lora_r:
        lm = add_lora(lm, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
        reference = None  # the base with the adapters switched off
    else:
        reference = copy.deepcopy(lm).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    # "step" counts updates.
    worker = Worker(PPO_STAGE, PolicyWithValue(lm, value_head=cfg.advantage == "gae", critic=cfg.critic),
                    {"step": 0, "elapsed": 0.0, "kl_coef": cfg.kl_coef, "history": []},
                    lambda m: torch.optim.AdamW(param_groups(m, cfg.lr, cfg.critic_lr)), strategy=cfg.strategy)
    state, rank, world, model, unwrapped = worker.state, worker.rank, worker.world, worker.model, worker.unwrapped
    if reference is not None:
        reference = shard(reference.to(device)) if cfg.strategy == "fsdp" else reference.to(device)
    prompter = Prompter(tokenizer, fmt, cfg.system_prompt)  # the learner's prompts are the sampler's
    roles = _Roles(cfg, config, worker, prompter, max_length)
    generator = roles.engines or HFGenerator.from_model(unwrapped.lm, tokenizer, fmt, system_prompt=cfg.system_prompt)
    scorer = roles.rewards or load_scorer(cfg, pool, device)
    kl_ctl = ppo.AdaptiveKL(state["kl_coef"], cfg.kl_target, cfg.kl_horizon)

    @torch.no_grad()
    def ref_logp(batch: PPOBatch) -> torch.Tensor:
        if reference is not None:
            logits = reference(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        else:
            with unwrapped.lm.disable_adapter():
                logits = unwrapped.lm(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        return ppo.token_logprobs(logits, batch.ids, cfg.temperature)

    def held_out_accuracy() -> float:
        return greedy_accuracy(generator, held_out, rank, world, judge_grader, cfg.max_solution_tokens)

    def sample(u: int) -> tuple[list, float, float]:
        """Update u's episodes, each tagged with the weight version it was sampled under, and the
        seconds spent sampling and scoring them."""
        problems = pick_prompts(pool, cfg.prompts_per_update, cfg.seed, rank, u)
        if roles.engines:
            roles.engines.mark()
        timed = _TimedScorer(scorer)
        start = time.monotonic()
        episodes = collect_episodes(generator, timed, problems, cfg, fmt, sampling_seed(cfg.seed, rank, u))
        version = roles.engines.oldest if roles.engines and roles.engines.oldest is not None else u
        for ep in episodes:
            ep.version = version
        return episodes, time.monotonic() - start - timed.seconds, timed.seconds

    metrics_out = _RayMetrics() if rank == 0 else None
    update, history = state["step"], state["history"]
    roles.sync(update)  # the engines start from the checkpoint's weights (or the initial policy's)
    started = time.monotonic() - state["elapsed"]
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    if update == 0:
        acc = held_out_accuracy()
        history.append({"update": 0, "held_out_accuracy": acc})
        worker.log(f"update 0/{cfg.updates}: held-out greedy accuracy {acc:.3f} on {len(held_out)} problems")
    stopped_by = "updates"
    ahead = concurrent.futures.ThreadPoolExecutor(1) if cfg.rollout.max_staleness else None
    pending = None  # max_staleness 1: the next update's episodes, sampled while this one trains
    while update < cfg.updates:
        t0 = time.monotonic()
        episodes, t_sample, t_score = pending.result() if pending is not None else sample(update)
        pending = None
        if update - episodes[0].version > cfg.rollout.max_staleness:  # never trained on: sample again
            roles.sync(update)
            episodes, t_sample, t_score = sample(update)
        staleness = update - episodes[0].version
        t_rollout = time.monotonic() - t0  # waited for the episodes (less than t_sample when sampled ahead)
        if ahead is not None and update + 1 < cfg.updates:
            pending = ahead.submit(sample, update + 1)
        batch = make_batch(prompter, episodes, max_length).to(device)
        stats = ppo_update(model, ref_logp, batch, worker.optimizer, cfg, kl_ctl.value,
                           sampling_seed(cfg.seed, rank, -update))
        t_sync = time.monotonic()
        roles.sync(update + 1)
        t_sync = time.monotonic() - t_sync
        update += 1
        elapsed = time.monotonic() - started
        # Episode statistics, summed over workers: every rank then reports the same numbers.
        totals = worker.reduce(torch.tensor([
            sum(sum(ep.rewards) for ep in episodes), sum(len(ep.rewards) for ep in episodes), len(episodes),
            sum(ep.n_generated for ep in episodes), sum(bool(ep.correct) for ep in episodes),
            sum(ep.truncated for ep in episodes), stats["kl"] * len(episodes), time.monotonic() - t0,
            elapsed / budget_s if budget_s else 0.0,
        ], dtype=torch.float64))
        local = {k: float(worker.reduce(torch.tensor(stats[k], dtype=torch.float64), "mean"))
                 for k in ("pg_loss", "value_loss", "clip_frac", "approx_kl", "entropy")}
        n_eps = float(totals[2])
        kl_mean = float(totals[6]) / n_eps
        metrics = {
            "update": update, "reward": float(totals[0]) / n_eps, "step_reward": float(totals[0]) / max(float(totals[1]), 1),
            "kl": kl_mean, "kl_coef": kl_ctl.value, **local,
            "tokens_per_s": float(totals[3]) / max(float(totals[7]) / world, 1e-9),
            "rollout_s": t_rollout, "sample_s": t_sample, "reward_s": t_score, "truncated": float(totals[5]) / n_eps, "elapsed_s": elapsed,
            "staleness": float(worker.reduce(torch.tensor(float(staleness)), "max")),
            "logp_gap": float(worker.reduce(torch.tensor(stats["logp_gap"]), "max")), "sync_s": t_sync,
            **roles.memory(),
        }
        if cfg.mode == "full_solution":
            metrics["rollout_accuracy"] = float(totals[4]) / n_eps
        kl_ctl.update(kl_mean, int(n_eps))
        stop = budget_s is not None and float(totals[8]) / world >= 1.0
        if (cfg.eval_every and update % cfg.eval_every == 0) or update == cfg.updates or stop:
            metrics["held_out_accuracy"] = held_out_accuracy()
        history.append(metrics)
        if metrics_out is not None:
            metrics_out.record(metrics, tokens=int(totals[3]))
        shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("reward", "kl", "clip_frac", "entropy", "value_loss",
                                                            "tokens_per_s", "held_out_accuracy") if k in metrics)
        worker.log(f"update {update}/{cfg.updates} {shown} elapsed {elapsed:.0f}s")
        state = {"step": update, "elapsed": elapsed, "kl_coef": kl_ctl.value, "history": history,
                 "resumed_from": state.get("resumed_from", 0)}
        worker.report(state, metrics, checkpoint=stop or update == cfg.updates or update % cfg.checkpoint_every == 0)
        if stop:
            stopped_by = "time_budget"
            break
    if pending is not None:  # stopped by the time budget with the next update's episodes on the way
        pending.result()
    if ahead is not None:
        ahead.shutdown()

    summary = {
        "updates": update, "stopped_by": stopped_by, "elapsed_s": time.monotonic() - started,
        "resumed_from_update": state.get("resumed_from", 0), "config": {**config},
        "held_out_accuracy_start": history[0]["held_out_accuracy"],
        "held_out_accuracy_end": next((h["held_out_accuracy"] for h in reversed(history)
                                       if "held_out_accuracy" in h), None),
    }
    final = roles.policy_state() if cfg.strategy == "fsdp" else None  # collective: the shards gathered
    worker.save(cfg.out_dir, cfg.overwrite,
                lambda tmp: _write_policy(unwrapped, tokenizer, cfg, history, tmp, final), summary)
    worker.log(f"saved the policy to {cfg.out_dir} after {update} updates ({stopped_by}); held-out accuracy "
               f"{summary['held_out_accuracy_start']:.3f} -> {summary['held_out_accuracy_end']:.3f}")


class _TimedScorer:
    """A Scorer that adds up the seconds its `score` calls take."""

    def __init__(self, scorer: Any) -> None:
        self.scorer, self.seconds = scorer, 0.0

    def score(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        start = time.monotonic()
        try:
            return self.scorer.score(questions, steps)
        finally:
            self.seconds += time.monotonic() - start


class _Roles:
    """The run's rollout engines and reward workers (`mathprm.train.ppo_roles`), or none when both
    roles have 0 replicas (`engines` / `rewards` are then None and the learners do both jobs).
    Rank 0 creates and owns the actors; the other ranks find them by name."""

    def __init__(self, cfg: PPOConfig, config: dict, worker: Worker, prompter: Prompter, max_length: int) -> None:
        self.cfg, self.worker = cfg, worker
        self.engines: EngineGroup | None = None
        self.rewards: RewardGroup | None = None
        if not (cfg.rollout.replicas or cfg.reward.replicas):
            return
        import ray
        import torch.distributed as dist

        from mathprm.train.ppo_roles import create_roles, lookup

        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if dist.is_initialized():
            nodes = [None] * worker.world
            dist.all_gather_object(nodes, node)
        names: list = [None]
        if worker.rank == 0:
            names[0], self._owned = create_roles(config, cfg.rollout, cfg.reward, cfg.placement, nodes)
        if dist.is_initialized():
            dist.broadcast_object_list(names, src=0)
        if names[0]["rollout"]:
            self.engines = EngineGroup(lookup(names[0]["rollout"]), prompter, max_length)
        if names[0]["reward"]:
            self.rewards = RewardGroup(lookup(names[0]["reward"]))
        worker.log(f"{cfg.rollout.replicas} rollout engine(s) ({cfg.rollout.backend}), {cfg.reward.replicas} reward "
                   f"worker(s), {cfg.placement}; learners: {worker.world} x {cfg.strategy}")

    def policy_state(self) -> dict[str, torch.Tensor] | None:
        """The policy's weights as an HF checkpoint names them (LoRA merged), on rank 0; collective."""
        from mathprm.train.run import lora_merged_state

        if self.cfg.lora_r:  # DDP only (the config refuses LoRA under FSDP)
            return lora_merged_state(self.worker.unwrapped.lm) if self.worker.rank == 0 else None
        state = self.worker.full_state_dict()
        return None if state is None else {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}

    def sync(self, version: int) -> None:
        """The engines' weights to the learners' (tagged `version`); every rank waits for it."""
        if self.engines is None:
            return
        state = self.policy_state()
        if self.worker.rank == 0:
            self.engines.sync(version, state)
        self.worker.reduce(torch.zeros(1))  # a barrier: no rank samples before the engines hold `version`

    def memory(self) -> dict[str, float]:
        """Peak resident memory (MiB) of the largest learner and, when they run, engine and reward worker."""
        from mathprm.train.ppo_roles import peak_rss_mb

        out = {"rss_mb_learner": float(self.worker.reduce(torch.tensor(peak_rss_mb(), dtype=torch.float64), "max"))}
        if self.engines is not None:
            out["rss_mb_rollout"] = self.engines.peak_rss_mb()
        if self.rewards is not None:
            out["rss_mb_reward"] = self.rewards.peak_rss_mb()
        return out


class _RayMetrics:
    """The run's curves as Ray metrics (`mathprm.metrics`: mathprm_ppo_*), set by rank 0."""

    GAUGES = ("reward", "kl", "kl_coef", "clip_frac", "entropy", "value_loss", "tokens_per_s", "held_out_accuracy",
              "staleness", "logp_gap")

    def __init__(self) -> None:
        from mathprm.metrics import create

        self.updates, self.tokens = create("mathprm_ppo_updates"), create("mathprm_ppo_tokens")
        self.gauges = {k: create(f"mathprm_ppo_{k}") for k in self.GAUGES}

    def record(self, metrics: dict, tokens: int) -> None:
        self.updates.inc(1)
        if tokens > 0:  # a Ray Counter refuses 0
            self.tokens.inc(tokens)
        for k, gauge in self.gauges.items():
            if k in metrics:
                gauge.set(float(metrics[k]))


def _write_policy(model: PolicyWithValue, tokenizer: Any, cfg: PPOConfig, history: list[dict], tmp: Path,
                  state: dict[str, torch.Tensor] | None = None) -> None:
    """The policy (LoRA merged; `state`: its weights gathered from FSDP shards), its metric history
    and its curves, into the output's temporary directory."""
    lm = model.lm.merge_and_unload() if cfg.lora_r else model.lm
    lm.save_pretrained(tmp, state_dict=state)
    tokenizer.save_pretrained(tmp)
    (tmp / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    plot_curves(history, tmp / PLOT_FILE, title=f"PPO ({cfg.mode}, {cfg.advantage}, prm={Path(cfg.prm).name})")


def plot_curves(history: Sequence[dict], path: str | Path, title: str = "PPO") -> None:
    """A PNG grid of the per-update curves: reward, KL, clip fraction, entropy, value loss,
    held-out accuracy (only the panels the history has)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [k for k in ("reward", "held_out_accuracy", "kl", "clip_frac", "entropy", "value_loss",
                          "rollout_accuracy", "tokens_per_s") if any(k in h for h in history)]
    cols = 3
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax, key in zip(axes.flat, panels):
        points = [(h["update"], h[key]) for h in history if key in h]
        ax.plot([u for u, _ in points], [v for _, v in points], marker="o" if len(points) < 30 else None, ms=3)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("update", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
