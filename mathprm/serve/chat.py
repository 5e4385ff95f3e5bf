"""The OpenAI-compatible face of the app: `/v1/models`, `/v1/chat/completions` (plain and
streamed) as OpenAI clients speak them, mapped onto the `Solver`. No HTTP and no Ray in it.

Models are strategies: `mathprm-guided@8` is guided search with 8 candidates a step,
`mathprm-greedy` the policy alone (`model_ids` lists one per strategy this server runs; any
`mathprm-NAME@N` within the limits is accepted, and `mathprm` is the server's default). The
question is the last message, which must be the user's; the policy is prompted with the
server's own prompt (its chat template), so earlier turns and system messages do not reach
it. The reply's content is the chosen steps joined by the step separator, as the policy writes
them. Beyond OpenAI's fields, a completion carries `mathprm` (the steps with their PRM scores,
the answer, and whether it matches `gold_answer` when the request gave one), and each streamed
step its candidates with their scores.

`usage.completion_tokens` counts every token the search sampled (what it cost: a guided@8
samples 8 candidates a step), not only the kept ones; `mathprm.usage` breaks it down.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from mathprm.data.answers import Judge
from mathprm.data.problems import Problem
from mathprm.search import RUNNABLE, STRATEGIES, Chosen, SearchConfig
from mathprm.serve.config import ServeConfig
from mathprm.serve.solver import RequestError, SolveRequest, Text, with_settings

MODEL_PREFIX = "mathprm"

# The OpenAI error `type` of each status a route answers.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 408: "timeout_error", 422: "invalid_request_error",
               500: "server_error", 504: "timeout_error"}


def is_openai_path(path: str) -> bool:
    """Paths whose errors take OpenAI's form (`openai_error`), so OpenAI clients can read them."""
    return path in ("/v1/models", "/v1/completions") or path.startswith(("/v1/chat/", "/v1/models/"))


def openai_error(status: int, field_name: str | None, message: str, request_id: str) -> dict[str, Any]:
    """An OpenAI error object: `{"error": {message, type, param, code}}`, plus the request's id."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": field_name, "code": "model_not_found" if field_name == "model" and status == 404
                      else None, "request_id": request_id}}


def openai_status(status: int) -> int:
    """OpenAI answers bad input with 400; the app's own routes use 422."""
    return 400 if status == 422 else status


# ----------------------------------------------------------------------------- models


def served_strategies(has_prm: bool) -> list[str]:
    """The strategies a server runs: every runnable one, those that need a PRM only with one."""
    return [s for s in RUNNABLE if has_prm or not STRATEGIES[s].needs_prm]


def model_id(strategy: str, n: int | None) -> str:
    return f"{MODEL_PREFIX}-{strategy}" if n is None else f"{MODEL_PREFIX}-{strategy}@{n}"


def model_ids(cfg: ServeConfig, has_prm: bool) -> list[str]:
    """One model per strategy this server runs, at the server's default `n` (greedy has none)."""
    return [model_id(s, None if STRATEGIES[s].spends == "one" else cfg.search.n) for s in served_strategies(has_prm)]


def models_list(cfg: ServeConfig, has_prm: bool, created: int) -> dict[str, Any]:
    """The `GET /v1/models` body."""
    return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "mathprm"}
                                       for m in model_ids(cfg, has_prm)]}


def strategy_of(model: str, cfg: ServeConfig) -> str:
    """The strategy (`name` or `name@N`) a model id names; RequestError 404 naming `model`."""
    if model == MODEL_PREFIX:
        return cfg.strategy
    name = model.removeprefix(MODEL_PREFIX + "-")
    if name == model or name.partition("@")[0] not in RUNNABLE:
        raise RequestError("model", f"model: {model!r} is not served here; GET /v1/models lists the models "
                                    f"(mathprm-NAME or mathprm-NAME@N, NAME one of {', '.join(RUNNABLE)})", status=404)
    return name


