"""The Ray Serve app for PRM-guided search: a policy, a PRM and an HTTP front composed by handles.

    serve run serve_configs/guided.yaml        # the app builder `build_app` reads its `args`
    curl -s localhost:8000/v1/solve -H 'content-type: application/json' -d '{"question":
        "Start with 6. Add 3, then multiply by 3. What is the result?", "strategy": "guided", "n": 8}'

Three deployments, each scaled and placed on its own (`serve_configs/guided.yaml`):

- `GeneratorDeployment` holds one `Generator` (`hf` here, `vllm` on a GPU). Concurrent
  `next_steps` / `rollouts` calls are merged by `@serve.batch` into one backend call per kind
  and sampling setting, the way `search.run_searches` merges searches in lockstep (every
  prefix keeps its own seed, so a search samples the same alone or merged, up to the float
  rounding that padding brings on `hf`). One backend call
  runs at a time, which a vLLM `LLM` object needs.
- `PRMDeployment` holds the Scorer that `prm` names (`mathprm.scorer.build_scorer`); its `score_solutions(questions, steps)` scores one
  search round's solutions and is `@serve.batch`ed, so the rounds of every concurrent request
  go through one forward pass in batches of `max_batch_size` solutions (`max_batch_size: 1` is
  the unbatched baseline: one call and one forward pass per solution). `stats()` reports the
  solutions per Serve batch.
- `SolveAPI`, the FastAPI ingress: `POST /v1/solve`, `POST /v1/solve/stream` (server-sent
  events: one `step` event per decided step, then `done`), `GET /healthz`, OpenAPI at `/docs`.

The search itself is `search.run_search_async` over two handle adapters (`HandleGenerator`,
`HandleScorer`, which sends a `Score` request as one `score_solutions` call);
this module only turns HTTP into a `Problem` and a `SearchConfig` (`Solver`, which knows
nothing of HTTP or Ray) and results back into JSON. Bad input is a 4xx `{"error", "field"}`
naming the field, never a 5xx; a search still running after `limits.timeout_s` is cancelled
and answered 504, never left hanging.

An API key guards the app when the environment variable named by `api_key_env` (default
MATHPRM_API_KEY) is set where the app is built: every request but GET /healthz and the docs
must then carry `Authorization: Bearer <key>` or `X-API-Key: <key>`, else it gets a 401
before its body is read. The key itself stays in that process; the ingress holds only its SHA-256.
"""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray.serve.handle import DeploymentHandle

from mathprm.config import from_dict
from mathprm.generation import GENERATORS, Prefix, Rollout, Sampling, StepSample, load_generator
from mathprm.problems import Problem
from mathprm.scorer import PRMRef, build_scorer, parse_prm, trained_separator
from mathprm.search import (RUNNABLE, STRATEGIES, ScoredStep, SearchConfig, SearchResult, parse_strategy,
                            run_search_async)
from mathprm.steps import StepFormat, step_format_for

