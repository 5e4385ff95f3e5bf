"""PPO and GRPO maths for step-level rewards: small pure torch functions, no Ray, no vLLM.

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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
