"""The model deployments (the generator and the PRM, each batching calls with `@serve.batch`)
and the adapters that make their handles a Generator and a Scorer."""

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from mathprm.generation import Prefix, Rollout, Sampling, StepSample, load_generator
from mathprm.scorer import TooLongError, build_scorer, default_threshold, parse_prm
from mathprm.serve.config import Batching
from mathprm.steps import StepFormat

# ----------------------------------------------------------------------------- handle adapters


class _Tracking:
    """A handle adapter's `acquire` / `release` (a search's start and end): sent to its deployment
    when `keeps_prefixes` (its model keeps a prefix cache), otherwise no call."""

    handle: DeploymentHandle
    keeps_prefixes: bool

    async def acquire(self, questions: list[str]) -> None:
        if self.keeps_prefixes:
            await self.handle.acquire.remote(questions)

    async def release(self, questions: list[str]) -> None:
        if self.keeps_prefixes:
            await self.handle.release.remote(questions)


class HandleGenerator(_Tracking):
    """The `Generator` contract, async, over a `GeneratorDeployment` handle; `keeps_prefixes`:
    the backend keeps a prompt cache (`_Tracking`)."""

    def __init__(self, handle: DeploymentHandle, step_format: StepFormat, keeps_prefixes: bool = False) -> None:
        self.handle, self.step_format, self.keeps_prefixes = handle, step_format, keeps_prefixes

    async def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        return await self.handle.next_steps.remote(prefixes, n, sampling)

    async def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        return await self.handle.rollouts.remote(prefixes, n, sampling)

    async def room(self, prefix: Prefix) -> int:
        return await self.handle.room.remote(prefix)

    async def prompt_tokens(self, prefix: Prefix) -> int:
        return await self.handle.prompt_tokens.remote(prefix)


class HandleScorer(_Tracking):
    """The `Scorer` contract, async, over a `PRMDeployment` handle: a search round's solutions
    go in one call, and the deployment's `@serve.batch` merges the rounds of concurrent
    requests (and /v1/score/steps calls) into forward batches; `keeps_prefixes`: the PRM keeps
    a prefix cache (`_Tracking`)."""

    def __init__(self, handle: DeploymentHandle, keeps_prefixes: bool = False) -> None:
        self.handle, self.keeps_prefixes = handle, keeps_prefixes

    async def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        return await self.handle.score_solutions.remote(list(questions), [list(s) for s in steps_per_question])


# ----------------------------------------------------------------------------- model deployments


class _BatchLog:
    """Batch sizes a deployment ran, for `stats()` (the benchmark and the tests read it) and for
    the Ray histogram `metric` (a name in mathprm.metrics)."""

    def __init__(self, metric: str) -> None:
        from mathprm.metrics import create

        self.sizes: Counter[int] = Counter()
        self.histogram = create(metric)

    def add(self, size: int) -> None:
        self.sizes[size] += 1
        self.histogram.observe(size)

    def stats(self) -> dict[str, Any]:
        return {"batches": sum(self.sizes.values()), "items": sum(k * v for k, v in self.sizes.items()),
                "largest_batch": max(self.sizes, default=0), "batch_sizes": dict(sorted(self.sizes.items()))}


class _CacheGauges:
    """A model's prefix cache (`cache_stats()`) as Ray gauges tagged `model`: tokens and bytes
    held, and the share of tokens it spared the model. Nothing when the model keeps no cache."""

    def __init__(self, backend: Any, model: str) -> None:
        from mathprm.metrics import create

        stats = getattr(backend, "cache_stats", None)
        self.stats = stats if stats is not None and stats()["max_tokens"] else None
        self.tags = {"model": model}
        if self.stats is not None:
            self.gauges = {name: create(f"mathprm_serve_prefix_cache_{name}") for name in ("tokens", "bytes", "saved")}

    def update(self) -> None:
        if self.stats is None:
            return
        s = self.stats()
        self.gauges["tokens"].set(s["held_tokens"], tags=self.tags)
        self.gauges["bytes"].set(s["held_bytes"], tags=self.tags)
        if s["tokens_full"]:
            self.gauges["saved"].set(1 - s["tokens_computed"] / s["tokens_full"], tags=self.tags)