logger = logging.getLogger("ray.serve")

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; a request over a limit is a 422 naming the field."""

    n: int = 32  # candidates per step / sampled solutions
    beam_width: int = 8
    max_steps: int = 48
    question_chars: int = 4000
    timeout_s: float = 60.0  # a search still running after this is cancelled: 504

    def __post_init__(self) -> None:
        for name in ("n", "beam_width", "max_steps", "question_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s: must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class Batching:
    """`@serve.batch` settings of a deployment: the largest batch, and how long the first
    request of a batch waits for others."""

    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.01

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size: must be >= 1, got {self.max_batch_size}")
        if self.batch_wait_timeout_s < 0:
            raise ValueError(f"batch_wait_timeout_s: must be >= 0, got {self.batch_wait_timeout_s}")


@dataclass
class ServeConfig:
    """The app builder's `args` (the `args:` of serve_configs/guided.yaml)."""

    policy: str = "runs/arith/policy"  # HF causal-LM directory
    prm: str | None = "runs/arith/prm"  # DIR | KIND:DIR (mathprm.scorer.parse_prm); null / none: greedy and majority only
    backend: str = "hf"  # generator backend: hf | vllm
    dataset: str = "arith:hard"  # how answers are read: arith / arith:* (integers), else the real-math grader
    separator: str | None = None  # step separator; null: the PRM's own, else the dataset's
    device: str | None = None  # hf generator and PRM: cpu | cuda; null: cuda if available
    generator_options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the backend
    strategy: str = "guided"  # a request's default strategy (name or name@N)
    search: SearchConfig = field(default_factory=SearchConfig)  # a request's defaults (n, temperature, ...)
    limits: Limits = field(default_factory=Limits)
    prm_batch: Batching = field(default_factory=Batching)  # solutions per PRM forward batch
    generator_batch: Batching = field(default_factory=lambda: Batching(16, 0.005))  # generator calls merged
    # The environment variable holding the API key; when it is set (non-empty) where the app is
    # built, requests need the key. The key itself never goes in a config file. null: no key.
    api_key_env: str | None = "MATHPRM_API_KEY"

    def __post_init__(self) -> None:
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env: {self.api_key_env!r} is not an environment variable name")
        # Replicas start in other processes and directories: paths must be absolute here.
        self.policy = _model_dir("policy", self.policy, "config.json")
        ref = parse_prm(self.prm)
        if ref.kind == "oracle":
            raise ValueError("prm: the oracle needs each problem's exact step truth, which a server's questions do not "
                             "carry; give a PRM directory, KIND:DIR or null")
        if ref.path is not None:
            ref = PRMRef(ref.kind, _model_dir("prm", ref.path, "prm_config.json" if ref.kind == "prm" else "config.json"))
        self.prm = None if ref.kind == "none" else str(ref)
        if self.backend not in GENERATORS:
            raise ValueError(f"backend: unknown {self.backend!r}; backends: {', '.join(GENERATORS)}")
        if not self.dataset:
            raise ValueError("dataset: give a name, e.g. arith:hard or math500")
        self.separator = step_format_for(self.source, self.separator, trained_separator(ref)).separator
        name, at_n = parse_strategy(self.strategy)  # its ValueError names the field
        if STRATEGIES[name].needs_prm and self.prm is None:
            raise ValueError(f"strategy: {name} needs a PRM; set prm, or make the default greedy or majority")
        if at_n is not None:
            self.search = dataclasses.replace(self.search, n=at_n)
        for name in ("n", "beam_width", "max_steps"):
            if getattr(self.search, name) > getattr(self.limits, name):
                raise ValueError(f"search.{name}: the default {getattr(self.search, name)} is over "
                                 f"limits.{name} = {getattr(self.limits, name)}")

    @property
    def source(self) -> str:
        """The `Problem.source` of a question: `Judge` reads integers for `arith:*` sources."""
        return "arith:any" if self.dataset == "arith" else self.dataset

    @property
    def strategy_name(self) -> str:
        return self.strategy.partition("@")[0]


