"""The search's core: its config, the requests a strategy yields and their results, the
state a strategy keeps (`Path`, `Context`), and the helpers every strategy shares. See the
package docstring (`mathprm.search`) for the design."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Sequence
from collections.abc import Generator as PyGenerator
from dataclasses import dataclass, field
from typing import Any

from mathprm.data.answers import Judge
from mathprm.data.problems import Problem
from mathprm.generation import Prefix, Sampling, StepSample, prefix_seed
from mathprm.scorer import AGGREGATIONS, aggregate
from mathprm.steps import StepFormat, blank

# ----------------------------------------------------------------------------- configuration

TIE_BREAKS = ("first", "mode")


@dataclass(frozen=True)
class SearchConfig:
    n: int = 8  # candidates per step (guided, beam: per beam, mcts: per expansion) or solutions (best_of_n, ...)
    beam_width: int = 4  # beam: partial solutions kept; dvts: candidates per step of each subtree
    max_steps: int = 24  # a solution still unfinished after this many steps ends there
    temperature: float = 0.85  # of every sampled step or solution (greedy: 0)
    top_p: float = 1.0
    max_step_tokens: int = 64  # a longer step is cut
    max_solution_tokens: int = 384  # a longer sampled solution is cut (greedy, majority, best_of_n, ...)
    aggregation: str = "min"  # step scores -> solution score: last | min | prod | mean
    simulations: int = 16  # mcts: selection-expansion-backup rounds
    c_puct: float = 1.0  # mcts: exploration weight
    tie_break: str = "first"  # guided, dvts, beam: between equally scored candidates, first (sampled) | mode
    retry_below: float = 0.9  # guided_retry: resample when the best candidate scores below this x its parent's
    max_retries: int = 2  # guided_retry: at most this many resamplings of one step
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n", "beam_width", "max_steps", "simulations", "max_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: unknown {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if not isinstance(self.retry_below, (int, float)) or not 0.0 < self.retry_below <= 1.0:
            raise ValueError(f"retry_below: must be in (0, 1] (a fraction of the parent's score), got "
                             f"{self.retry_below!r}")
        if self.tie_break not in TIE_BREAKS:
            raise ValueError(f"tie_break: unknown {self.tie_break!r}; choose one of {', '.join(TIE_BREAKS)}")
        if not isinstance(self.c_puct, (int, float)) or self.c_puct < 0:
            raise ValueError(f"c_puct: must be a number >= 0, got {self.c_puct!r}")
        self.sampling  # Sampling's own checks (temperature, top_p, token limits, seed), named by field

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p, max_step_tokens=self.max_step_tokens,
                        max_solution_tokens=self.max_solution_tokens, seed=self.seed)


# ----------------------------------------------------------------------------- requests and results


@dataclass(frozen=True)
class NextSteps:
    """Ask the generator for `n` next steps after each prefix (`Generator.next_steps`)."""

    prefixes: tuple[Prefix, ...]
    n: int
    sampling: Sampling


@dataclass(frozen=True)
class Rollouts:
    """Ask the generator for `n` completions of each prefix (`Generator.rollouts`)."""

    prefixes: tuple[Prefix, ...]
    n: int
    sampling: Sampling


@dataclass(frozen=True)
class Score:
    """Ask the scorer for every step's score of each solution (`Scorer.score`)."""

    questions: tuple[str, ...]
    steps: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class ScoredStep:
    text: str
    score: float | None  # the PRM's score of the solution up to this step; None where no PRM was used


@dataclass(frozen=True)
class Candidate:
    """A candidate next step a strategy weighed: its text, the PRM's score of the solution up to
    it (None without a PRM), and whether the policy ended the solution with it."""

    text: str
    score: float | None
    finished: bool


@dataclass(frozen=True)
class Chosen:
    """Tell the driver a step is decided (the drivers pass it to `on_step`; the Serve app streams
    it); the answer is None. `candidates`: the steps it was chosen from, in sampling order, the
    chosen one at `index` (empty, and `index` None, for a step decided only at a strategy's end)."""

    step: ScoredStep
    candidates: tuple[Candidate, ...] = ()
    index: int | None = None


Request = NextSteps | Rollouts | Score | Chosen


@dataclass
class Usage:
    generated_tokens: int = 0  # every sampled token, kept or not
    generator_calls: int = 0  # requests to the generator (a driver may merge several into one call)
    samples: int = 0  # steps or solutions sampled
    prm_calls: int = 0  # requests to the scorer
    scored_solutions: int = 0  # solutions those requests held
    scored_steps: int = 0  # steps those solutions held
    blank_steps: int = 0  # sampled next steps dropped as blank (`mathprm.steps`, "Sampled steps")


@dataclass
class SearchResult:
    strategy: str
    answer: str | None  # the final answer in the judge's key form; None if none could be read
    steps: list[ScoredStep]
    finished: bool  # the policy ended the solution (False: max_steps or a token limit)
    trace: list[dict[str, Any]]  # the explored tree: {id, parent, step, score, finished, kept}
    usage: Usage = field(default_factory=Usage)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- search state