# ----------------------------------------------------------------------------- the request


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class ChatRequest(BaseModel):
    """OpenAI's chat completion request, the fields a search can honour. Accepted with their
    OpenAI meaning: model, messages, temperature, top_p, seed, stream, stream_options, user;
    `max_tokens` / `max_completion_tokens` cap every sampled step and sampled solution. `n`,
    `stop`, `logprobs`, penalties: only their defaults (a search returns one solution and ends
    steps at the server's separator). Extensions: `gold_answer` (the reply says whether the
    answer matches it), `beam_width` and `max_steps` as on /v1/solve."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str = Field(description="mathprm-NAME or mathprm-NAME@N (GET /v1/models), or mathprm: the default")
    messages: list[ChatMessage] = Field(min_length=1, description="the last one is the user's question")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, lt=1 << 63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="one solution per request")
    stop: None = Field(None, description="not supported: steps end at the server's separator")
    logprobs: Literal[False] | None = None
    presence_penalty: Literal[0] | None = None
    frequency_penalty: Literal[0] | None = None
    user: Text | None = None
    gold_answer: Text | None = Field(None, description="extension: the reply's mathprm.correct says if the answer matches")
    beam_width: int | None = Field(None, ge=1, description="extension: as on /v1/solve")
    max_steps: int | None = Field(None, ge=1, description="extension: as on /v1/solve")


def question_of(req: ChatRequest, cfg: ServeConfig) -> str:
    """The question (the last message, the user's), the messages checked against the limits."""
    limits = cfg.limits
    if len(req.messages) > limits.messages:
        raise RequestError("messages", f"messages: {len(req.messages)} is over this server's limit of {limits.messages}")
    chars = sum(len(m.text()) for m in req.messages)
    if chars > limits.messages_chars:
        raise RequestError("messages", f"messages: {chars} characters in all is over this server's limit of "
                                       f"{limits.messages_chars}")
    last = req.messages[-1]
    if last.role != "user":
        raise RequestError(f"messages.{len(req.messages) - 1}.role",
                           f"messages.{len(req.messages) - 1}.role: the last message must be the user's question, "
                           f"got {last.role!r}")
    return last.text()


def plan(solver: Any, req: ChatRequest) -> tuple[str, SearchConfig, Problem, Problem | None]:
    """(strategy, search config, problem, problem with the gold answer or None) for `req`;
    RequestError naming the field (in OpenAI's names) for anything the server will not run."""
    cfg = solver.cfg
    strategy = strategy_of(req.model, cfg)
    solve = SolveRequest.model_construct(question=question_of(req, cfg), strategy=strategy, n=None,
                                         beam_width=req.beam_width, max_steps=req.max_steps,
                                         temperature=req.temperature, seed=req.seed)
    try:
        name, search, problem = solver.plan(solve)
    except RequestError as e:
        if e.field == "question":  # the question is the last message's content
            e.field = f"messages.{len(req.messages) - 1}.content"
            e.message = e.field + e.message.removeprefix("question")
        elif e.field in ("strategy", "n"):  # both come from the model's name@N
            e.message = f"model: {e.message}"
            e.field = "model"
        raise
    cap = req.max_completion_tokens or req.max_tokens
    changes: dict[str, Any] = {}
    if cap is not None:
        changes |= {"max_step_tokens": min(cap, search.max_step_tokens),
                    "max_solution_tokens": min(cap, search.max_solution_tokens)}
    if req.top_p is not None:
        changes["top_p"] = req.top_p
    search = with_settings(search, changes)
    graded = None
    if req.gold_answer is not None:
        graded = dataclasses.replace(problem, answer=req.gold_answer)
        if Judge(graded).arith and not _is_int(req.gold_answer):  # the judge reads arith answers as ints
            raise RequestError("gold_answer", f"gold_answer: the arithmetic world's answers are integers, got "
                                              f"{req.gold_answer[:40]!r}")
    return name, search, problem, graded


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def correct(graded: Problem | None, answer: str | None) -> bool | None:
    """Whether `answer` matches the request's gold answer; None without one."""
    return None if graded is None else Judge(graded).correct(answer)


# ----------------------------------------------------------------------------- replies


class Reply:
    """The ids and timestamps one completion's body or chunks share, and their builders."""

    def __init__(self, model: str, request_id: str, separator: str) -> None:
        self.id = f"chatcmpl-{request_id or uuid.uuid4().hex}"
        self.model, self.separator, self.created = model, separator, int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(solved: dict[str, Any]) -> dict[str, int]:
        prompt, completion = solved["usage"]["prompt_tokens"], solved["usage"]["generated_tokens"]
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    @staticmethod
    def extension(solved: dict[str, Any]) -> dict[str, Any]:
        return {k: solved.get(k) for k in ("answer", "correct", "steps", "strategy", "finished", "usage", "config",
                                           "latency_ms")}

    @staticmethod
    def finish_reason(solved: dict[str, Any]) -> str:
        return "stop" if solved["finished"] else "length"

    def completion(self, solved: dict[str, Any]) -> dict[str, Any]:
        """The `chat.completion` body of a solved request (`Solver.run`'s dict, with `correct`)."""
        text = self.separator.join(s["text"] for s in solved["steps"])
        return self._head("chat.completion") | {
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": self.finish_reason(solved)}],
            "usage": self.usage(solved), "mathprm": self.extension(solved)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> dict[str, Any]:
        return self._head("chat.completion.chunk") | {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]} | extra

    def first(self) -> dict[str, Any]:
        return self.chunk({"role": "assistant", "content": ""})

    def step(self, chosen: Chosen, index: int) -> dict[str, Any]:
        """A decided step: its text as it joins the solution, its score and its candidates."""
        text = chosen.step.text if index == 0 else self.separator + chosen.step.text
        candidates = [dataclasses.asdict(c) | {"chosen": k == chosen.index} for k, c in enumerate(chosen.candidates)]
        return self.chunk({"content": text}, mathprm={"step": {"index": index, "text": chosen.step.text,
                                                               "score": chosen.step.score},
                                                      "candidates": candidates})

    def last(self, solved: dict[str, Any]) -> dict[str, Any]:
        return self.chunk({}, self.finish_reason(solved), mathprm=self.extension(solved))

    def usage_chunk(self, solved: dict[str, Any]) -> dict[str, Any]:
        return self._head("chat.completion.chunk") | {"choices": [], "usage": self.usage(solved)}
