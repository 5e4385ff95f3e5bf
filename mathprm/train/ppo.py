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
`kl_target` makes the coefficient adaptive (Ziegler et al. 2019). The maths is in
`mathprm.train.ppo_loss`; this module collects episodes and runs the learner.

Distributed shape. A `TorchTrainer` with N workers (gloo on CPU, NCCL on GPU), DDP through
`prepare_model`. Each worker samples its own prompts (a pure function of seed, rank and
update, so a resumed run replays them), writes rollouts with the weights it is training
(`HFGenerator.from_model`: no weight copy, always on-policy) and scores them with its own
in-process Scorer (the PRM, or the arithmetic world's exact `oracle`); the rollouts stay in
memory. Departures: the learner's replicas also generate (no separate vLLM actors yet), and
log-probs are recomputed on the re-tokenised text of each step (identical for the
character-level arithmetic tokenizer; a BPE tokenizer may split a sampled step differently,
which makes the first PPO epoch slightly off-policy).

Every update prints a progress line and reports metrics (mean reward,
KL, clip fraction, entropy, value loss, tokens/s) through `ray.train.report`; every
`eval_every` updates the workers measure greedy accuracy on held-out problems together.
Checkpoints every `checkpoint_every` updates; a killed run resumes from the latest one. The
final policy is a plain HF directory (LoRA merged), with `ppo_summary.json`, the metric
history `ppo_metrics.jsonl` and the curves `ppo_curves.png`, written once, atomically.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from mathprm import atomic
from mathprm.config import ConfigError, to_dict
from mathprm.data.answers import judge_grader
from mathprm.data.problems import Problem
from mathprm.generation import MIN_TEMPERATURE, Prefix, Sampling
from mathprm.scorer import (
    ArithOracle,
    ZeroScorer,
    build_scorer,
    parse_prm,
    trained_separator,
)
from mathprm.steps import StepFormat, content, step_format_for
from mathprm.train import ppo_loss as ppo

SUMMARY_FILE = "ppo_summary.json"  # inside the output policy; its presence marks a finished run
METRICS_FILE = "ppo_metrics.jsonl"
PLOT_FILE = "ppo_curves.png"


@dataclasses.dataclass
class PPOConfig:
    policy: str = "runs/arith/policy"  # HF causal-LM directory: the initial policy and the frozen reference
    prm: str = "runs/arith/prm"  # DIR | KIND:DIR (mathprm.scorer.parse_prm); "oracle": the arithmetic world's
    # exact step checker; "none": no step reward, only outcome_reward (full_solution): the baseline a PRM must beat
    dataset: str = "arith:hard"  # training problems (train split for arith:*), a dataset name or a table path
    num_problems: int = 4000  # size of the training pool
    eval_dataset: str = "arith:hard"  # held-out problems (test split for arith:*)
    eval_problems: int = 100
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
    max_step_tokens: int = 64
    max_solution_tokens: int = 384
    separator: str | None = None  # step separator; None: the PRM's (prm_config.json), else the dataset's
    lora_r: int = 0  # > 0: LoRA adapters (PEFT); the reference is then the base with adapters off
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    eval_every: int = 10  # updates between held-out greedy evaluations (0: only at the start and end)
    checkpoint_every: int = 10  # updates between rank-0 checkpoints
    seed: int = 0
    eval_seed: int = 1
    num_workers: int = 1
    cpus_per_worker: int = 1  # Ray gives each worker this many CPUs (and torch as many threads)
    use_gpu: bool = False
    precision: Literal["fp32", "bf16"] = "fp32"
    out_dir: str = "runs/arith/policy-ppo"
    overwrite: bool = False
    ray_address: str | None = None
    num_cpus: int | None = None

    def __post_init__(self) -> None:
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
        if prm_kind == "oracle" and not self.dataset.startswith("arith:"):
            raise ValueError(f"prm: the oracle knows only the arithmetic world, not dataset {self.dataset!r}")
        if prm_kind == "none" and not (self.mode == "full_solution" and self.outcome_reward != 0):
            raise ValueError("prm: none leaves only the outcome reward, so it needs mode=full_solution and "
                             f"outcome_reward != 0, got mode={self.mode} outcome_reward={self.outcome_reward}")
        if self.separator is not None:
            StepFormat(self.separator)


# ----------------------------------------------------------------------------- episodes (pure)


@dataclasses.dataclass
class Episode:
    group: int  # index of its prompt in the update; the group_size samples of a prompt share it
    question: str
    prefix: list[str]  # the steps given in the prompt
    steps: list[str]  # the steps the policy wrote
    finished: bool  # the policy ended the solution (EOS) after the last step
    truncated: bool  # the last step hit its token limit
    rewards: list[float] = dataclasses.field(default_factory=list)  # one per step in `steps`
    correct: bool | None = None  # full_solution: is the final answer right
    n_generated: int = 0  # tokens the sampler produced


@dataclasses.dataclass
class PPOBatch:
    ids: torch.Tensor  # (B, T+1) prompt + action tokens, right-padded
    attention_mask: torch.Tensor  # (B, T+1) 1 on real tokens
    mask: torch.Tensor  # (B, T) float, 1 where ids[:, 1:] is an action token
    step_rewards: torch.Tensor  # (B, T) a step's reward at its last token, 0 elsewhere
    step_mask: torch.Tensor  # (B, T) float, 1 at each step's last token

    def to(self, device: torch.device | str) -> PPOBatch:
        return PPOBatch(*(t.to(device) for t in dataclasses.astuple(self)))

    def rows(self, index: torch.Tensor) -> PPOBatch:
        return PPOBatch(*(t[index] for t in dataclasses.astuple(self)))


def encode_episode(tokenizer: Any, fmt: StepFormat, ep: Episode, max_length: int) -> tuple[list[int], int, list[int]]:
    """(token ids, number of prompt tokens, the index of each step's last token).

    The action is each written step followed by the separator, except the last one, which is
    followed by EOS when the policy finished and by nothing when it was cut; pieces are
    tokenised one by one, as the PRM encodes them. A sequence longer than `max_length` is cut
    and its cut steps' ends move to the last kept token (their rewards land there)."""
    ids = list(tokenizer(fmt.prompt(ep.question, ep.prefix))["input_ids"])
    n_prompt = len(ids)
    ends = []
    for i, step in enumerate(ep.steps):
        last = i == len(ep.steps) - 1
        text = step if last and (ep.finished or ep.truncated) else step + fmt.separator
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        if last and ep.finished:
            piece = piece + [tokenizer.eos_token_id]
        if not piece:  # an empty cut step still needs a token to carry its reward
            piece = [tokenizer.eos_token_id]
        ids += piece
        ends.append(len(ids) - 1)
    if n_prompt >= max_length:
        raise ValueError(f"a prompt of {n_prompt} tokens leaves no room for an action within {max_length} tokens")
    if len(ids) > max_length:
        ids = ids[:max_length]
        ends = [min(e, max_length - 1) for e in ends]
    return ids, n_prompt, ends


def make_batch(tokenizer: Any, fmt: StepFormat, episodes: Sequence[Episode], max_length: int) -> PPOBatch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = [encode_episode(tokenizer, fmt, ep, max_length) for ep in episodes]
    width = max(len(ids) for ids, _, _ in encoded)
    B = len(episodes)
    ids_t = torch.full((B, width), pad, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    rewards = torch.zeros((B, width - 1))
    step_mask = torch.zeros((B, width - 1))
    for row, ((ids, n_prompt, ends), ep) in enumerate(zip(encoded, episodes)):
        ids_t[row, : len(ids)] = torch.tensor(ids)
        attn[row, : len(ids)] = 1
        mask[row, n_prompt - 1 : len(ids) - 1] = 1.0  # position t is about token t + 1
        for end, r in zip(ends, ep.rewards):
            rewards[row, end - 1] += r
            step_mask[row, end - 1] = 1.0
    return PPOBatch(ids_t, attn, mask, rewards, step_mask)


def pick_prompts(pool: Sequence[Problem], n: int, seed: int, rank: int, update: int) -> list[Problem]:
    """This worker's prompts for an update: a pure function of (seed, rank, update)."""
    rng = random.Random(f"ppo:{seed}:{rank}:{update}")
    return [pool[rng.randrange(len(pool))] for _ in range(n)]


def sampling_seed(seed: int, rank: int, update: int) -> int:
    return int.from_bytes(hashlib.sha256(f"ppo-sample:{seed}:{rank}:{update}".encode()).digest()[:7], "big")


def collect_episodes(generator: Any, scorer: Any, problems: Sequence[Problem], cfg: PPOConfig, fmt: StepFormat,
                     seed: int) -> list[Episode]:
    """`group_size` episodes per problem (grouped, in order), with their rewards."""
    sampling = Sampling(temperature=cfg.temperature, max_step_tokens=cfg.max_step_tokens,
                        max_solution_tokens=cfg.max_solution_tokens, seed=seed)
    rng = random.Random(seed)
    G = cfg.group_size
    episodes: list[Episode] = []
    if cfg.mode == "full_solution":
        rollouts = generator.rollouts([Prefix(p.question) for p in problems], G, sampling)
        for g, (p, rolls) in enumerate(zip(problems, rollouts)):
            for r in rolls:
                ep = Episode(g, p.question, [], list(r.steps), r.finished, r.truncated, n_generated=r.n_tokens)
                ep.correct = r.finished and judge_grader(p, r.text)
                episodes.append(ep)
    else:
        prefixes = _one_step_prefixes(generator, problems, cfg, fmt, sampling, rng)
        samples = generator.next_steps([Prefix(p.question, tuple(pre)) for p, pre in zip(problems, prefixes)], G,
                                       dataclasses.replace(sampling, seed=sampling.seed + 1))
        for g, (p, pre, group) in enumerate(zip(problems, prefixes, samples)):
            for s in group:
                episodes.append(Episode(g, p.question, list(pre), [s.text], s.finished, s.truncated,
                                        n_generated=s.n_tokens))
    _reward(scorer, episodes, cfg)
    return episodes


def _one_step_prefixes(generator, problems, cfg, fmt, sampling, rng) -> list[list[str]]:
    """A prefix per problem, cut at a uniform step boundary of the reference solution or of
    one of the policy's own rollouts (its complete steps only; the last step is never in it)."""
    use_ref = [p.solution is not None and rng.random() < cfg.reference_prefix_fraction for p in problems]
    own = [i for i, ref in enumerate(use_ref) if not ref]
    rolled = generator.rollouts([Prefix(problems[i].question) for i in own], 1, sampling) if own else []
    steps_of = {i: content(r[0].steps[: len(r[0].steps) - (0 if r[0].finished else 1)]) for i, r in zip(own, rolled)}
    out = []
    for i, p in enumerate(problems):
        steps = content(fmt.split(p.solution)) if use_ref[i] else steps_of[i]
        k = rng.randrange(len(steps)) if steps else 0  # keep at least one step to write
        out.append(list(steps[:k]))
    return out


def _reward(scorer: Any, episodes: list[Episode], cfg: PPOConfig) -> None:
    scored = [ep for ep in episodes if ep.steps]
    scores = scorer.score([ep.question for ep in scored], [ep.prefix + ep.steps for ep in scored]) if scored else []
    for ep, s in zip(scored, scores):
        ep.rewards = [float(x) for x in s[len(ep.prefix):]]
        if ep.truncated:
            ep.rewards[-1] = cfg.truncated_reward
        if cfg.mode == "full_solution" and ep.correct:
            ep.rewards[-1] += cfg.outcome_reward


# ----------------------------------------------------------------------------- the policy with a value head


class PolicyWithValue(torch.nn.Module):
    """The causal LM plus, for `gae`, a scalar value head (zero-initialised, so the first values
    are 0). DDP wraps this module: one backward updates policy and critic.

    `critic="shared"`: the head reads the policy's own last hidden state, so the value loss's
    gradient also moves the policy's weights (cheap; the usual small-scale PPO). `"separate"`:
    the head reads a trainable copy of the initial LM's decoder (no LM head; OpenRLHF /
    InstructGPT style), so value regression never changes what the policy writes, at the cost
    of a second model in the update."""

    def __init__(self, lm: torch.nn.Module, value_head: bool, critic: str = "shared") -> None:
        super().__init__()
        if critic not in ("shared", "separate"):
            raise ValueError(f"critic: must be shared or separate, got {critic!r}")
        self.lm = lm
        self.v_head = None
        self.critic_lm = None
        if value_head:
            self.v_head = torch.nn.Linear(lm.config.hidden_size, 1)
            torch.nn.init.zeros_(self.v_head.weight)
            torch.nn.init.zeros_(self.v_head.bias)
            if critic == "separate":
                self.critic_lm = copy.deepcopy(lm.get_decoder()).train().requires_grad_(True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        shared = self.v_head is not None and self.critic_lm is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=shared)
        if self.v_head is None:
            return out.logits, None
        hidden = (out.hidden_states[-1] if shared
                  else self.critic_lm(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        return out.logits, self.v_head(hidden.float()).squeeze(-1)  # (B, T+1, V), (B, T+1)


def param_groups(model: PolicyWithValue, lr: float, critic_lr: float | None) -> list[dict]:
    """AdamW parameter groups: the policy's trainable weights at `lr`, the value head and a
    separate critic at `critic_lr` (default `lr`). A group with no parameters is left out."""
    critic_ids = {id(p) for m in (model.v_head, model.critic_lm) if m is not None for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if id(p) not in critic_ids], "lr": lr},
              {"params": [p for p in trainable if id(p) in critic_ids], "lr": critic_lr or lr}]
    return [g for g in groups if g["params"]]


def _forward(model, batch: PPOBatch, temperature: float, bf16: bool, entropy_grad: bool = False):
    """(log-probs (B, T), entropies (B, T), values (B, T) or None) of `batch` under `model`.
    The entropies carry gradients only with `entropy_grad` (an entropy bonus in the loss);
    otherwise they are a metric and cost no backward memory over the vocabulary."""
    with torch.autocast(batch.ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits, values = model(batch.ids, batch.attention_mask)
    logp = ppo.token_logprobs(logits, batch.ids, temperature)
    ent = ppo.entropy(logits if entropy_grad else logits.detach(), temperature)
    return logp, ent, None if values is None else values[:, :-1].float()


# ----------------------------------------------------------------------------- one update (pure torch)


def ppo_update(model, ref_logp_fn, batch: PPOBatch, optimizer, cfg: PPOConfig, kl_coef: float, seed: int) -> dict:
    """Advantages for `batch`, then `ppo_epochs` passes of minibatch steps. Returns the
    update's metrics (means over action tokens or episodes). `ref_logp_fn(batch)` gives the
    frozen reference's log-probs (B, T)."""
    bf16 = cfg.precision == "bf16"
    mask = batch.mask
    unwrapped = model.module if hasattr(model, "module") else model
    with torch.no_grad():
        unwrapped.eval()
        old_logp, _, old_values = _forward(unwrapped, batch, cfg.temperature, bf16)
        ref_logp = ref_logp_fn(batch)
        kl = ppo.kl_per_token(old_logp, ref_logp, "k1")
        step_rewards = batch.step_rewards
        if cfg.whiten_rewards:
            step_rewards = ppo.masked_whiten(step_rewards, batch.step_mask, shift_mean=False)
        if cfg.advantage == "gae":
            rewards = ppo.token_rewards(step_rewards, kl, kl_coef, mask)
            advantages, returns = ppo.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = ppo.masked_whiten(advantages, mask)
        else:
            advantages = ppo.group_advantages(step_rewards, batch.step_mask, mask, cfg.group_size)
            returns = None
    B = batch.ids.shape[0]
    gen = torch.Generator().manual_seed(seed)
    sums: dict[str, float] = {"pg_loss": 0.0, "value_loss": 0.0, "clip_frac": 0.0, "approx_kl": 0.0, "entropy": 0.0}
    n_steps = 0
    model.train()
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for lo in range(0, B, cfg.minibatch_size):
            idx = order[lo : lo + cfg.minibatch_size]
            mb = batch.rows(idx)
            logp, ent, values = _forward(model, mb, cfg.temperature, bf16, entropy_grad=cfg.entropy_coef != 0)
            m = mb.mask
            pg, clip_frac, approx_kl = ppo.ppo_clip_loss(logp, old_logp[idx], advantages[idx], m, cfg.clip)
            loss = pg
            vl = torch.zeros(())
            if cfg.advantage == "gae":
                vl = ppo.value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                loss = loss + cfg.vf_coef * vl
            else:
                loss = loss + kl_coef * ppo.masked_mean(ppo.kl_per_token(logp, ref_logp[idx], "k3"), m)
            entropy = ppo.masked_mean(ent, m)
            loss = loss - cfg.entropy_coef * entropy
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            for k, v in (("pg_loss", pg), ("value_loss", vl), ("clip_frac", clip_frac), ("approx_kl", approx_kl),
                         ("entropy", entropy)):
                sums[k] += float(v.detach())
            n_steps += 1
    out = {k: v / n_steps for k, v in sums.items()}
    episode_kl = (kl * mask).sum(-1)  # (B,) sum of per-token k1 over each action
    out.update({"kl": float(episode_kl.mean()), "optimizer_steps": n_steps})
    return out


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


def is_finished(out_dir: str | Path) -> bool:
    return (Path(out_dir) / SUMMARY_FILE).is_file()


_MAY_CHANGE_ON_RESUME = ("updates", "time_budget_min", "eval_every", "checkpoint_every", "out_dir", "overwrite",
                         "ray_address", "num_cpus")


def train_ppo(cfg: PPOConfig) -> Path:
    """Train (or reuse, or resume) the PPO policy; returns its directory."""
    from mathprm.ray_utils import (
        check_job_paths,
        fit_torch_trainer,
        init_ray,
        reuse_finished,
    )

    check_job_paths(policy=cfg.policy, prm=parse_prm(cfg.prm).path, out_dir=cfg.out_dir)
    out = Path(cfg.out_dir).resolve()
    if reuse_finished(out, cfg.overwrite, is_finished(out), "ppo", "policy"):
        return out
    if not (Path(cfg.policy) / "config.json").is_file():
        raise ConfigError(f"policy: {cfg.policy} is not a Hugging Face model directory (no config.json)")
    try:
        fmt = ppo_step_format(cfg)
    except FileNotFoundError as e:
        raise ConfigError(f"prm: {e}") from None
    load_pools(cfg)  # fail here, not inside a worker, on a bad dataset name

    init_ray(cfg.ray_address, cfg.num_cpus)
    settings = {**to_dict(cfg), "policy": str(Path(cfg.policy).resolve()), "separator": fmt.separator,
                "prm": str(parse_prm(cfg.prm).resolved()), "out_dir": str(out)}
    fit_torch_trainer(_train_loop, settings, out, f"ppo-{out.name}", num_workers=cfg.num_workers,
                      use_gpu=cfg.use_gpu, overwrite=cfg.overwrite, may_change=_MAY_CHANGE_ON_RESUME,
                      resources_per_worker={"CPU": cfg.cpus_per_worker})
    if not is_finished(out):
        raise RuntimeError(f"PPO finished without writing a policy to {out}")
    return out


def _load_scorer(cfg: PPOConfig, pool: Sequence[Problem], device: torch.device):
    """The step reward's Scorer; `prm: none` scores every step 0 (only the outcome rewards)."""
    scorer = build_scorer(parse_prm(cfg.prm), lambda: ArithOracle(pool), device=str(device), batch_size=32)
    return scorer if scorer is not None else ZeroScorer()


def _held_out_accuracy(generator, problems: Sequence[Problem], rank: int, world: int, cfg: PPOConfig) -> float:
    """Greedy accuracy on the held-out problems, the same number on every rank."""
    from mathprm.ray_utils import greedy_accuracy

    return greedy_accuracy(generator, problems, rank, world, judge_grader, cfg.max_solution_tokens)


def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathprm.models.gen_hf import HFGenerator
    from mathprm.ray_utils import report_train_step, restore_train_state

    fmt = StepFormat(config["separator"])
    cfg = PPOConfig(**config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(cfg.cpus_per_worker)
    pool, held_out = load_pools(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.policy)
    lm = AutoModelForCausalLM.from_pretrained(cfg.policy, dtype=torch.float32)
    max_length = int(getattr(lm.config, "max_position_embeddings", 0) or 1 << 30)
    if cfg.lora_r:
        from peft import LoraConfig, TaskType, get_peft_model

        lm = get_peft_model(lm, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                           lora_dropout=cfg.lora_dropout, target_modules="all-linear"))
        reference = None  # the base with the adapters switched off
    else:
        reference = copy.deepcopy(lm).to(device).eval().requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model = PolicyWithValue(lm, value_head=cfg.advantage == "gae", critic=cfg.critic)
    # "step" counts updates (the key restore_train_state reads).
    state: dict[str, Any] = {"step": 0, "elapsed": 0.0, "kl_coef": cfg.kl_coef, "history": []}
    state = restore_train_state(model, state, "ppo", rank)
    model = ray.train.torch.prepare_model(model)
    unwrapped = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.AdamW(param_groups(unwrapped, cfg.lr, cfg.critic_lr))
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    generator = HFGenerator.from_model(unwrapped.lm, tokenizer, fmt)
    scorer = _load_scorer(cfg, pool, device)
    kl_ctl = ppo.AdaptiveKL(state["kl_coef"], cfg.kl_target, cfg.kl_horizon)

    @torch.no_grad()
    def ref_logp(batch: PPOBatch) -> torch.Tensor:
        if reference is not None:
            logits = reference(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        else:
            with unwrapped.lm.disable_adapter():
                logits = unwrapped.lm(input_ids=batch.ids, attention_mask=batch.attention_mask).logits
        return ppo.token_logprobs(logits, batch.ids, cfg.temperature)

    metrics_out = _RayMetrics() if rank == 0 else None
    update, history = state["step"], state["history"]
    started = time.monotonic() - state["elapsed"]
    budget_s = cfg.time_budget_min * 60 if cfg.time_budget_min else None
    if update == 0:
        acc = _held_out_accuracy(generator, held_out, rank, world, cfg)
        history.append({"update": 0, "held_out_accuracy": acc})
        if rank == 0:
            print(f"[ppo] update 0/{cfg.updates}: held-out greedy accuracy {acc:.3f} on {len(held_out)} problems",
                  flush=True)
    stopped_by = "updates"
    while update < cfg.updates:
        t0 = time.monotonic()
        problems = pick_prompts(pool, cfg.prompts_per_update, cfg.seed, rank, update)
        episodes = collect_episodes(generator, scorer, problems, cfg, fmt, sampling_seed(cfg.seed, rank, update))
        t_rollout = time.monotonic() - t0
        batch = make_batch(tokenizer, fmt, episodes, max_length).to(device)
        stats = ppo_update(model, ref_logp, batch, optimizer, cfg, kl_ctl.value, sampling_seed(cfg.seed, rank, -update))
        update += 1
        elapsed = time.monotonic() - started
        # Episode statistics, summed over workers: every rank then reports the same numbers.
        totals = torch.tensor([
            sum(sum(ep.rewards) for ep in episodes), sum(len(ep.rewards) for ep in episodes), len(episodes),
            sum(ep.n_generated for ep in episodes), sum(bool(ep.correct) for ep in episodes),
            sum(ep.truncated for ep in episodes), stats["kl"] * len(episodes), time.monotonic() - t0,
            elapsed / budget_s if budget_s else 0.0,
        ], dtype=torch.float64)
        local = {k: torch.tensor(stats[k], dtype=torch.float64) for k in ("pg_loss", "value_loss", "clip_frac",
                                                                           "approx_kl", "entropy")}
        if dist.is_initialized():
            dist.all_reduce(totals)
            for v in local.values():
                dist.all_reduce(v)
                v /= world
        n_eps = float(totals[2])
        kl_mean = float(totals[6]) / n_eps
        metrics = {
            "update": update, "reward": float(totals[0]) / n_eps, "step_reward": float(totals[0]) / max(float(totals[1]), 1),
            "kl": kl_mean, "kl_coef": kl_ctl.value, **{k: float(v) for k, v in local.items()},
            "tokens_per_s": float(totals[3]) / max(float(totals[7]) / world, 1e-9),
            "rollout_s": t_rollout, "truncated": float(totals[5]) / n_eps, "elapsed_s": elapsed,
        }
        if cfg.mode == "full_solution":
            metrics["rollout_accuracy"] = float(totals[4]) / n_eps
        kl_ctl.update(kl_mean, int(n_eps))
        stop = budget_s is not None and float(totals[8]) / world >= 1.0
        if (cfg.eval_every and update % cfg.eval_every == 0) or update == cfg.updates or stop:
            metrics["held_out_accuracy"] = _held_out_accuracy(generator, held_out, rank, world, cfg)
        history.append(metrics)
        if metrics_out is not None:
            metrics_out.record(metrics, tokens=int(totals[3]))
        if rank == 0:
            shown = " ".join(f"{k} {metrics[k]:.4g}" for k in ("reward", "kl", "clip_frac", "entropy", "value_loss",
                                                                "tokens_per_s", "held_out_accuracy") if k in metrics)
            print(f"[ppo] update {update}/{cfg.updates} {shown} elapsed {elapsed:.0f}s", flush=True)
        state = {"step": update, "elapsed": elapsed, "kl_coef": kl_ctl.value, "history": history,
                 "resumed_from": state.get("resumed_from", 0)}
        report_train_step(unwrapped, optimizer, state, metrics, rank,
                          with_checkpoint=stop or update == cfg.updates or update % cfg.checkpoint_every == 0)
        if stop:
            stopped_by = "time_budget"
            break

    if rank == 0:
        _save(unwrapped, tokenizer, cfg, history, {
            "updates": update, "stopped_by": stopped_by, "elapsed_s": time.monotonic() - started,
            "resumed_from_update": state.get("resumed_from", 0), "config": {**config},
            "held_out_accuracy_start": history[0]["held_out_accuracy"],
            "held_out_accuracy_end": next((h["held_out_accuracy"] for h in reversed(history)
                                           if "held_out_accuracy" in h), None),
        })


class _RayMetrics:
    """The run's curves as Ray metrics (`mathprm.metrics`: mathprm_ppo_*), set by rank 0."""

    GAUGES = ("reward", "kl", "kl_coef", "clip_frac", "entropy", "value_loss", "tokens_per_s", "held_out_accuracy")

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


def _save(model: PolicyWithValue, tokenizer: Any, cfg: PPOConfig, history: list[dict], summary: dict) -> None:
    lm = model.lm.merge_and_unload() if cfg.lora_r else model.lm
    with atomic.directory(cfg.out_dir, overwrite=cfg.overwrite) as tmp:
        lm.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / METRICS_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
        plot_curves(history, tmp / PLOT_FILE, title=f"PPO ({cfg.mode}, {cfg.advantage}, prm={Path(cfg.prm).name})")
        atomic.write_json(tmp / SUMMARY_FILE, summary)
    print(f"[ppo] saved the policy to {cfg.out_dir} after {summary['updates']} updates ({summary['stopped_by']}); "
          f"held-out accuracy {summary['held_out_accuracy_start']:.3f} -> {summary['held_out_accuracy_end']:.3f}",
          flush=True)


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
