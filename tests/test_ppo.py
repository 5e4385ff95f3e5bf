"""PPO / GRPO maths against numbers worked out by hand (each test's comment shows the sums)."""

import math

import pytest
import torch

from mathprm.train import ppo_loss as ppo


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


def test_gae_by_hand_skips_prompt_and_padding():
    # Tokens: prompt | a1 a2 a3 | pad. gamma 1, lam 0.5.
    # t3: delta = 1.0 + 0 - 0.6 = 0.4, A = 0.4
    # t2: delta = 0.5 + 0.6 - 0.4 = 0.7, A = 0.7 + 0.5 * 0.4 = 0.9
    # t1: delta = 0.0 + 0.4 - 0.2 = 0.2, A = 0.2 + 0.5 * 0.9 = 0.65
    rewards = torch.tensor([[0.0, 0.0, 0.5, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.2, 0.4, 0.6, 9.0]])  # 9s are off the mask: never read
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, ret = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    assert close(adv, [[0, 0.65, 0.9, 0.4, 0]])
    assert close(ret, [[0, 0.85, 1.3, 1.0, 0]])


def test_gae_carries_over_a_masked_gap_and_discounts():
    # mask 1 0 1: t0's next action token is t2. gamma 0.9, lam 1.
    # t2: delta = 1 - 0.5 = 0.5, A = 0.5;  t0: delta = 0 + 0.9 * 0.5 - 0.1 = 0.35, A = 0.35 + 0.9 * 0.5 = 0.8
    adv, _ = ppo.gae(torch.tensor([[0.0, 7.0, 1.0]]), torch.tensor([[0.1, 3.0, 0.5]]),
                     torch.tensor([[1, 0, 1]]), gamma=0.9, lam=1.0)
    assert close(adv, [[0.8, 0.0, 0.5]])


def test_ppo_clip_loss_by_hand():
    # ratios 1.5, 0.5, 0.5, 1.1 with advantages 1, 1, -1, 2:
    # min(1.5, 1.2) = 1.2 (clipped); min(0.5, 0.8) = 0.5; min(-0.5, -0.8) = -0.8 (clipped); 2.2
    # loss = -(1.2 + 0.5 - 0.8 + 2.2) / 4 = -0.775; clip fraction 2/4
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.1, 3.0]])
    old = torch.zeros_like(ratio)
    adv = torch.tensor([[1.0, 1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, clip_frac, approx_kl = ppo.ppo_clip_loss(ratio.log(), old, adv, mask, clip=0.2)
    assert close(loss, -0.775)
    assert close(clip_frac, 0.5)
    logr = ratio.log()[0, :4]
    assert close(approx_kl, float((0.5 * logr**2).mean()))


def test_ppo_clip_loss_gradient_vanishes_where_clipped():
    logp = torch.log(torch.tensor([[1.5, 1.0]])).requires_grad_()
    loss, _, _ = ppo.ppo_clip_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), clip=0.2)
    loss.backward()
    # token 0 is clipped (ratio 1.5 > 1.2 with A > 0): no gradient; token 1: d(-rho A / 2)/dlogp = -0.5
    assert close(logp.grad, [[0.0, -0.5]])


def test_value_loss_by_hand():
    # V 0.5, old 0.2 -> clipped 0.4; (0.5 - 1)^2 = 0.25, (0.4 - 1)^2 = 0.36; 0.5 * max = 0.18
    loss = ppo.value_loss(torch.tensor([[0.5]]), torch.tensor([[0.2]]), torch.tensor([[1.0]]),
                          torch.ones(1, 1), clip=0.2)
    assert close(loss, 0.18)


def test_group_advantages_outcome_and_process():
    # One step per sample, group of 2, rewards 1 and 0: mean 0.5, std 0.5 -> +1 and -1 on every token.
    sr = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    sm = torch.tensor([[0, 1], [0, 1]])
    mask = torch.tensor([[1, 1], [1, 1]])
    assert close(ppo.group_advantages(sr, sm, mask, 2), [[1, 1], [-1, -1]], tol=1e-4)
    # Two samples with steps: row 0 rewards 0.5 (t1), 1.0 (t3); row 1: 0.0 (t1), 0.5 (t2).
    # Group mean 0.5, std sqrt(0.5 / 4) = 0.35355 -> row 0: 0, 1.41421; row 1: -1.41421, 0.
    # Rewards-to-go: row 0 t1..t3 = 1.41421; row 1 t1 = -1.41421, t2 = 0.
    sr = torch.tensor([[0.0, 0.5, 0.0, 1.0], [0.0, 0.0, 0.5, 0.0]])
    sm = torch.tensor([[0, 1, 0, 1], [0, 1, 1, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 1, 0]])
    s = math.sqrt(2)
    assert close(ppo.group_advantages(sr, sm, mask, 2), [[0, s, s, s], [0, -s, 0, 0]], tol=1e-4)


def test_group_advantages_equal_rewards_give_zero_and_bad_group_size_is_named():
    sr = torch.tensor([[0.7], [0.7]])
    assert close(ppo.group_advantages(sr, torch.ones(2, 1), torch.ones(2, 1), 2), [[0.0], [0.0]])
    with pytest.raises(ValueError, match="group_size"):
        ppo.group_advantages(torch.zeros(3, 1), torch.ones(3, 1), torch.ones(3, 1), 2)


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    assert close(ppo.kl_per_token(logp, ref, "k1"), [math.log(2)])
    assert close(ppo.kl_per_token(logp, ref, "k3"), [0.5 + math.log(2) - 1])  # exp(-k1) + k1 - 1
    with pytest.raises(ValueError, match="kl_estimator"):
        ppo.kl_per_token(logp, ref, "k2")


def test_token_rewards_subtract_kl_on_actions_only():
    r = ppo.token_rewards(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[5.0, 0.2, 0.4]]), 0.5,
                          torch.tensor([[0, 1, 1]]))
    assert close(r, [[0.0, -0.1, 0.8]])


