"""The Serve app's config (`ServeConfig`, the YAML's `args`), its limits and batching, and the
API key's digest."""

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mathprm.config import from_dict
from mathprm.data.problems import PROBLEM_FILES, token_caps
from mathprm.generation import GENERATORS
from mathprm.scorer import PRMRef, parse_prm, trained_separator
from mathprm.search import STRATEGIES, SearchConfig, parse_strategy
from mathprm.steps import step_format_for

# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; a request over a limit is a 422 naming the field."""

    n: int = 32  # candidates per step / sampled solutions
    beam_width: int = 8
    max_steps: int = 48
    question_chars: int = 4000
    messages: int = 64  # /v1/chat/completions: messages in one request
    messages_chars: int = 64000  # /v1/chat/completions: characters of all messages together
    steps: int = 128  # /v1/score/steps: steps in one solution
    step_chars: int = 4000  # /v1/score/steps: characters of one step
    solution_chars: int = 64000  # /v1/score/steps: characters of the whole solution
    timeout_s: float = 60.0  # a search still running after this is cancelled: 504
    # A request body not received in full this long after the request arrived is a 408 and
    # the connection is closed: a client that sends slowly, or less than its Content-Length,
    # cannot hold a connection (Serve's HTTP proxy has no body read timeout of its own).
    read_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("n", "beam_width", "max_steps", "question_chars", "messages", "messages_chars", "steps",
                     "step_chars", "solution_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


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
    dataset: str = "math500"  # how answers are read and steps cut: arith / arith:* (integers, "\n"), else real math
    separator: str | None = None  # step separator; null: the PRM's own, else the dataset's
    device: str | None = None  # hf generator and PRM: cpu | cuda; null: cuda if available
    generator_options: dict[str, Any] = field(default_factory=dict)  # more keyword arguments of the backend
    strategy: str = "guided"  # a request's default strategy (name or name@N)
    search: SearchConfig = field(default_factory=SearchConfig)  # a request's defaults (n, temperature, ...)
    limits: Limits = field(default_factory=Limits)
    prm_batch: Batching = field(default_factory=Batching)  # solutions per PRM forward batch
    # Tokens of solution prefixes whose KV cache the PRM keeps (an LRU shared by every search on
    # the replica; mathprm.models.prefix): a search round's candidates share their prefix, which
    # is then computed once, and the next round starts from it. 0: every solution in full.
    prm_prefix_cache_tokens: int = 16384
    generator_batch: Batching = field(default_factory=lambda: Batching(16, 0.005))  # generator calls merged
    # The environment variable holding the API key; when it is set (non-empty) where the app is
    # built, requests need the key. The key itself never goes in a config file. null: no key.
    api_key_env: str | None = "MATHPRM_API_KEY"
    # Origins a browser may call the API from (CORS), e.g. ["https://chat.example.org"]; empty:
    # no CORS headers, so only pages served by this app (same origin) can call it. "*": every
    # origin (the API key, sent as a header, still guards every request).
    cors_origins: list[str] = field(default_factory=list)
    # The web page's labels view reads the tree-search label datasets (folders of part files)
    # under this folder, and nothing outside it; null: the view is off.
    labels_dir: str | None = "runs"
    # The dataset the page's "pick a problem" button draws from (a name or a .jsonl/.json/.parquet
    # file): e.g. sample:math500 where the server reads math500 answers but has not the data; null: dataset.
    problems: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prm_prefix_cache_tokens, int) or self.prm_prefix_cache_tokens < 0:
            raise ValueError(f"prm_prefix_cache_tokens: must be an int >= 0 (0: off), got {self.prm_prefix_cache_tokens!r}")
        if self.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.api_key_env):
            raise ValueError(f"api_key_env: {self.api_key_env!r} is not an environment variable name")
        # Replicas start in other processes and directories: paths must be absolute here.
        if not isinstance(self.cors_origins, list) or not all(
                isinstance(o, str) and (o == "*" or re.fullmatch(r"https?://[^/\s]+", o)) for o in self.cors_origins):
            raise ValueError(f"cors_origins: give a list of origins like 'https://host:port' (no path) or '*', "
                             f"got {self.cors_origins!r}")
        self.policy = _model_dir("policy", self.policy, "config.json")
        if self.labels_dir is not None:  # need not exist yet: the view then lists nothing
            self.labels_dir = str(Path(self.labels_dir).expanduser().resolve())
        if self.problems is not None and Path(self.problems).suffix in PROBLEM_FILES:
            path = Path(self.problems).expanduser()
            if not path.is_file():
                raise ValueError(f"problems: {self.problems!r} (relative to {Path.cwd()}) is not a file")
            self.problems = str(path.resolve())
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
        return _source(self.dataset)

    @property
    def strategy_name(self) -> str:
        return self.strategy.partition("@")[0]


def _source(dataset: str) -> str:
    return "arith:any" if dataset == "arith" else dataset


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
    """`args` checked field by field: a `ConfigError` (a ValueError) naming the bad one. The
    search's token caps (`search.max_step_tokens` / `max_solution_tokens`) left out are the
    dataset's (`mathprm.data.problems.token_caps`), as in every other stage."""
    args = dict(args or {})
    search = args.get("search", {})
    if isinstance(search, dict):  # anything else is named by from_dict
        dataset = args.get("dataset", ServeConfig.dataset)
        steps, solutions = token_caps(_source(dataset) if isinstance(dataset, str) else "")
        args["search"] = {"max_step_tokens": steps, "max_solution_tokens": solutions, **search}
    return from_dict(ServeConfig, args)


def api_key_digest(env_name: str | None) -> bytes | None:
    """SHA-256 of the API key in environment variable `env_name`, or None when it is unset or
    blank (or `env_name` is None): then requests need no key."""
    key = os.environ.get(env_name, "").strip() if env_name else ""
    return hashlib.sha256(key.encode()).digest() if key else None
