"""Requests, responses and the `Solver`: one question through a search strategy over awaitable
backends, with no HTTP and no Ray in it."""

import asyncio
import dataclasses
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from mathprm.data.problems import Problem
from mathprm.generation import Prefix
from mathprm.search import RUNNABLE, STRATEGIES, Chosen, SearchConfig, SearchResult, parse_strategy, run_search_async
from mathprm.serve.config import ServeConfig
from mathprm.steps import StepFormat, blank

# ----------------------------------------------------------------------------- requests and responses


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate)") from None
    return text


# A string that has a UTF-8 form (a tokenizer can read it). Pydantic's strict `str` refuses a
# lone surrogate in a field of its own but not inside a list or a union.
Text = Annotated[str, AfterValidator(_unicode)]


class SolveRequest(BaseModel):
    """One problem to solve. Only `question` is required; every other field defaults to the
    app's `args` and may not exceed its `limits` (see GET /healthz)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, description="the problem text")
    strategy: str | None = Field(None, description=f"one of {', '.join(RUNNABLE)}, optionally name@N")
    n: int | None = Field(None, ge=1, description="candidates per step or sampled solutions")
    beam_width: int | None = Field(None, ge=1, description="beam: partial solutions kept; dvts: width per subtree")
    max_steps: int | None = Field(None, ge=1, description="a solution unfinished after this many steps ends there")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0 is greedy")
    seed: int | None = Field(None, ge=0, lt=1 << 63, description="sampling seed: same request, same answer")


class StepOut(BaseModel):
    text: str
    score: float | None = Field(description="the PRM's score of the solution up to this step; null without a PRM")


class SolveResponse(BaseModel):
    answer: str | None = Field(description="the final answer read from the chosen solution; null if none")
    steps: list[StepOut]
    strategy: str
    finished: bool = Field(description="the policy ended the solution (false: max_steps or a token limit)")
    usage: dict[str, int] = Field(description="the question's prompt tokens; generated tokens, generator calls, "
                                              "samples, PRM calls, scored solutions and steps")
    latency_ms: float
    config: dict[str, Any] = Field(description="the settings the search ran with, defaults filled in")


class ScoreStepsRequest(BaseModel):
    """A solution to score step by step: `steps`, or `solution` cut at `separator`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    question: str = Field(min_length=1, description="the problem text")
    steps: list[Text] | None = Field(None, description="the solution's steps, in order (give this or solution)")
    solution: Text | None = Field(None, description="the solution's text, cut into steps at separator; blank parts "
                                                   "are dropped (give this or steps)")
    separator: Text | None = Field(None, min_length=1, max_length=16,
                                  description="where solution is cut into steps; default: the server's separator")


class ScoreStepsResponse(BaseModel):
    steps: list[str] = Field(description="the steps scored (solution's, after the cut)")
    scores: list[float] = Field(description="per step, the PRM's probability that the solution is still right")
    threshold: float = Field(description="the score under which the PRM calls a step wrong")
    first_below: int | None = Field(description="index of the first step scored under threshold; null if none")
    prm: str