def _model_dir(name: str, path: str, marker: str) -> str:
    """`path` made absolute; ValueError naming `name` when it holds no `marker` file."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{name}: give a model directory, got {path!r}")
    resolved = Path(path).expanduser().resolve()
    if not (resolved / marker).is_file():
        where = "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
        raise ValueError(f"{name}: {path!r}{where} is not a model directory (no {marker}); "
                         "run `make demo` or give an absolute path")
    return str(resolved)


def load_serve_config(args: dict[str, Any]) -> ServeConfig:
    """`args` checked field by field: a `ConfigError` (a ValueError) naming the bad one."""
    return from_dict(ServeConfig, dict(args or {}))


def api_key_digest(env_name: str | None) -> bytes | None:
    """SHA-256 of the API key in environment variable `env_name`, or None when it is unset or
    blank (or `env_name` is None): then requests need no key."""
    key = os.environ.get(env_name, "").strip() if env_name else ""
    return hashlib.sha256(key.encode()).digest() if key else None


# ----------------------------------------------------------------------------- requests and responses


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
    usage: dict[str, int] = Field(description="generated tokens, generator calls, samples, PRM calls, scored "
                                              "solutions and steps")
    latency_ms: float
    config: dict[str, Any] = Field(description="the settings the search ran with, defaults filled in")


class ErrorBody(BaseModel):
    error: str
    field: str | None = Field(description="the request field at fault; null when no one field is")


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, the `field` at fault (or None), a message."""

    def __init__(self, field_name: str | None, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.field, self.message, self.status = field_name, message, status

    def body(self) -> dict[str, Any]:
        return {"error": self.message, "field": self.field}


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
        try:
            search = dataclasses.replace(self.cfg.search, **given)
        except ValueError as e:  # SearchConfig's own checks name the field
            raise RequestError(str(e).split(":", 1)[0], str(e)) from None
        digest = hashlib.sha256(req.question.encode()).hexdigest()[:16]
        return name, search, Problem(f"q-{digest}", req.question, None, self.cfg.source)

    async def solve(self, req: SolveRequest,
                    on_step: Callable[[ScoredStep], Awaitable[None]] | None = None) -> dict[str, Any]:
        """Plan and run `req`; a search past `limits.timeout_s` is cancelled (RequestError 504)."""
        return await self.run(*self.plan(req), on_step=on_step)

    async def run(self, name: str, search: SearchConfig, problem: Problem,
                  on_step: Callable[[ScoredStep], Awaitable[None]] | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        timeout = self.cfg.limits.timeout_s
        status, tokens = 500, 0
        try:
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
        return response(result, name, search, latency_ms)


def response(result: SearchResult, name: str, search: SearchConfig, latency_ms: float) -> dict[str, Any]:
    return {"answer": result.answer, "steps": [{"text": s.text, "score": s.score} for s in result.steps],
            "strategy": name, "finished": result.finished, "usage": dataclasses.asdict(result.usage),
            "latency_ms": round(latency_ms, 1), "config": settings(search)}


def settings(search: SearchConfig) -> dict[str, Any]:
    """The search settings a request may set or sees in its response."""
    return {k: getattr(search, k) for k in ("n", "beam_width", "max_steps", "temperature", "aggregation", "tie_break",
                                          "retry_below", "max_retries", "seed")}


# ----------------------------------------------------------------------------- handle adapters


class HandleGenerator:
    """The `Generator` contract, async, over a `GeneratorDeployment` handle."""

    def __init__(self, handle: DeploymentHandle, step_format: StepFormat) -> None:
        self.handle, self.step_format = handle, step_format

    async def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        return await self.handle.next_steps.remote(prefixes, n, sampling)

    async def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        return await self.handle.rollouts.remote(prefixes, n, sampling)


class HandleScorer:
    """The `Scorer` contract, async, over a `PRMDeployment` handle: a search round's solutions
    go in one call, and the deployment's `@serve.batch` merges the rounds of concurrent
    requests into forward batches."""

    def __init__(self, handle: DeploymentHandle) -> None:
        self.handle = handle

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


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class GeneratorDeployment:
    def __init__(self, model_dir: str, backend: str, separator: str, options: dict[str, Any],
                 batching: Batching) -> None:
        self.generator = load_generator(backend, model_dir, StepFormat(separator), **options)
        self._call.set_max_batch_size(batching.max_batch_size)
        self._call.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.log = _BatchLog("mathprm_serve_generator_batch")

    async def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        return await self._call("next_steps", prefixes, n, sampling)

    async def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        return await self._call("rollouts", prefixes, n, sampling)

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
        return out

    def stats(self) -> dict[str, Any]:
        """Batch sizes in generator calls merged per backend batch."""
        return self.log.stats()


@serve.deployment(ray_actor_options={"num_cpus": 0.5})
class PRMDeployment:
    def __init__(self, prm: str, batching: Batching, device: str | None = None) -> None:
        # One Serve batch is one forward batch: the scorer's own batch is as large.
        self.scorer = build_scorer(parse_prm(prm), device=device, batch_size=batching.max_batch_size)
        # A Serve batch holds up to max_batch_size calls (rounds); the scorer cuts their
        # solutions into forward batches of max_batch_size.
        self.score_solutions.set_max_batch_size(batching.max_batch_size)
        self.score_solutions.set_batch_wait_timeout_s(batching.batch_wait_timeout_s)
        self.log = _BatchLog("mathprm_serve_prm_batch")

    @serve.batch
    async def score_solutions(self, questions: list[list[str]], steps: list[list[list[str]]]) -> list[list[list[float]]]:
        """Call with one round's solutions, `(questions, steps) -> per solution, one score per
        step`; Serve hands the method every waiting call's arguments as lists, scored here in
        one go."""
        flat_q = [q for qs in questions for q in qs]
        flat_s = [s for ss in steps for s in ss]
        self.log.add(len(flat_q))
        scores = await asyncio.to_thread(self.scorer.score, flat_q, flat_s)
        out, lo = [], 0
        for qs in questions:
            out.append(scores[lo: lo + len(qs)])
            lo += len(qs)
        return out

    def stats(self) -> dict[str, Any]:
        """Batch sizes in solutions per forward batch."""
        return self.log.stats()


# ----------------------------------------------------------------------------- the HTTP ingress

api = FastAPI(
    title="mathprm: PRM-guided math reasoning",
    description="Solve a math problem step by step with a policy, choosing steps with a process reward model.",
)


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in the app's short form, naming the first field at fault."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if "json" not in request.headers.get("content-type", ""):
        name, message = "body", "body: send a JSON object with the header Content-Type: application/json"
    elif first.get("type") == "json_invalid" or not loc:
        name = "body"
        message = ("body: not valid JSON" if first.get("type") == "json_invalid"
                   else f"body: must be a JSON object with at least a question ({first.get('msg', 'invalid')})")
    else:
        name = ".".join(loc)
        message = f"{name}: {first.get('msg', 'invalid')}"
        if first.get("type") == "extra_forbidden":
            message = f"{name}: unknown field; fields: {', '.join(SolveRequest.model_fields)}"
    return JSONResponse(status_code=422, content={"error": message, "field": name})


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's errors (404, 405, and the 400 FastAPI raises for a body it cannot decode) in
    the same short form."""
    if exc.status_code == 400:
        return JSONResponse(status_code=400, content={"error": f"body: {exc.detail}", "field": "body"})
    return JSONResponse(status_code=exc.status_code, content={"error": str(exc.detail), "field": None},
                        headers=getattr(exc, "headers", None))


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(status_code=exc.status, content=exc.body())


# Paths open without the API key: liveness for load balancers and probes, and the API docs.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json"})


def _presented_keys(headers: list[tuple[bytes, bytes]]) -> list[str]:
    """The keys a request carries: `Authorization: Bearer <key>` and `X-API-Key: <key>`."""
    keys = []
    for name, value in headers:
        text = value.decode("latin-1").strip()
        if name == b"x-api-key":
            keys.append(text)
        elif name == b"authorization":
            scheme, _, token = text.partition(" ")
            if scheme.lower() == "bearer":
                keys.append(token.strip())
    return keys


class APIKeyGate:
    """ASGI middleware: when the ingress replica holds an API key digest, a request outside
    `OPEN_PATHS` without the right key gets 401 before routing, so before its body is read or
    validated. Keys are compared as SHA-256 digests with `hmac.compare_digest`: equal lengths,
    constant time, whatever the client sends."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            # The replica's SolveAPI instance (how Serve's own class-based routes find it).
            digest = serve.get_replica_context().servable_object.api_key_sha256
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            if digest is not None and path not in OPEN_PATHS and not any(
                    hmac.compare_digest(hashlib.sha256(key.encode()).digest(), digest)
                    for key in _presented_keys(scope["headers"])):
                refusal = JSONResponse(
                    status_code=401, headers={"WWW-Authenticate": "Bearer"},
                    content={"error": "unauthorized: send the API key as 'Authorization: Bearer <key>' or "
                                      "'X-API-Key: <key>'", "field": None})
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)


api.add_middleware(APIKeyGate)


_ERRORS = {401: {"model": ErrorBody, "description": "the server has an API key and the request lacks it"},
           422: {"model": ErrorBody, "description": "bad input; `field` names it"},
           504: {"model": ErrorBody, "description": "the search ran past limits.timeout_s"}}


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# `serve.ingress` pickles the app, and with it the routes below and the module globals they
# use as they are at that moment: everything a route calls must be defined above this line.


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress(api)
class SolveAPI:
    def __init__(self, generator: DeploymentHandle, prm: DeploymentHandle | None, cfg: ServeConfig,
                 api_key_sha256: bytes | None = None) -> None:
        self.cfg = cfg
        self.api_key_sha256 = api_key_sha256  # read by APIKeyGate; None: no key needed
        from mathprm.metrics import create

        scorer = HandleScorer(prm) if prm is not None else None
        metrics = {n: create(n) for n in ("mathprm_serve_requests", "mathprm_serve_latency_ms", "mathprm_serve_tokens")}
        self.solver = Solver(cfg, HandleGenerator(generator, StepFormat(cfg.separator)), scorer, metrics)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, and what this server runs: models, strategies, defaults and limits."""
        cfg = self.cfg
        return {"status": "ok", "policy": Path(cfg.policy).name, "prm": cfg.prm and Path(cfg.prm).name,
                "backend": cfg.backend, "dataset": cfg.dataset,
                "strategies": [s for s in RUNNABLE if cfg.prm is not None or not STRATEGIES[s].needs_prm],
                "defaults": {"strategy": cfg.strategy_name} | settings(cfg.search),
                "limits": dataclasses.asdict(cfg.limits), "api_key_required": self.api_key_sha256 is not None}

    @api.post("/v1/solve", response_model=SolveResponse, responses=_ERRORS)
    async def solve(self, body: SolveRequest) -> dict[str, Any]:
        """Solve one problem; the answer, the chosen steps with their PRM scores, and the cost."""
        return await self.solver.solve(body)

    @api.post("/v1/solve/stream", responses=_ERRORS | {200: {"content": {"text/event-stream": {}}}})
    async def solve_stream(self, body: SolveRequest) -> StreamingResponse:
        """The same search as server-sent events: `step` ({text, score}) for each step as soon as
        it is decided, then `done` (the /v1/solve response), or `error` ({error, field, status})."""
        plan = self.solver.plan(body)  # bad input is a plain 422 before the stream starts
        queue: asyncio.Queue = asyncio.Queue()

        async def on_step(step: ScoredStep) -> None:
            await queue.put(_sse("step", {"text": step.text, "score": step.score}))

        async def events():
            task = asyncio.create_task(self.solver.run(*plan, on_step=on_step))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            try:
                while (item := await queue.get()) is not None:
                    yield item
                try:
                    yield _sse("done", task.result())
                except RequestError as e:
                    yield _sse("error", e.body() | {"status": e.status})
                except Exception as e:  # the headers (200) are sent: the stream must say it failed
                    logger.exception("search failed mid-stream")
                    yield _sse("error", {"error": f"internal error: {type(e).__name__}: {e}", "field": None,
                                         "status": 500})
            finally:
                task.cancel()  # the client went away: stop searching

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ----------------------------------------------------------------------------- the app builder


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for `serve run` (YAML `args`) or `serve.run(build_app({...}))`.

    ConfigError (a ValueError) naming the arg for bad args, e.g. a missing model directory.
    Resources, replicas and autoscaling are per deployment in the YAML (`deployments:`). The API
    key is read here, from `cfg.api_key_env` in this process's environment (under `serve run` or
    `serve deploy`, a Ray task on the cluster: the environment Ray was started with)."""
    cfg = load_serve_config(args)
    options = dict(cfg.generator_options)
    if cfg.backend == "hf" and cfg.device is not None:
        options.setdefault("device", cfg.device)
    # Twice a batch in flight per replica: one batch fills while the previous one runs. (Serve's
    # default, 5, would cap every batch at 5.) A YAML `deployments:` entry overrides it.
    generator = GeneratorDeployment.options(max_ongoing_requests=2 * cfg.generator_batch.max_batch_size).bind(
        cfg.policy, cfg.backend, cfg.separator, options, cfg.generator_batch)
    prm = None
    if cfg.prm is not None:
        prm = PRMDeployment.options(max_ongoing_requests=2 * cfg.prm_batch.max_batch_size).bind(
            cfg.prm, cfg.prm_batch, cfg.device)
    return SolveAPI.bind(generator, prm, cfg, api_key_digest(cfg.api_key_env))

