"""PPO and GRPO for step-level rewards, the learner's side: pure torch, no Ray, no vLLM.

Every tensor is token-aligned: position t of a (B, T) tensor is about token t+1 of the
sequence (the token the model picks after reading tokens 0..t), so `token_logprobs` of
logits (B, T+1, V) and ids (B, T+1) is (B, T). `mask` is 1 on action tokens (the policy's
own writing), 0 on the prompt and padding. A step reward sits on the last token of its step.

- `gae`: generalised advantage estimation (Schulman et al. 2016, eq. 16) over tokens, with
  the sparse step rewards of `token_rewards` (step score at each step end, minus the per-token
  KL penalty of Ziegler et al. 2019 / InstructGPT eq. 2).
- `ppo_clip_loss`: the clipped surrogate (Schulman et al. 2017, eq. 7), token-mean.
- `value_loss`: clipped value loss (the PPO2 baselines form).
- `group_advantages`: GRPO with process supervision (Shao et al. 2024, DeepSeekMath sec. 4.1.3):
  each step reward normalised by the mean and std of all step rewards of its prompt's group;
  a token's advantage is the sum of the normalised rewards of the steps that end at or after it.
  With one step per sample this is outcome GRPO.
- `kl_per_token`: k1 = log p - log p_ref (in the reward, for PPO) and k3 = exp(-k1) + k1 - 1
  (Schulman's unbiased, non-negative estimator; in the loss, for GRPO).
- `AdaptiveKL`: the adaptive KL coefficient of Ziegler et al. 2019, sec. 2.2.
- `PolicyWithValue` (the policy and its value head), `PPOBatch` (encoded episodes) and
  `ppo_update` (advantages, then `ppo_epochs` passes of clipped minibatch steps).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from mathprm.train.ppo import PPOConfig


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1 (0.0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions (biased std); with `shift_mean=False` the
    mean is added back, so only the scale changes (how reward whitening keeps the sign of a
    reward). Unmasked positions come back as 0."""
    mask = mask.to(x.dtype)
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) log-probability of ids[:, 1:] under logits[:, :-1] / temperature.

    logits: (B, T+1, V); ids: (B, T+1). Dividing by the sampling temperature makes these the
    probabilities the sampler actually drew from."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) entropy of each next-token distribution logits[:, :-1] / temperature."""
    logp = F.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_per_token(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs, (B, T).

    k1 = log pi - log pi_ref (unbiased, can be negative); k3 = r - 1 - log r with
    r = pi_ref / pi (unbiased and >= 0; Schulman 2020, "Approximating KL divergence")."""
    k1 = logp - ref_logp
    if estimator == "k1":
        return k1
    if estimator == "k3":
        return torch.exp(-k1) + k1 - 1.0
    raise ValueError(f"kl_estimator: unknown {estimator!r}; choose k1 or k3")


def token_rewards(step_rewards: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) per-token reward: the step rewards (non-zero only at step ends) minus
    `kl_coef` times the per-token KL on action tokens (InstructGPT eq. 2, applied per token)."""
    return (step_rewards - kl_coef * kl) * mask


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both (B, T) and 0 off the mask.

    delta_t = r_t + gamma V_{t+1} - V_t and A_t = delta_t + gamma lam A_{t+1} (Schulman et al.
    2016, eq. 16), where "t+1" is the next *action* token: masked positions are skipped, so
    an action run that ends (EOS or padding) bootstraps from 0. Returns = A + V, the value
    targets."""
    B, T = rewards.shape
    mask = mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    next_adv = torch.zeros_like(next_value)
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        advantages[:, t] = adv * m
        # Off the mask, carry the next action token's value and advantage through unchanged.
        next_value = torch.where(m > 0, values[:, t], next_value)
        next_adv = torch.where(m > 0, adv, next_adv)
    return advantages, (advantages + values) * mask


def group_advantages(
    step_rewards: torch.Tensor, step_mask: torch.Tensor, mask: torch.Tensor, group_size: int, eps: float = 1e-6
) -> torch.Tensor:
    """(B, T) GRPO advantages with process supervision (DeepSeekMath, sec. 4.1.3).

    Rows g*G .. g*G+G-1 are the G = `group_size` samples of one prompt. Each step reward
    (at the positions where `step_mask` is 1) becomes (r - mean) / (std + eps) over all step
    rewards of its group (population std); a token's advantage is the sum of the normalised
    rewards of its row's steps ending at or after it. A group whose rewards are all equal gets
    advantage 0 (it carries no preference)."""
    B, _ = step_rewards.shape
    if group_size < 1 or B % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the batch of {B} samples")
    normalised = torch.zeros_like(step_rewards)
    sm = step_mask.to(step_rewards.dtype)
    for g in range(0, B, group_size):
        r, m = step_rewards[g : g + group_size], sm[g : g + group_size]
        n = m.sum().clamp(min=1.0)
        mean = (r * m).sum() / n
        std = (((r - mean) ** 2 * m).sum() / n).sqrt()
        normalised[g : g + group_size] = (r - mean) / (std + eps) * m
    # Sum over steps ending at or after t: a reversed cumulative sum along T.
    to_go = normalised.flip(-1).cumsum(-1).flip(-1)
    return to_go * mask.to(step_rewards.dtype)


def ppo_clip_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, clip fraction, approx KL(old || new)), each a scalar.

    L = -mean_t min(rho_t A_t, clip(rho_t, 1 - eps, 1 + eps) A_t), rho = exp(logp - old_logp)
    (Schulman et al. 2017, eq. 7), averaged over action tokens. The clip fraction is the share
    of tokens where the clipped term was the smaller; approx KL is mean(0.5 (log rho)^2)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    loss = masked_mean(-torch.minimum(unclipped, clipped), mask)
    clip_frac = masked_mean((clipped < unclipped).float(), mask)
    approx_kl = masked_mean(0.5 * log_ratio**2, mask)
    return loss, clip_frac.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2
) -> torch.Tensor:
    """0.5 mean_t max((V - R)^2, (V_clipped - R)^2), V_clipped = old_V + clip(V - old_V, +-clip)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


class AdaptiveKL:
    """KL coefficient steered toward `target` (Ziegler et al. 2019, sec. 2.2):
    beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon) after a batch of n
    episodes. `target=None` keeps beta fixed."""

    def __init__(self, init: float, target: float | None = None, horizon: int = 10000) -> None:
        self.value, self.target, self.horizon = init, target, horizon

    def update(self, kl: float, n: int) -> float:
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n / self.horizon
        return self.value


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
    logp = token_logprobs(logits, batch.ids, temperature)
    ent = entropy(logits if entropy_grad else logits.detach(), temperature)
    return logp, ent, None if values is None else values[:, :-1].float()


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
        # The ratio's old policy is the one that drew the tokens: its log-probs when the sampler
        # gave them (a rollout engine may hold older weights than the learner: max_staleness).
        sampled_rows = batch.sampled[:, None] & (mask > 0)
        logp_gap = float((batch.sample_logp - old_logp).abs()[sampled_rows].max()) if sampled_rows.any() else 0.0
        old_logp = torch.where(batch.sampled[:, None], batch.sample_logp, old_logp)
        ref_logp = ref_logp_fn(batch)
        kl = kl_per_token(old_logp, ref_logp, "k1")
        step_rewards = batch.step_rewards
        if cfg.whiten_rewards:
            step_rewards = masked_whiten(step_rewards, batch.step_mask, shift_mean=False)
        if cfg.advantage == "gae":
            rewards = token_rewards(step_rewards, kl, kl_coef, mask)
            advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
            advantages = masked_whiten(advantages, mask)
        else:
            advantages = group_advantages(step_rewards, batch.step_mask, mask, cfg.group_size)
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
            pg, clip_frac, approx_kl = ppo_clip_loss(logp, old_logp[idx], advantages[idx], m, cfg.clip)
            loss = pg
            vl = torch.zeros(())
            if cfg.advantage == "gae":
                vl = value_loss(values, old_values[idx], returns[idx], m, cfg.value_clip)
                loss = loss + cfg.vf_coef * vl
            else:
                loss = loss + kl_coef * masked_mean(kl_per_token(logp, ref_logp[idx], "k3"), m)
            entropy = masked_mean(ent, m)
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
    # logp_gap: the largest |sampler - learner| log-prob of an action token before the update (0
    # when the learner sampled itself; weights out of sync or a stale engine show here).
    out.update({"kl": float(episode_kl.mean()), "optimizer_steps": n_steps, "logp_gap": logp_gap})
    return out


@dataclasses.dataclass
class PPOBatch:
    ids: torch.Tensor  # (B, T+1) prompt + action tokens, right-padded
    attention_mask: torch.Tensor  # (B, T+1) 1 on real tokens
    mask: torch.Tensor  # (B, T) float, 1 where ids[:, 1:] is an action token
    step_rewards: torch.Tensor  # (B, T) a step's reward at its last token, 0 elsewhere
    step_mask: torch.Tensor  # (B, T) float, 1 at each step's last token
    sample_logp: torch.Tensor  # (B, T) the sampler's log-prob of each action token (rows with `sampled`)
    sampled: torch.Tensor  # (B,) bool: the row's action came with its sampling log-probs

    def to(self, device: torch.device | str) -> PPOBatch:
        return PPOBatch(*(t.to(device) for t in dataclasses.astuple(self)))

    def rows(self, index: torch.Tensor) -> PPOBatch:
        return PPOBatch(*(t[index] for t in dataclasses.astuple(self)))