def test_masked_whiten_and_mean():
    x, m = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert close(ppo.masked_mean(x, m), 2.0)
    z = math.sqrt(1.5)  # (x - 2) / sqrt(2/3)
    assert close(ppo.masked_whiten(x, m), [-z, 0, z, 0], tol=1e-4)
    assert close(ppo.masked_whiten(x, m, shift_mean=False), [-z + 2, 2, z + 2, 0], tol=1e-4)


def test_token_logprobs_and_entropy_are_shifted_by_one():
    # Logits at position t predict token t + 1; a uniform distribution over V gives -log V.
    V = 4
    logits = torch.zeros(1, 3, V)
    logits[0, 1, 2] = 100.0  # position 1 is sure of token 2
    ids = torch.tensor([[0, 1, 2]])
    lp = ppo.token_logprobs(logits, ids)
    assert lp.shape == (1, 2)
    assert close(lp[0, 0], -math.log(V)) and close(lp[0, 1], 0.0)
    ent = ppo.entropy(logits)
    assert close(ent[0, 0], math.log(V)) and close(ent[0, 1], 0.0)
    # temperature divides the logits: logit 2 among three 0s at T = 2 is log(e / (e + 3))
    logits[0, 1, 2] = 2.0
    assert close(ppo.token_logprobs(logits, ids, temperature=2.0)[0, 1], math.log(math.e / (math.e + 3)))


def test_adaptive_kl_by_hand():
    kl = ppo.AdaptiveKL(0.1, target=6.0, horizon=10000)
    assert close(kl.update(12.0, 100), 0.1 * (1 + 0.2 * 100 / 10000))  # error clipped to +0.2
    assert close(kl.update(6.0 * 0.95, 100), 0.1 * (1 + 0.2 * 0.01) * (1 - 0.05 * 0.01))
    fixed = ppo.AdaptiveKL(0.1)
    assert fixed.update(100.0, 100) == 0.1