class ErrorBody(BaseModel):
    error: str
    field: str | None = Field(description="the request field at fault; null when no one field is")
    request_id: str = Field(description="this request's id; the server log holds a failure's details under it")


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, the `field` at fault (or None), a message."""

    def __init__(self, field_name: str | None, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field_name, message, status


# ----------------------------------------------------------------------------- the solver (no HTTP, no Ray)


class Solver:
    """A `SolveRequest` in, a response dict out, over any async Generator and Scorer."""

    def __init__(self, cfg: ServeConfig, generator: Any, scorer: Any | None, metrics: dict[str, Any] | None = None) -> None:
        self.cfg, self.generator, self.scorer = cfg, generator, scorer
        self.step_format = StepFormat(cfg.separator)
        self.metrics = metrics  # mathprm_serve_requests / _latency_ms / _tokens (mathprm.metrics), or None

    def plan(self, req: SolveRequest) -> tuple[str, SearchConfig, Problem]:
        """(strategy, search config, problem) for `req`, defaults filled in; `RequestError`
        naming the field for anything the server will not run."""
        limits = self.cfg.limits
        if not req.question.strip():
            raise RequestError("question", "question: must not be blank")
        if len(req.question) > limits.question_chars:
            raise RequestError("question", f"question: {len(req.question)} characters is over this server's limit "
                                           f"of {limits.question_chars}")
        try:
            name, at_n = parse_strategy(req.strategy if req.strategy is not None else self.cfg.strategy_name)
        except ValueError as e:
            raise RequestError("strategy", str(e)) from None
        if STRATEGIES[name].needs_prm and self.scorer is None:
            raise RequestError("strategy", f"strategy: {name} needs a PRM and this server has none; "
                                           "use greedy or majority", status=400)
        if req.n is not None and at_n is not None and req.n != at_n:
            raise RequestError("n", f"n: {req.n} contradicts strategy {req.strategy!r}; give one of them")
        n = req.n if req.n is not None else at_n
        chosen = {"n": n, "beam_width": req.beam_width, "max_steps": req.max_steps}
        for key, value in chosen.items():
            if value is not None and value > getattr(limits, key):
                raise RequestError(key, f"{key}: {value} is over this server's limit of {getattr(limits, key)}")
        chosen |= {"temperature": req.temperature, "seed": req.seed}
        given = {k: v for k, v in chosen.items() if v is not None}
        search = with_settings(self.cfg.search, given)
        digest = hashlib.sha256(req.question.encode()).hexdigest()[:16]
        return name, search, Problem(f"q-{digest}", req.question, None, self.cfg.source)

    async def solve(self, req: SolveRequest,
                    on_step: Callable[[Chosen], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Plan and run `req`; a search past `limits.timeout_s` is cancelled (RequestError 504)."""
        return await self.run(*self.plan(req), on_step=on_step)

    async def check_room(self, problem: Problem, search: SearchConfig) -> int:
        """The tokens of the question's prompt. A question whose prompt leaves less than one
        step's tokens of the policy's context is refused (RequestError 422 naming the limit),
        not searched into a run of cut steps."""
        prefix = Prefix(problem.question)
        room, prompt_tokens = await asyncio.gather(self.generator.room(prefix), self.generator.prompt_tokens(prefix))
        if room < search.max_step_tokens:
            raise RequestError("question", f"question: its prompt leaves {max(room, 0)} tokens of the policy's "
                                           f"context, fewer than max_step_tokens ({search.max_step_tokens}); ask a "
                                           "shorter question or a smaller max_step_tokens")
        return prompt_tokens

    async def run(self, name: str, search: SearchConfig, problem: Problem,
                  on_step: Callable[[Chosen], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Run a planned request (`plan`); `on_step` gets each step as it is decided (`Chosen`)."""
        t0 = time.perf_counter()
        timeout = self.cfg.limits.timeout_s
        status, tokens = 500, 0
        try:
            prompt_tokens = await self.check_room(problem, search)
            result = await asyncio.wait_for(
                run_search_async(name, self.generator, self.scorer, problem, search, self.step_format, on_step),
                timeout)
            status, tokens = 200, result.usage.generated_tokens
        except RequestError as e:
            status = e.status
            raise
        except TimeoutError:
            status = 504
            raise RequestError(None, f"the search did not finish within {timeout:g} s (limits.timeout_s); "
                                     "ask for a smaller n or max_steps", status=504) from None
        finally:
            latency_ms = (time.perf_counter() - t0) * 1000
            if self.metrics is not None:
                self.metrics["mathprm_serve_requests"].inc(1, {"strategy": name, "status": str(status)})
                self.metrics["mathprm_serve_latency_ms"].observe(latency_ms, {"strategy": name})
                if tokens:
                    self.metrics["mathprm_serve_tokens"].inc(tokens, {"strategy": name})
        return response(result, name, search, latency_ms, prompt_tokens)


def with_settings(search: SearchConfig, changes: dict[str, Any]) -> SearchConfig:
    """`search` with a request's `changes`; SearchConfig's own checks (their ValueError names the
    field) as a 422 RequestError naming it."""
    try:
        return dataclasses.replace(search, **changes)
    except ValueError as e:
        raise RequestError(str(e).split(":", 1)[0], str(e)) from None


def response(result: SearchResult, name: str, search: SearchConfig, latency_ms: float,
             prompt_tokens: int) -> dict[str, Any]:
    return {"answer": result.answer, "steps": [{"text": s.text, "score": s.score} for s in result.steps],
            "strategy": name, "finished": result.finished,
            "usage": {"prompt_tokens": prompt_tokens} | dataclasses.asdict(result.usage),
            "latency_ms": round(latency_ms, 1), "config": settings(search)}


def settings(search: SearchConfig) -> dict[str, Any]:
    """The search settings a request may set or sees in its response."""
    return {k: getattr(search, k) for k in ("n", "beam_width", "max_steps", "temperature", "aggregation", "tie_break",
                                          "retry_below", "max_retries", "seed")}


def steps_to_score(req: ScoreStepsRequest, cfg: ServeConfig) -> list[str]:
    """The steps of `req` to score, checked against the limits and the server's step format;
    RequestError naming the field."""
    limits, fmt = cfg.limits, StepFormat(cfg.separator)
    if not req.question.strip():
        raise RequestError("question", "question: must not be blank")
    if len(req.question) > limits.question_chars:
        raise RequestError("question", f"question: {len(req.question)} characters is over this server's limit of "
                                       f"{limits.question_chars}")
    if (req.steps is None) == (req.solution is None):
        raise RequestError("steps", "steps: give the solution as steps (a list) or as solution (a text), one of them")
    if req.steps is not None and req.separator is not None:
        raise RequestError("separator", "separator: only cuts a solution text; steps come cut")
    if req.solution is not None:
        where = "solution"
        if len(req.solution) > limits.solution_chars:
            raise RequestError(where, f"solution: {len(req.solution)} characters is over this server's limit of "
                                      f"{limits.solution_chars}")
        steps = [s for s in StepFormat(req.separator or cfg.separator).split(req.solution) if not blank(s)]
        if not steps:
            raise RequestError(where, "solution: has no non-blank step")
    else:
        where, steps = "steps", req.steps
        if not steps:
            raise RequestError(where, "steps: give at least one step")
        total = sum(len(s) for s in steps)
        if total > limits.solution_chars:
            raise RequestError(where, f"steps: {total} characters in all is over this server's limit of "
                                      f"{limits.solution_chars}")
    if len(steps) > limits.steps:
        raise RequestError(where, f"{where}: {len(steps)} steps is over this server's limit of {limits.steps}")
    for i, step in enumerate(steps):
        name = f"steps.{i}" if where == "steps" else where
        if blank(step):
            raise RequestError(name, f"{name}: a step must not be blank")
        if len(step) > limits.step_chars:
            raise RequestError(name, f"{name}: step {i} has {len(step)} characters, over this server's limit of "
                                     f"{limits.step_chars}")
    bad = fmt.unreadable(steps)  # each step must read back from the text the PRM sees
    if bad is not None:
        name = f"steps.{bad[0]}" if where == "steps" else where
        raise RequestError(name, f"{name}: {bad[1]} (the server's step separator)")
    return steps
