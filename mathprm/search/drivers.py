"""Drivers: they execute the requests a strategy yields against a Generator and a Scorer, for
one problem (`run_search`), many in lockstep (`run_searches`) or with awaitable backends
(`run_search_async`, the Serve app). The generator and the scorer that keep per-search state
(their prefix caches) hear `acquire([question])` when a search starts and `release([question])`
when it ends (answered or failed), so that state is freed then rather than when the cache's bound
pushes it out, and not while another search on the same question still runs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from mathprm.data.problems import Problem
from mathprm.search.core import (
    Chosen,
    Context,
    NextSteps,
    Request,
    Rollouts,
    Score,
    Search,
    SearchConfig,
    SearchResult,
    Usage,
)
from mathprm.search.strategies import RUNNABLE, STRATEGIES
from mathprm.steps import StepFormat

# ----------------------------------------------------------------------------- drivers


def _start(strategy: str, problem: Problem, cfg: SearchConfig, fmt: StepFormat, has_scorer: bool) -> Search:
    if strategy not in RUNNABLE:
        raise ValueError(f"strategy: unknown {strategy!r}; strategies: {', '.join(RUNNABLE)}")
    if STRATEGIES[strategy].needs_prm and not has_scorer:
        raise ValueError(f"strategy: {strategy} needs a PRM (a Scorer); give one, e.g. --prm runs/arith/prm")
    return STRATEGIES[strategy].run(Context(problem, cfg, fmt))


def _account(usage: Usage, request: Request, result: Any) -> None:
    if isinstance(request, (NextSteps, Rollouts)):
        usage.generator_calls += 1
        for per_prefix in result:
            usage.samples += len(per_prefix)
            usage.generated_tokens += sum(s.n_tokens for s in per_prefix)
    elif isinstance(request, Score):
        usage.prm_calls += 1
        usage.scored_solutions += len(request.steps)
        usage.scored_steps += sum(map(len, request.steps))


def _check_answer(request: Request, result: Any) -> None:
    """A backend that answers with the wrong number of items would silently misalign scores."""
    expected = len(request.prefixes) if isinstance(request, (NextSteps, Rollouts)) else len(request.steps)
    if len(result) != expected:
        raise RuntimeError(f"{type(request).__name__}: asked for {expected} items, the backend returned {len(result)}")
    if isinstance(request, Score):
        for steps, scores in zip(request.steps, result):
            if len(scores) != len(steps):
                raise RuntimeError(f"Score: a solution of {len(steps)} steps got {len(scores)} scores")


def _execute(request: Request, generator: Any, scorer: Any) -> Any:
    if isinstance(request, NextSteps):
        result = generator.next_steps(list(request.prefixes), request.n, request.sampling)
    elif isinstance(request, Rollouts):
        result = generator.rollouts(list(request.prefixes), request.n, request.sampling)
    else:
        result = scorer.score(list(request.questions), [list(s) for s in request.steps])
    _check_answer(request, result)
    return result


def _tell(method: str, generator: Any, scorer: Any, questions: Sequence[str]) -> list[Any]:
    outs = []
    for backend in (generator, scorer):
        call = getattr(backend, method, None)
        if call is not None and questions:
            outs.append(call(list(questions)))
    return outs


def acquire(generator: Any, scorer: Any, questions: Sequence[str]) -> list[Any]:
    """Tell the generator and the scorer that have `acquire` that searches on `questions` (one
    per item) start. Returns what those calls returned: awaitables for asynchronous backends,
    which the caller awaits."""
    return _tell("acquire", generator, scorer, questions)


def release(generator: Any, scorer: Any, questions: Sequence[str]) -> list[Any]:
    """Tell the generator and the scorer that have `release` that searches on `questions` (one
    per item) ended; returns as `acquire` does."""
    return _tell("release", generator, scorer, questions)


def _finish(result: SearchResult, usage: Usage, emitted: int, on_step: Callable[[Chosen], None] | None):
    usage.blank_steps = result.usage.blank_steps  # counted by the strategy, the rest by the driver
    result.usage = usage
    if on_step is not None:  # steps a strategy decides only at its end are sent now
        for step in result.steps[emitted:]:
            on_step(Chosen(step))
    return result


def run_search(strategy: str, generator: Any, scorer: Any, problem: Problem, cfg: SearchConfig,
               on_step: Callable[[Chosen], None] | None = None) -> SearchResult:
    """Run one strategy on one problem with a synchronous Generator and Scorer (the scorer may
    be None for greedy and majority). `on_step` gets each chosen step (`Chosen`: the step and
    the candidates it was chosen from) as soon as it is decided."""
    search = _start(strategy, problem, cfg, generator.step_format, scorer is not None)
    usage, emitted, reply = Usage(), 0, None
    acquire(generator, scorer, [problem.question])
    try:
        while True:
            try:
                request = search.send(reply)
            except StopIteration as stop:
                return _finish(stop.value, usage, emitted, on_step)
            if isinstance(request, Chosen):
                emitted += 1
                if on_step is not None:
                    on_step(request)
                reply = None
                continue
            reply = _execute(request, generator, scorer)
            _account(usage, request, reply)
    finally:
        release(generator, scorer, [problem.question])


def _merge_key(request: Request) -> tuple:
    if isinstance(request, Score):
        return ("score",)
    s = request.sampling
    return (type(request).__name__, request.n, s.temperature, s.top_p, s.max_step_tokens, s.max_solution_tokens)


def run_searches(strategy: str, generator: Any, scorer: Any, problems: Sequence[Problem],
                 cfg: SearchConfig) -> list[SearchResult]:
    """Run one strategy on many problems in lockstep: each round, the searches' requests that
    can share a call (same kind, n and sampling; every prefix carries its own seed) go to the
    generator or scorer as one batch. Results equal `run_search` on each problem alone."""
    searches = [_start(strategy, p, cfg, generator.step_format, scorer is not None) for p in problems]
    usages = [Usage() for _ in problems]
    results: list[SearchResult | None] = [None] * len(problems)
    replies: dict[int, Any] = {i: None for i in range(len(problems))}
    acquire(generator, scorer, [p.question for p in problems])
    try:
        _lockstep(searches, usages, results, replies, generator, scorer, problems)
    finally:  # the searches still running when one failed
        release(generator, scorer, [p.question for p, r in zip(problems, results) if r is None])
    return results  # type: ignore[return-value]


def _lockstep(searches: list[Search], usages: list[Usage], results: list[SearchResult | None],
              replies: dict[int, Any], generator: Any, scorer: Any, problems: Sequence[Problem]) -> None:
    while replies:
        pending: dict[int, Request] = {}
        ended = []
        for i, reply in replies.items():
            try:
                request = searches[i].send(reply)
                while isinstance(request, Chosen):
                    request = searches[i].send(None)
            except StopIteration as stop:
                results[i] = _finish(stop.value, usages[i], 0, None)
                ended.append(problems[i].question)
                continue
            pending[i] = request
        release(generator, scorer, ended)
        replies = {}
        groups: dict[tuple, list[int]] = {}
        for i, request in pending.items():
            groups.setdefault(_merge_key(request), []).append(i)
        for members in groups.values():
            first = pending[members[0]]
            if isinstance(first, Score):
                merged: Request = Score(tuple(q for i in members for q in pending[i].questions),
                                        tuple(s for i in members for s in pending[i].steps))
            else:
                merged = type(first)(tuple(p for i in members for p in pending[i].prefixes), first.n, first.sampling)
            answer = _execute(merged, generator, scorer)
            lo = 0
            for i in members:
                r = pending[i]
                size = len(r.steps) if isinstance(r, Score) else len(r.prefixes)
                replies[i] = answer[lo: lo + size]
                lo += size
                _account(usages[i], r, replies[i])


async def run_search_async(strategy: str, generator: Any, scorer: Any, problem: Problem, cfg: SearchConfig,
                           step_format: StepFormat, on_step: Callable[[Chosen], Any] | None = None) -> SearchResult:
    """`run_search` for asynchronous backends (`await generator.next_steps(...)`, `await
    scorer.score(...)`, e.g. Serve deployment handles). `on_step` may be a coroutine function."""
    import inspect

    search = _start(strategy, problem, cfg, step_format, scorer is not None)
    usage, emitted, reply = Usage(), 0, None

    async def emit(chosen: Chosen) -> None:
        if on_step is not None:
            out = on_step(chosen)
            if inspect.isawaitable(out):
                await out

    for out in acquire(generator, scorer, [problem.question]):
        if inspect.isawaitable(out):
            await out
    try:
        while True:
            try:
                request = search.send(reply)
            except StopIteration as stop:
                result: SearchResult = _finish(stop.value, usage, emitted, None)
                break
            if isinstance(request, Chosen):
                emitted += 1
                await emit(request)
                reply = None
                continue
            if isinstance(request, NextSteps):
                reply = await generator.next_steps(list(request.prefixes), request.n, request.sampling)
            elif isinstance(request, Rollouts):
                reply = await generator.rollouts(list(request.prefixes), request.n, request.sampling)
            else:
                reply = await scorer.score(list(request.questions), [list(s) for s in request.steps])
            _check_answer(request, reply)
            _account(usage, request, reply)
    finally:
        for out in release(generator, scorer, [problem.question]):
            try:
                if inspect.isawaitable(out):
                    await out
            except Exception:  # noqa: BLE001 - a replica gone: its cache went with it, the bound frees the rest
                pass
    for step in result.steps[emitted:]:
        await emit(Chosen(step))
    return result
