"""The HTTP ingress (`SolveAPI`: FastAPI, the API-key gate, the SSE stream, the web page's
routes) and the app builder `build_app` that `serve run` imports."""

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from mathprm.search import Chosen
from mathprm.serve import chat
from mathprm.serve.config import ServeConfig, api_key_digest, load_serve_config
from mathprm.serve.deployments import GeneratorDeployment, HandleGenerator, HandleScorer, PRMDeployment
from mathprm.serve.page import label_datasets, label_problem, label_problems, sample_problems
from mathprm.serve.solver import (
    ErrorBody,
    RequestError,
    ScoreStepsRequest,
    ScoreStepsResponse,
    Solver,
    SolveRequest,
    SolveResponse,
    settings,
    steps_to_score,
)
from mathprm.steps import StepFormat

logger = logging.getLogger("ray.serve")

# ----------------------------------------------------------------------------- the HTTP ingress

api = FastAPI(
    title="mathprm: PRM-guided math reasoning",
    description="Solve a math problem step by step with a policy, choosing steps with a process reward model.",
)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def request_id(scope: dict) -> str:
    """The id of this request in error bodies and the server log: the one Serve's proxy put in
    the `X-Request-ID` header (it echoes it in the response's), unless it is not a plain token
    (a client may send its own; a newline in it could forge log lines), else a fresh one."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        given = dict(scope.get("headers", ())).get(b"x-request-id", b"").decode("latin-1")
        state["request_id"] = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    return state["request_id"]


def _text(s: str) -> str:
    """`s` with any lone surrogate (a client may send one, in an unknown field's name, say)
    written as its escape: it has no UTF-8 form to send."""
    return s.encode("utf-8", "backslashreplace").decode()


def error_body(scope: dict, field_name: str | None, message: str) -> dict[str, Any]:
    """What every error response of the app's own routes holds: a one-line message naming the
    field, the field (None when no one field is at fault) and the request's id."""
    return {"error": _text(message), "field": field_name and _text(field_name), "request_id": request_id(scope)}


def route_path(scope: dict) -> str:
    """The request's path inside the app (without the app's route prefix)."""
    return scope["path"].removeprefix(scope.get("root_path", "")) or "/"


def error_response(scope: dict, status: int, field_name: str | None, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error the app answers: `error_body` on the app's own routes; on the OpenAI routes
    (`chat.is_openai_path`) an OpenAI error object, with OpenAI's 400 for bad input."""
    if chat.is_openai_path(route_path(scope)):
        return JSONResponse(status_code=chat.openai_status(status), headers=headers, content=chat.openai_error(
            status, field_name and _text(field_name), _text(message), request_id(scope)))
    return JSONResponse(status_code=status, content=error_body(scope, field_name, message), headers=headers)


# Each route's request body, for naming its fields in an error.
REQUEST_MODELS = {"/v1/solve": SolveRequest, "/v1/solve/stream": SolveRequest,
                  "/v1/chat/completions": chat.ChatRequest, "/v1/score/steps": ScoreStepsRequest}
_MODEL_NAMES = {"TextPart", "ChatMessage", "StreamOptions"}  # pydantic names union branches by their class


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 in the app's short form, naming the first field at fault (of the body, or
    a query parameter of the GET routes)."""
    first = exc.errors()[0]
    in_query = first.get("loc", ("body",))[0] == "query"  # a parameter of a GET route
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
    model = REQUEST_MODELS.get(route_path(request.scope), SolveRequest)
    required = ", ".join(n for n, f in model.model_fields.items() if f.is_required())
    if not in_query and "json" not in request.headers.get("content-type", ""):
        name, message = "body", "body: send a JSON object with the header Content-Type: application/json"
    elif first.get("type") == "json_invalid" or not loc:
        name = "body"
        message = ("body: not valid JSON" if first.get("type") == "json_invalid"
                   else f"body: must be a JSON object with at least {required} ({first.get('msg', 'invalid')})")
    else:
        if first.get("type") == "extra_forbidden":
            name = ".".join(loc)
            message = f"{name}: unknown field; fields: {', '.join(model.model_fields)}"
        else:  # a union's branch (`str`, `list[TextPart]`, `TextPart`) is not a field of the request
            name = ".".join(p for p in loc if not (re.fullmatch(r"[a-z-]+\[.*\]|str|int|float|bool|none", p)
                                                   or p in _MODEL_NAMES))
            message = f"{name}: {first.get('msg', 'invalid')}"
    return error_response(request.scope, 422, name, message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's errors (404, 405, the 400 FastAPI raises for a body it cannot decode, and
    `BodyDeadline`'s 408) in the same short form."""
    field_name = "body" if exc.status_code in (400, 408) else None
    message = f"body: {exc.detail}" if field_name else str(exc.detail)
    return error_response(request.scope, exc.status_code, field_name, message, getattr(exc, "headers", None))


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return error_response(request.scope, exc.status, exc.field, exc.message)


def internal_error(what: str, scope: dict) -> dict[str, Any]:
    """The body a client gets for a failure on our side: the request's id and no internals (an
    exception's text can hold a remote traceback with paths, pids and actor ids). Call it from
    an `except` block: the traceback goes to the server log under the same id."""
    rid = request_id(scope)
    logger.exception("%s (request_id %s)", what, rid)
    return error_body(scope, None, f"internal error; the server log has the details under request_id {rid}")


class _HTTPMiddleware:
    """An ASGI middleware that acts on HTTP requests (`http`) and passes anything else on."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        raise NotImplementedError


class ErrorShield(_HTTPMiddleware):
    """ASGI middleware, outermost of the app's: any exception a route lets escape becomes a 500
    `{error, field, request_id}` with no exception text, its traceback logged under that id.
    (Starlette's own fallback answers plain text and re-raises into Serve's replica.)"""

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            body = internal_error(f"{scope['method']} {scope['path']!r} failed", scope)
            if not started:  # else the client sees the response cut short
                await error_response(scope, 500, None, body["error"])(scope, receive, send)


class BodyDeadline(_HTTPMiddleware):
    """ASGI middleware: a request's body must arrive in full within `limits.read_timeout_s` of
    the request reaching the app, else the route's body read raises a 408 (the `body` field)
    with `Connection: close`. Only the body's messages are timed: a streaming response's later
    wait for the client to disconnect is not."""

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        timeout = serve.get_replica_context().servable_object.cfg.limits.read_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        complete = False

        async def timed() -> dict:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise HTTPException(408, f"not received in full within {timeout:g} s (limits.read_timeout_s)",
                                    headers={"Connection": "close"}) from None
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        await self.app(scope, timed, send)


# Paths open without the API key: liveness for load balancers and probes, the API docs, and the
# web page's own files (`/`, `/static/...`): they hold no data, and a browser must load the page
# before it can ask for the key. Everything the page then fetches carries the key.
OPEN_PATHS = frozenset({"/healthz", "/docs", "/docs/oauth2-redirect", "/openapi.json", "/"})
OPEN_STATIC = re.compile(r"/static/[A-Za-z0-9._-]+")  # one file name: nothing below or beside the folder


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


class APIKeyGate(_HTTPMiddleware):
    """ASGI middleware: when the ingress replica holds an API key digest, a request outside
    `OPEN_PATHS` and `OPEN_STATIC` without the right key gets 401 before routing, so before its body is read or
    validated. Keys are compared as SHA-256 digests with `hmac.compare_digest`: equal lengths,
    constant time, whatever the client sends."""

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        # The replica's SolveAPI instance (how Serve's own class-based routes find it).
        digest = serve.get_replica_context().servable_object.api_key_sha256
        path = route_path(scope)
        if digest is not None and path not in OPEN_PATHS and not OPEN_STATIC.fullmatch(path) and not any(
                hmac.compare_digest(hashlib.sha256(key.encode()).digest(), digest)
                for key in _presented_keys(scope["headers"])):
            refusal = error_response(scope, 401, None, "unauthorized: send the API key as 'Authorization: Bearer "
                                                       "<key>' or 'X-API-Key: <key>'", {"WWW-Authenticate": "Bearer"})
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


class CORS(_HTTPMiddleware):
    """ASGI middleware: Starlette's CORS handling for the origins in `cors_origins`, built when
    the replica first needs it; with none configured, no CORS header is sent (browsers then
    let only pages of this origin call the API)."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.cors: Any = None

    async def http(self, scope: dict, receive: Callable, send: Callable) -> None:
        origins = serve.get_replica_context().servable_object.cfg.cors_origins
        if not origins:
            await self.app(scope, receive, send)
            return
        if self.cors is None:
            self.cors = CORSMiddleware(self.app, allow_origins=origins, allow_methods=["GET", "POST"],
                                       allow_headers=["Authorization", "Content-Type", "X-API-Key", "X-Request-ID"],
                                       expose_headers=["X-Request-ID"], max_age=600)
        await self.cors(scope, receive, send)


# Outermost first: ErrorShield, then CORS (a preflight carries no key; a refusal needs CORS
# headers for a browser to read it), BodyDeadline (its 408 is a route's exception), APIKeyGate.
api.add_middleware(APIKeyGate)
api.add_middleware(BodyDeadline)
api.add_middleware(CORS)
api.add_middleware(ErrorShield)


_ERRORS = {400: {"model": ErrorBody, "description": "the request asks for something this server does not run"},
           401: {"model": ErrorBody, "description": "the server has an API key and the request lacks it"},
           408: {"model": ErrorBody, "description": "the body did not arrive in full within limits.read_timeout_s"},
           422: {"model": ErrorBody, "description": "bad input; `field` names it"},
           500: {"model": ErrorBody, "description": "a failure on our side; the server log has it under request_id"},
           504: {"model": ErrorBody, "description": "the search ran past limits.timeout_s"}}


# The page's own headers: it loads nothing from elsewhere and runs no inline script, so a
# browser refuses anything injected into it (model text is only ever set as text, too).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
                                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def static_file(name: str) -> FileResponse:
    """A file of the page (mathprm/serve/static/, found where the replica imports the package),
    or a 404: a name that is not one of the folder's files cannot reach beyond it."""
    folder = resources.files("mathprm.serve") / "static"
    if name not in {f.name for f in folder.iterdir() if f.is_file()}:
        raise HTTPException(404, "Not Found")
    media_type = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}.get(Path(name).suffix)
    return FileResponse(str(folder / name), headers=PAGE_HEADERS, media_type=media_type)


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

        self.prm, self.threshold = prm, None  # the PRM's threshold, asked once
        self.started = int(time.time())  # the models' `created`
        # A search's start and end reach only the deployments that keep prefixes for it.
        scorer = HandleScorer(prm, cfg.prm_prefix_cache_tokens > 0) if prm is not None else None
        metrics = {n: create(n) for n in ("mathprm_serve_requests", "mathprm_serve_latency_ms", "mathprm_serve_tokens")}
        policy = HandleGenerator(generator, StepFormat(cfg.separator),
                                 bool(cfg.generator_options.get("prefix_cache_tokens", 0)))
        self.solver = Solver(cfg, policy, scorer, metrics)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        """Liveness, and what this server runs: models, strategies, defaults and limits."""
        cfg = self.cfg
        return {"status": "ok", "policy": Path(cfg.policy).name, "prm": cfg.prm and Path(cfg.prm).name,
                "backend": cfg.backend, "dataset": cfg.dataset,
                "strategies": chat.served_strategies(cfg.prm is not None),
                "defaults": {"strategy": cfg.strategy_name} | settings(cfg.search),
                "limits": dataclasses.asdict(cfg.limits), "api_key_required": self.api_key_sha256 is not None}

    @api.post("/v1/solve", response_model=SolveResponse, responses=_ERRORS)
    async def solve(self, body: SolveRequest) -> dict[str, Any]:
        """Solve one problem; the answer, the chosen steps with their PRM scores, and the cost."""
        return await self.solver.solve(body)

    @api.post("/v1/solve/stream", responses=_ERRORS | {200: {"content": {"text/event-stream": {}}}})
    async def solve_stream(self, body: SolveRequest, request: Request) -> StreamingResponse:
        """The same search as server-sent events: `step` ({text, score, candidates, index}: the
        candidates the step was chosen from, each {text, score, finished}, the chosen one at
        `index`; none for a strategy that decides its steps at the end) for each step as soon as
        it is decided, then `done` (the /v1/solve response), or `error` ({error, field,
        request_id, status}; for a failure on our side the server log has the traceback under
        request_id)."""
        plan = self.solver.plan(body)  # bad input is a plain 422 before the stream starts

        def step(chosen: Chosen, _: int) -> str:
            return _sse("step", {"text": chosen.step.text, "score": chosen.step.score, "index": chosen.index,
                                 "candidates": [dataclasses.asdict(c) for c in chosen.candidates]})

        async def done(solved: dict[str, Any]) -> list[str]:
            return [_sse("done", solved)]

        return self._stream(request, plan, [], step, done, lambda body, status: _sse("error", body | {"status": status}))

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """OpenAI's model list: one model per strategy this server runs (`mathprm-NAME@N`)."""
        return chat.models_list(self.cfg, self.prm is not None, self.started)

    @api.get("/v1/models/{model}")
    async def model(self, model: str) -> dict[str, Any]:
        """One model of the list (OpenAI's model object); 404 for another."""
        found = [m for m in chat.models_list(self.cfg, self.prm is not None, self.started)["data"] if m["id"] == model]
        if not found:
            raise RequestError("model", f"model: {model!r} is not in this server's list (GET /v1/models)", status=404)
        return found[0]

    @api.post("/v1/chat/completions", responses={200: {"content": {"text/event-stream": {}}}})
    async def chat_completions(self, body: chat.ChatRequest, request: Request) -> Any:
        """OpenAI's chat completion: the last user message solved by the model's strategy
        (`mathprm.serve.chat`); `stream: true` sends one `chat.completion.chunk` per decided step
        (with its candidates and their scores under `mathprm`), then `data: [DONE]`."""
        name, search, problem, graded = chat.plan(self.solver, body)
        reply = chat.Reply(body.model, request_id(request.scope), self.cfg.separator)

        async def judged(solved: dict[str, Any]) -> dict[str, Any]:  # grading real math may take a while
            return solved | {"correct": await asyncio.to_thread(chat.correct, graded, solved["answer"])}

        if not body.stream:
            return reply.completion(await judged(await self.solver.run(name, search, problem)))

        def data(obj: Any) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        async def done(solved: dict[str, Any]) -> list[str]:
            solved = await judged(solved)
            usage = [data(reply.usage_chunk(solved))] if body.stream_options and body.stream_options.include_usage else []
            return [data(reply.last(solved))] + usage + ["data: [DONE]\n\n"]

        def error(err: dict[str, Any], status: int) -> str:
            return data(chat.openai_error(status, err["field"], err["error"], err["request_id"]))

        return self._stream(request, (name, search, problem), [data(reply.first())],
                            lambda chosen, k: data(reply.step(chosen, k)), done, error)

    @api.post("/v1/score/steps", response_model=ScoreStepsResponse, responses=_ERRORS)
    async def score_steps(self, body: ScoreStepsRequest) -> dict[str, Any]:
        """The PRM's score of each step of one solution (batched with the searches' scoring),
        and the first step it scores under its threshold (where it says the solution went wrong)."""
        if self.prm is None:
            raise RequestError(None, "this server has no PRM (prm: null); nothing scores steps", status=400)
        steps = steps_to_score(body, self.cfg)
        try:
            got = await asyncio.wait_for(self.prm.score_steps.remote(body.question, steps), self.cfg.limits.timeout_s)
        except TimeoutError:
            raise RequestError(None, f"scoring did not finish within {self.cfg.limits.timeout_s:g} s "
                                     "(limits.timeout_s)", status=504) from None
        if "too_long" in got:
            field_name = "steps" if body.steps is not None else "solution"
            raise RequestError(field_name, f"{field_name}: {got['too_long']}")
        if self.threshold is None:
            self.threshold = await self.prm.threshold.remote()
        scores = got["scores"]
        return {"steps": steps, "scores": scores, "threshold": self.threshold, "prm": Path(self.cfg.prm).name,
                "first_below": next((i for i, x in enumerate(scores) if x < self.threshold), None)}

    def _stream(self, request: Request, plan: tuple, head: list[str], step: Callable[[Chosen, int], str],
                done: Callable[[dict[str, Any]], Any], error: Callable[[dict[str, Any], int], str]) -> StreamingResponse:
        """A search as an event stream: `head`, `step(chosen, k)` for the k-th decided step as
        soon as it is decided, then `await done(result)`'s events, or `error(error_body, status)`
        (the 200 is sent by then: the stream itself must say it failed). The search is
        cancelled when the client goes away."""
        queue: asyncio.Queue = asyncio.Queue()
        decided = 0

        async def on_step(chosen: Chosen) -> None:
            nonlocal decided
            await queue.put(step(chosen, decided))
            decided += 1

        async def events():
            for item in head:
                yield item
            task = asyncio.create_task(self.solver.run(*plan, on_step=on_step))
            task.add_done_callback(lambda _: queue.put_nowait(None))
            try:
                while (item := await queue.get()) is not None:
                    yield item
                try:
                    tail = await done(task.result())
                except RequestError as e:
                    tail = [error(error_body(request.scope, e.field, e.message), e.status)]
                except Exception:
                    tail = [error(internal_error("search failed mid-stream", request.scope), 500)]
                for item in tail:
                    yield item
            finally:
                task.cancel()  # the client went away: stop searching

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


    # ---- the web page: its files (open), and what it reads besides the search (behind the key)

    @api.get("/", include_in_schema=False)
    async def page(self) -> FileResponse:
        """The web page. Under a route prefix it is at `<prefix>/` (`<prefix>` redirects there),
        where its relative URLs (static/app.js, v1/models) resolve under the prefix."""
        return static_file("index.html")

    @api.get("/static/{name}", include_in_schema=False)
    async def static(self, name: str) -> FileResponse:
        return static_file(name)

    @api.get("/v1/problems", responses=_ERRORS)
    async def problems(self, limit: int = Query(5, ge=1, le=100)) -> dict[str, Any]:
        """The first `limit` problems of this server's dataset (the `problems` arg, else
        `dataset`), each `{id, question, answer}` with its gold answer: the page's examples."""
        dataset = self.cfg.problems or self.cfg.dataset
        data = await asyncio.to_thread(sample_problems, dataset, limit)
        return {"object": "list", "dataset": Path(dataset).name, "data": data}

    @api.get("/v1/labels", responses=_ERRORS)
    async def labels(self) -> dict[str, Any]:
        """The tree-search label datasets under `labels_dir`: `{path, files}` each."""
        return {"object": "list", "data": await asyncio.to_thread(label_datasets, self.cfg.labels_dir)}

    @api.get("/v1/labels/problems", responses=_ERRORS)
    async def labels_problems(self, path: str, offset: int = Query(0, ge=0),
                              limit: int = Query(1000, ge=1, le=10000)) -> dict[str, Any]:
        """The problems of label dataset `path` (as GET /v1/labels names it), `limit` of them from
        `offset` in file order: `{id, n_labels, n_rollouts}` each, `total` in the dataset and
        `has_more` (ask again from offset + limit)."""
        every = await asyncio.to_thread(label_problems, self.cfg.labels_dir, path)
        return {"object": "list", "path": path, "data": every[offset: offset + limit], "offset": offset,
                "total": len(every), "has_more": offset + limit < len(every)}

    @api.get("/v1/labels/problem", responses=_ERRORS)
    async def labels_problem(self, path: str, problem_id: str = Query(alias="id")) -> dict[str, Any]:
        """One problem's labelled steps: prefix, step, Monte-Carlo score, n_rollouts, n_correct, depth, method."""
        return await asyncio.to_thread(label_problem, self.cfg.labels_dir, path, problem_id)


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
            cfg.prm, cfg.prm_batch, cfg.device, cfg.prm_prefix_cache_tokens)
    return SolveAPI.bind(generator, prm, cfg, api_key_digest(cfg.api_key_env))
