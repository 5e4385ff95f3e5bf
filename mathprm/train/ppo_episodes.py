"""PPO episodes: prompts picked per update, rollouts written and rewarded step by step, and
encoded for the learner (`make_batch`). Pure: a `Generator`, a `Scorer` and a tokenizer in,
no Ray. Episodes are `one_step` (a prefix, then the policy's next step) or `full_solution`
(`mathprm.train.ppo`'s docstring has the reward shaping).
"""

from __future__ import annotations

import dataclasses
import hashlib
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from mathprm.data.answers import judge_grader
from mathprm.data.problems import Problem, reference_steps
from mathprm.generation import Prefix, Sampling
from mathprm.prompts import Prompter
from mathprm.steps import StepFormat, content
from mathprm.train.ppo_loss import PPOBatch

if TYPE_CHECKING:
    from mathprm.train.ppo import PPOConfig


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
    # The action's token ids as sampled (separator and EOS tokens included): the learner trains on
    # exactly these (token-exact PPO); empty for an episode written as text (tests, scripted).
    action_ids: tuple[int, ...] = ()
    # The sampler's log-prob of each of `action_ids` (Sampling.logprobs): the PPO ratio's old
    # log-probs, the policy that actually drew them; empty: the learner computes them.
    action_logprobs: tuple[float, ...] = ()
    version: int | None = None  # the weight version the sampler held (rollout engines); None: the learner's own


def encode_episode(prompter: Prompter, ep: Episode, max_length: int) -> tuple[list[int], int, list[int]]:
    """(token ids, number of prompt tokens, the index of each step's last token); the
    action's sampling log-probs, when it has them, belong to ids[n_prompt:].

    The prompt is `prompter.ids(question, prefix)`, as the sampler saw it. The action is the
    sampled `action_ids` when the episode has them (token-exact: a BPE tokenizer may encode the
    sampled text into other ids), each step ending at the token that completes its separator
    (or at the last token); otherwise each written step followed by the separator, except the
    last one, which is followed by EOS when the policy finished and by nothing when it was cut,
    pieces tokenised one by one as the PRM encodes them. A sequence longer than `max_length` is
    cut and its cut steps' ends move to the last kept token (their rewards land there)."""
    tokenizer, fmt = prompter.tokenizer, prompter.step_format
    ids = prompter.ids(ep.question, ep.prefix)
    n_prompt = len(ids)
    ends = []
    exact = bool(ep.action_ids and ep.steps)  # an episode with no step has nothing to reward
    if exact:
        ends = [n_prompt + k for k in step_token_ends(tokenizer, ep.action_ids, ep.steps, fmt.separator)]
        ids += list(ep.action_ids)
    for i, step in enumerate(ep.steps if not exact else ()):
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


def step_token_ends(tokenizer: Any, action_ids: Sequence[int], steps: Sequence[str], separator: str) -> list[int]:
    """The index in `action_ids` of the token that ends each of `steps` (written joined by
    `separator`): the first token whose decoded prefix covers the step and its separator, found
    by bisection (a prefix decodes to more text the longer it is); the last step ends at the last
    token (its EOS, when it has one)."""
    ends, lo, covered, last = [], 0, 0, len(action_ids) - 1
    for step in steps[:-1]:
        covered += len(step) + len(separator)
        hi = last
        while lo < hi:  # the first k in [lo, last] whose prefix ids[:k + 1] decodes to >= covered characters
            mid = (lo + hi) // 2
            if len(tokenizer.decode(action_ids[: mid + 1], skip_special_tokens=True)) < covered:
                lo = mid + 1
            else:
                hi = mid
        ends.append(lo)
        lo = min(lo + 1, last)
    return ends + [last] if steps else []


def make_batch(prompter: Prompter, episodes: Sequence[Episode], max_length: int) -> PPOBatch:
    """The episodes encoded (`encode_episode`) and right-padded into one learner batch."""
    pad = prompter.tokenizer.pad_token_id if prompter.tokenizer.pad_token_id is not None else 0
    encoded = [encode_episode(prompter, ep, max_length) for ep in episodes]
    width = max(len(ids) for ids, _, _ in encoded)
    B = len(episodes)
    ids_t = torch.full((B, width), pad, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    rewards = torch.zeros((B, width - 1))
    step_mask = torch.zeros((B, width - 1))
    sample_logp = torch.zeros((B, width - 1))
    sampled = torch.zeros(B, dtype=torch.bool)
    for row, ((ids, n_prompt, ends), ep) in enumerate(zip(encoded, episodes)):
        ids_t[row, : len(ids)] = torch.tensor(ids)
        attn[row, : len(ids)] = 1
        mask[row, n_prompt - 1 : len(ids) - 1] = 1.0  # position t is about token t + 1
        for end, r in zip(ends, ep.rewards):
            rewards[row, end - 1] += r
            step_mask[row, end - 1] = 1.0
        if ep.action_logprobs and ep.action_ids and ep.steps:  # token-exact: the ids are the sampled ones
            if len(ep.action_logprobs) != len(ep.action_ids):
                raise ValueError(f"an episode has {len(ep.action_logprobs)} log-probs for {len(ep.action_ids)} tokens")
            kept = ep.action_logprobs[: len(ids) - n_prompt]
            sample_logp[row, n_prompt - 1 : n_prompt - 1 + len(kept)] = torch.tensor(kept)
            sampled[row] = True
    return PPOBatch(ids_t, attn, mask, rewards, step_mask, sample_logp, sampled)


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
                        max_solution_tokens=cfg.max_solution_tokens, seed=seed, logprobs=True)
    rng = random.Random(seed)
    G = cfg.group_size
    episodes: list[Episode] = []
    if cfg.mode == "full_solution":
        rollouts = generator.rollouts([Prefix(p.question) for p in problems], G, sampling)
        for g, (p, rolls) in enumerate(zip(problems, rollouts)):
            for r in rolls:
                ep = Episode(g, p.question, [], list(r.steps), r.finished, r.truncated, n_generated=r.n_tokens,
                             action_ids=r.token_ids, action_logprobs=r.logprobs)
                ep.correct = r.finished and judge_grader(p, r.text)
                episodes.append(ep)
    else:
        prefixes = _one_step_prefixes(generator, problems, cfg, fmt, sampling, rng)
        samples = generator.next_steps([Prefix(p.question, tuple(pre)) for p, pre in zip(problems, prefixes)], G,
                                       dataclasses.replace(sampling, seed=sampling.seed + 1))
        for g, (p, pre, group) in enumerate(zip(problems, prefixes, samples)):
            for s in group:
                episodes.append(Episode(g, p.question, list(pre), [s.text], s.finished, s.truncated,
                                        n_generated=s.n_tokens, action_ids=s.token_ids,
                                        action_logprobs=s.logprobs))
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
        # A reference is cut where its source puts steps, then the policy's way (GSM8K writes "\n").
        steps = (content([fmt.clean(x) for s in reference_steps(p) for x in fmt.split(s)]) if use_ref[i]
                 else steps_of[i])
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