async def _tell(backend: Any, method: str, questions: list[str], gauges: _CacheGauges) -> None:
    """`backend.acquire` / `backend.release` (searches on `questions` start / end), if it has it."""
    call = getattr(backend, method, None)
    if call is not None:
        await asyncio.to_thread(call, questions)
        gauges.update()


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class GeneratorDeployment:
    def __init__(self, model_dir: str, backend: str, separator: str, options: dict[str, Any],
                 batching: Batching) -> None:
        self.generator = load_generator(backend, model_dir, StepFormat(separator), **options)
        self._call.set_max_batch_size(batching.max_batch_size)
        self._call.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.log = _BatchLog("mathprm_serve_generator_batch")
        self.gauges = _CacheGauges(self.generator, "policy")

    async def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        return await self._call("next_steps", prefixes, n, sampling)

    async def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        return await self._call("rollouts", prefixes, n, sampling)

    def room(self, prefix: Prefix) -> int:
        """Tokens the policy's context has left after `prefix`'s prompt (`Generator.room`)."""
        return self.generator.room(prefix)

    def prompt_tokens(self, prefix: Prefix) -> int:
        """Tokens of `prefix`'s prompt (the context's length less its `room`)."""
        return self.generator.context_length - self.generator.room(prefix)

    async def acquire(self, questions: list[str]) -> None:
        """Searches on `questions` start (`Generator.acquire`; a no-op for vLLM)."""
        await _tell(self.generator, "acquire", questions, self.gauges)

    async def release(self, questions: list[str]) -> None:
        """Searches on `questions` ended (`Generator.release`; a no-op for vLLM)."""
        await _tell(self.generator, "release", questions, self.gauges)

    @serve.batch
    async def _call(self, kinds: list[str], prefix_lists: list[list[Prefix]], ns: list[int],
                    samplings: list[Sampling]) -> list[list]:
        # Calls of one kind, n and sampling (seed aside) become one backend call. Each prefix
        # is pinned to the seed it had in its own call, so merging changes no sample.
        groups: dict[tuple, list[int]] = {}
        for i, (kind, n, s) in enumerate(zip(kinds, ns, samplings)):
            groups.setdefault((kind, n, dataclasses.replace(s, seed=0)), []).append(i)
        self.log.add(len(kinds))
        out: list[list] = [[] for _ in kinds]
        for (kind, n, _), members in groups.items():
            merged = [dataclasses.replace(p, seed=p.sample_seed(samplings[i], j))
                      for i in members for j, p in enumerate(prefix_lists[i])]
            got = await asyncio.to_thread(getattr(self.generator, kind), merged, n, samplings[members[0]])
            lo = 0
            for i in members:
                out[i] = got[lo: lo + len(prefix_lists[i])]
                lo += len(prefix_lists[i])
        self.gauges.update()
        return out

    def stats(self) -> dict[str, Any]:
        """Batch sizes in generator calls merged per backend batch, and the prompt cache's
        counters when the backend keeps one (`hf` with `prefix_cache_tokens`)."""
        cache = getattr(self.generator, "cache_stats", None)
        return self.log.stats() | ({"prefix_cache": cache()} if cache is not None else {})


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PRMDeployment:
    def __init__(self, prm: str, batching: Batching, device: str | None = None, prefix_cache_tokens: int = 0) -> None:
        ref = parse_prm(prm)
        # One Serve batch is one forward batch: the scorer's own batch is as large.
        self.scorer = build_scorer(ref, device=device, batch_size=batching.max_batch_size,
                                   prefix_cache_tokens=prefix_cache_tokens)
        self._threshold = default_threshold(ref)
        # A Serve batch holds up to max_batch_size calls (a search round, or one solution to
        # score); the scorer cuts their solutions into forward batches of max_batch_size.
        self._batched.set_max_batch_size(batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.log = _BatchLog("mathprm_serve_prm_batch")
        self.gauges = _CacheGauges(self.scorer, "prm")

    async def score_solutions(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        """One search round's solutions, `(questions, steps) -> per solution, one score per
        step`; TooLongError when one is longer than the PRM's context."""
        got = await self._batched(questions, steps)
        if isinstance(got, str):
            raise TooLongError(got, -1, 0, 0)
        return got

    async def score_steps(self, question: str, steps: list[str]) -> dict[str, Any]:
        """One solution's step scores, batched with the search traffic: `{"scores": [...]}`, or
        `{"too_long": message}` when it is longer than the PRM's context."""
        got = await self._batched([question], [steps])
        return {"too_long": got} if isinstance(got, str) else {"scores": got[0]}

    async def acquire(self, questions: list[str]) -> None:
        """Searches on `questions` start (`Scorer.acquire`)."""
        await _tell(self.scorer, "acquire", questions, self.gauges)

    async def release(self, questions: list[str]) -> None:
        """Searches on `questions` ended: free the prefixes no running search uses (`Scorer.release`)."""
        await _tell(self.scorer, "release", questions, self.gauges)

    def threshold(self) -> float:
        """The score under which the PRM calls a step wrong (`mathprm.scorer.default_threshold`)."""
        return self._threshold

    @serve.batch
    async def _batched(self, questions: list[list[str]], steps: list[list[list[str]]]) -> list[list[list[float]] | str]:
        """Serve hands this every waiting call's arguments as lists, scored here in one go. A
        call holding a solution longer than the PRM's context gets that error's message instead
        of scores; the other calls of the batch are scored as usual."""
        flat_q = [q for qs in questions for q in qs]
        flat_s = [s for ss in steps for s in ss]
        self.log.add(len(flat_q))
        try:
            scores = await asyncio.to_thread(self.scorer.score, flat_q, flat_s)
        except TooLongError:
            return [await self._alone(qs, ss) for qs, ss in zip(questions, steps)]
        finally:
            self.gauges.update()
        out, lo = [], 0
        for qs in questions:
            out.append(scores[lo: lo + len(qs)])
            lo += len(qs)
        return out

    async def _alone(self, questions: list[str], steps: list[list[str]]) -> list[list[float]] | str:
        try:
            return await asyncio.to_thread(self.scorer.score, questions, steps)
        except TooLongError as e:
            return str(e)

    def stats(self) -> dict[str, Any]:
        """Batch sizes in solutions per forward batch, and the prefix cache's counters."""
        return self.log.stats() | {"prefix_cache": self.scorer.cache_stats()}