@dataclass(frozen=True)
class Path:
    """A partial or finished solution: its steps, their PRM scores, and its node in the trace."""

    steps: tuple[str, ...] = ()
    scores: tuple[float, ...] = ()
    finished: bool = False
    node: int = -1  # trace id; -1 is the root (the question)
    dead_end: bool = False  # every sampled next step was blank: the path ends here, unfinished

    @property
    def value(self) -> float:
        """The PRM's value of this prefix: its last step's score (-inf for no scored step)."""
        return self.scores[-1] if self.scores else -math.inf

    def total(self, how: str) -> float:
        """The solution score by aggregation `how` (-inf for no scored step)."""
        return aggregate(self.scores, how) if self.scores else -math.inf


class Context:
    """What a strategy knows: the problem, the config, the step format, the answer judge, a
    seed source and the trace it records."""

    def __init__(self, problem: Problem, cfg: SearchConfig, fmt: StepFormat) -> None:
        self.problem, self.cfg, self.fmt, self.judge = problem, cfg, fmt, Judge(problem)
        digest = hashlib.sha256(problem.question.encode()).digest()
        self._base = (cfg.seed * 1_000_003 + int.from_bytes(digest[:8], "big")) % (1 << 63)
        self._draws = 0
        self.blank_steps = 0  # sampled next steps dropped as blank
        self.trace: list[dict[str, Any]] = []

    def prefix(self, path: Path) -> Prefix:
        self._draws += 1
        return Prefix(self.problem.question, path.steps, seed=prefix_seed(self._base, self._draws))

    def node(self, parent: int, step: str, score: float | None, finished: bool) -> int:
        self.trace.append({"id": len(self.trace), "parent": parent, "step": step, "score": score,
                           "finished": finished, "kept": False})
        return len(self.trace) - 1

    def keep(self, path: Path) -> None:
        """Mark `path`'s nodes, back to the root, as part of the answer."""
        node = path.node
        while node >= 0:
            self.trace[node]["kept"] = True
            node = self.trace[node]["parent"]

    def answer_of(self, steps: Sequence[str]) -> str | None:
        return self.judge.key(self.fmt.separator.join(steps))

    def result(self, strategy: str, path: Path, answer: str | None = None, scored: bool = True) -> SearchResult:
        self.keep(path)
        scores = list(path.scores) if scored else [None] * len(path.steps)
        steps = [ScoredStep(t, s) for t, s in zip(path.steps, scores)]
        return SearchResult(strategy, answer if answer is not None else self.answer_of(path.steps), steps,
                            path.finished, self.trace, Usage(blank_steps=self.blank_steps))


Search = PyGenerator[Request, Any, SearchResult]


def _children(ctx: Context, path: Path, samples: Sequence[StepSample]) -> list[Path]:
    """`path` followed by each sampled step (unscored), in sampling order, by the rule in
    `mathprm.steps` ("Sampled steps"): each step is cleaned; a blank step that ends the solution
    adds nothing (the path just finishes); any other blank step is dropped and counted. When
    every sample was dropped, the one child is `path` itself, ended there (`dead_end`)."""
    out = []
    for sample in samples:
        text = ctx.fmt.clean(sample.text)
        if blank(text):
            if sample.finished:
                out.append(Path(path.steps, path.scores, True, path.node))
            else:
                ctx.blank_steps += 1
            continue
        out.append(Path(path.steps + (text,), path.scores, sample.finished, path.node))
    return out or [dataclasses.replace(path, dead_end=True)]


def _score_new(ctx: Context, parents: Sequence[Path], children: Sequence[Path],
               known: dict[tuple[str, ...], Sequence[float]] | None = None) -> Search:
    """Score the children that added a step (one `Score` request, duplicates scored once, and
    none already in `known`, which gains the new scores) and record every child in the trace.
    Returns the scored children, in order."""
    scores = {} if known is None else known
    todo = list(dict.fromkeys(c.steps for c, p in zip(children, parents)
                              if len(c.steps) > len(p.steps) and c.steps not in scores))
    if todo:
        got = yield Score(tuple(ctx.problem.question for _ in todo), tuple(todo))
        scores.update(zip(todo, got))
    out = []
    for p, c in zip(parents, children):
        if len(c.steps) > len(p.steps):
            s = tuple(float(x) for x in scores[c.steps])
            node = ctx.node(p.node, c.steps[-1], s[-1], c.finished)
            out.append(Path(c.steps, s, c.finished, node))
        else:  # no new step: the parent's solution, now finished or at a dead end
            out.append(dataclasses.replace(c, node=p.node))
    return out


def _best(paths: Sequence[Path], key: Callable[[Path], float]) -> Path:
    """The path with the largest key; ties go to the first."""
    best = paths[0]
    for p in paths[1:]:
        if key(p) > key(best):
            best = p
    return best


def _candidate_key(ctx: Context, candidates: Sequence[Path]) -> Callable[[Path], tuple]:
    """Sort key of candidate steps: the PRM's value (to 6 decimals, so float noise between the
    rows of one batched PRM call makes no difference), then, with `tie_break="mode"`, how often
    the policy sampled that same step among `candidates` (duplicates included)."""
    counts = Counter((c.steps, c.finished) for c in candidates) if ctx.cfg.tie_break == "mode" else Counter()
    return lambda p: (round(p.value, 6), counts[(p.steps, p.finished)])


def _open(ctx: Context, path: Path) -> bool:
    return not path.finished and not path.dead_end and len(path.steps) < ctx.cfg.max_steps
