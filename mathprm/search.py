"""PRM-guided search at inference: strategies over a `Generator` and a `Scorer`.

    from mathprm.search import SearchConfig, run_search
    result = run_search("guided", generator, scorer, problem, SearchConfig(n=8))
    result.answer, [(s.text, s.score) for s in result.steps], result.usage

Strategies (`STRATEGIES`; `name@N` sets `n`, e.g. `guided@8`):

- `greedy`: one solution at temperature 0. No PRM.
- `majority`: `n` sampled solutions, the most frequent answer (self-consistency). No PRM.
- `best_of_n`: `n` sampled solutions, the PRM scores every step, the best solution by
  `aggregation` (last / min / prod / mean of its step scores) wins.
- `weighted_majority`: the same `n` scored solutions; each answer's weight is the sum of its
  solutions' aggregated scores (PRM-weighted vote); the answer with most weight wins.
- `guided` (the seed's): sample `n` candidate next steps, keep the one the PRM scores
  highest, repeat until the policy ends the solution or `max_steps`.
- `guided_retry`: `guided`, but when every candidate scores below `retry_below` times its
  parent's score (the PRM says each one made the solution worse: a step the policy rarely gets
  right), `n` more candidates are sampled, up to `max_retries` times, and the best of all is
  kept. It spends more than `guided@N` only on such steps; its `Usage` says how much.
- `beam`: keep `beam_width` partial solutions; each samples `n` candidate next steps; of all
  candidates the `beam_width` with the highest last-step score survive (a finished one leaves
  the beam for the pool of finished solutions); the best finished one by `aggregation` wins.
- `dvts` (diverse verifier tree search, Beeching et al. 2024): `n // beam_width` independent
  subtrees, each a guided search with `beam_width` candidates per step, so `dvts@N` spends what
  `guided@N` spends per step; the best subtree by `aggregation` wins.
- `pass`: not a strategy but a metric over the same pool (any of `n` samples right; it needs
  the gold answer), so only `mathprm evaluate` computes it; `RUNNABLE` leaves it out.
- `mcts`: Monte-Carlo tree search with the PRM as value: `simulations` rounds of PUCT
  selection (c_puct), expansion by `n` sampled next steps, each scored by the PRM, and backup
  of the best child's score; the best finished solution found wins, and when none finished,
  the most visited path is completed by guided steps.

Partial solutions are compared by their last step's score (the PRM's value of the prefix);
finished solutions by `aggregation`. Candidate steps whose scores tie (to 6 decimals) are told
apart by `tie_break`: `first` (default) keeps the first sampled, `mode` the one the policy sampled
most often among the `n` (a PRM whose score is the prefix's minimum, like the demo's, ties every
candidate no worse than an earlier step; on the demo's PRM `mode` measured no better, see
docs/BENCHMARKS.md). Every result reports what it cost (`Usage`: generated
tokens, generator calls and samples, PRM calls and the solutions and steps they scored), so
strategies can be compared at equal compute.

Design. A strategy is a Python generator that *yields requests* (`NextSteps`, `Rollouts`,
`Score`, and `Chosen` when it has decided a step) and receives their results; it never calls a
model. Drivers execute the requests: `run_search` (one problem, synchronous), `run_searches`
(many problems in lockstep, each round's requests merged into one generator call and one
scorer call, which is what makes evaluation on a batched backend fast), and
`run_search_async` (the Serve app: awaits deployment handles, streams `Chosen` steps). Every
prefix carries its own seed, derived from (config seed, question, request count), so a search
samples the same whether it runs alone or merged with others. This module imports neither
torch, Ray nor vLLM.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Callable, Generator as PyGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any

from mathprm.answers import Judge, majority_vote, weighted_vote
from mathprm.generation import Prefix, Rollout, Sampling, StepSample, prefix_seed
from mathprm.problems import Problem
from mathprm.scorer import AGGREGATIONS, aggregate
from mathprm.steps import StepFormat, blank, content

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
class Chosen:
    """Tell the driver a step is decided (streamed by the Serve app); the answer is None."""

    step: ScoredStep


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


# ----------------------------------------------------------------------------- strategies


def greedy(ctx: Context) -> Search:
    sampling = dataclasses.replace(ctx.cfg.sampling, temperature=0.0)
    (rolls,) = yield Rollouts((ctx.prefix(Path()),), 1, sampling)
    path = _chain(ctx, rolls[0], None)
    return ctx.result("greedy", path, scored=False)


def _solution_steps(rollout: Rollout) -> tuple[str, ...]:
    return tuple(content(rollout.steps))


def _chain(ctx: Context, rollout: Rollout, scores: Sequence[float] | None) -> Path:
    """A sampled solution as a chain of trace nodes."""
    steps, node = _solution_steps(rollout), -1
    for i, step in enumerate(steps):
        node = ctx.node(node, step, None if scores is None else float(scores[i]),
                        rollout.finished and i == len(steps) - 1)
    return Path(steps, tuple(float(s) for s in scores) if scores is not None else (), rollout.finished, node)


def _sampled(ctx: Context, scored: bool) -> Search:
    """`n` sampled solutions as paths (scored by the PRM if `scored`)."""
    (rolls,) = yield Rollouts((ctx.prefix(Path()),), ctx.cfg.n, ctx.cfg.sampling)
    scores: list[Sequence[float] | None] = [None] * len(rolls)
    if scored:
        todo = [i for i, r in enumerate(rolls) if _solution_steps(r)]
        if todo:
            got = yield Score(tuple(ctx.problem.question for _ in todo),
                              tuple(_solution_steps(rolls[i]) for i in todo))
            for i, s in zip(todo, got):
                scores[i] = s
    return [_chain(ctx, r, s if s is not None else (() if scored else None)) for r, s in zip(rolls, scores)]


def pick_best(answers: Sequence[str | None], totals: Sequence[float]) -> tuple[int, str | None]:
    """best_of_n: the solution with the highest aggregated score (the first of equals) and its answer."""
    i = max(range(len(totals)), key=lambda j: (totals[j], -j))
    return i, answers[i]


def pick_majority(answers: Sequence[str | None], totals: Sequence[float]) -> tuple[int, str | None]:
    """majority (self-consistency): the most frequent answer and the first solution that gives it."""
    winner = majority_vote(answers)
    return (answers.index(winner) if winner is not None else 0), winner


def pick_weighted(answers: Sequence[str | None], totals: Sequence[float]) -> tuple[int, str | None]:
    """weighted_majority: each answer weighs the sum of its solutions' scores (a -inf score of an
    unscored empty solution counts 0); the answer with most weight, and its best solution."""
    winner = weighted_vote(answers, [max(t, 0.0) for t in totals])
    voters = [j for j, a in enumerate(answers) if a == winner] or list(range(len(answers)))
    return max(voters, key=lambda j: (totals[j], -j)), winner


def _pool(name: str) -> Callable[[Context], Search]:
    """The search of a pool strategy: `n` sampled solutions (scored when it needs a PRM), then
    its `pick` (`STRATEGIES[name]`)."""
    def run(ctx: Context) -> Search:
        strategy = STRATEGIES[name]
        paths = yield from _sampled(ctx, scored=strategy.needs_prm)
        answers = [ctx.answer_of(p.steps) for p in paths]
        i, answer = strategy.pick(answers, [p.total(ctx.cfg.aggregation) for p in paths])
        return ctx.result(name, paths[i], answer=answer, scored=strategy.needs_prm)

    return run


def _candidates(ctx: Context, paths: list[Path], which: list[int], width: int,
                known: dict[tuple[str, ...], Sequence[float]] | None = None) -> Search:
    """`width` scored candidate next steps for each of `paths[i]`, i in `which` (one generator
    call and one PRM call for all; `known`: scores to reuse, see `_score_new`). Returns
    {i: candidates}."""
    samples = yield NextSteps(tuple(ctx.prefix(paths[i]) for i in which), width, ctx.cfg.sampling)
    kids = [_children(ctx, paths[i], cands) for i, cands in zip(which, samples)]
    parents = [paths[i] for i, mine in zip(which, kids) for _ in mine]
    scored = yield from _score_new(ctx, parents, [c for mine in kids for c in mine], known)
    out, lo = {}, 0
    for i, mine in zip(which, kids):
        out[i], lo = scored[lo: lo + len(mine)], lo + len(mine)
    return out


def _all_worse(ctx: Context, parent: Path, candidates: Sequence[Path]) -> bool:
    """guided_retry's test: every candidate scores below `retry_below` x the parent's score (never
    at the first step, which has no parent score)."""
    return bool(parent.scores) and parent.value > 0 and \
        max(c.value for c in candidates) < ctx.cfg.retry_below * parent.value


def _guided_from(ctx: Context, paths: list[Path], width: int, stream: bool, retry: bool = False) -> Search:
    """Guided search from each of `paths` at once (`width` candidates per step, the best kept),
    each until it finishes or reaches max_steps; with `retry`, a step whose candidates all look
    worse than their parent is resampled (`_all_worse`, up to `max_retries` times). Returns the
    final paths, in order."""
    paths = list(paths)
    while True:
        active = [i for i, p in enumerate(paths) if _open(ctx, p)]
        if not active:
            return paths
        known: dict[tuple[str, ...], Sequence[float]] = {}  # this step's scores: a resample seen before is not rescored
        found = yield from _candidates(ctx, paths, active, width, known)  # one PRM call for every subtree
        for _ in range(ctx.cfg.max_retries if retry else 0):
            worse = [i for i in active if _all_worse(ctx, paths[i], found[i])]
            if not worse:
                break
            more = yield from _candidates(ctx, paths, worse, width, known)
            for i in worse:
                found[i] = found[i] + more[i]
        for i in active:
            parent, mine = paths[i], found[i]
            paths[i] = _best(mine, _candidate_key(ctx, mine))
            if stream and len(paths[i].steps) > len(parent.steps):
                yield Chosen(ScoredStep(paths[i].steps[-1], paths[i].scores[-1]))


def guided(ctx: Context) -> Search:
    (path,) = yield from _guided_from(ctx, [Path()], ctx.cfg.n, stream=True)
    return ctx.result("guided", path)


def guided_retry(ctx: Context) -> Search:
    (path,) = yield from _guided_from(ctx, [Path()], ctx.cfg.n, stream=True, retry=True)
    return ctx.result("guided_retry", path)


def dvts(ctx: Context) -> Search:
    subtrees = max(1, ctx.cfg.n // ctx.cfg.beam_width)
    width = min(ctx.cfg.beam_width, ctx.cfg.n)
    paths = yield from _guided_from(ctx, [Path()] * subtrees, width, stream=False)
    return ctx.result("dvts", _best(paths, lambda p: p.total(ctx.cfg.aggregation)))


def beam(ctx: Context) -> Search:
    cfg = ctx.cfg
    beams, done = [Path()], []
    while beams and len(done) < cfg.beam_width:
        samples = yield NextSteps(tuple(ctx.prefix(b) for b in beams), cfg.n, cfg.sampling)
        parents, children, sampled, seen = [], [], [], set()
        for b, cands in zip(beams, samples):
            for child in _children(ctx, b, cands):
                sampled.append(child)
                if (child.steps, child.finished) not in seen:  # one copy of each distinct candidate
                    seen.add((child.steps, child.finished))
                    parents.append(b)
                    children.append(child)
        scored = yield from _score_new(ctx, parents, children)
        key = _candidate_key(ctx, sampled)  # how often each was sampled, over all beams
        ranked = sorted(scored, key=key, reverse=True)  # stable: full ties keep sampling order
        beams = []
        for p in ranked:
            if len(done) + len(beams) >= cfg.beam_width:
                break
            (beams if _open(ctx, p) else done).append(p)
    return ctx.result("beam", _best(done or beams, lambda p: p.total(cfg.aggregation)))


def mcts(ctx: Context) -> Search:
    cfg = ctx.cfg
    # Tree nodes: path, children (indices), visits, value sum. Node 0 is the root.
    paths, children, visits, total = [Path()], [[]], [0], [0.0]
    expanded = [False]

    def q(i: int) -> float:
        return total[i] / visits[i] if visits[i] else paths[i].value

    for _ in range(cfg.simulations):
        line = [0]
        while expanded[line[-1]] and children[line[-1]] and _open(ctx, paths[line[-1]]):
            parent = line[-1]
            bonus = cfg.c_puct * math.sqrt(visits[parent] + 1)
            line.append(max(children[parent], key=lambda c: q(c) + bonus / (1 + visits[c])))
        leaf = line[-1]
        if _open(ctx, paths[leaf]) and not expanded[leaf]:
            (cands,) = yield NextSteps((ctx.prefix(paths[leaf]),), cfg.n, cfg.sampling)
            kids, seen = [], set()
            for child in _children(ctx, paths[leaf], cands):
                if (child.steps, child.finished) not in seen:
                    seen.add((child.steps, child.finished))
                    kids.append(child)
            scored = yield from _score_new(ctx, [paths[leaf]] * len(kids), kids)
            for p in scored:
                paths.append(p)
                children.append([])
                visits.append(0)
                total.append(0.0)
                expanded.append(False)
                children[leaf].append(len(paths) - 1)
            expanded[leaf] = True
            value = max(paths[c].value for c in children[leaf])
        else:
            value = paths[leaf].value
        value = 0.0 if value == -math.inf else value
        for i in line:
            visits[i] += 1
            total[i] += value
    finished = [p for p in paths[1:] if p.finished]
    if finished:
        return ctx.result("mcts", _best(finished, lambda p: p.total(cfg.aggregation)))
    node = 0  # nothing finished within the budget: follow the most visited path, then guided steps
    while children[node]:
        node = max(children[node], key=lambda c: (visits[c], q(c)))
    (path,) = yield from _guided_from(ctx, [paths[node]], cfg.n, stream=False)
    return ctx.result("mcts", path)


@dataclass(frozen=True)
class Strategy:
    """A strategy, declared once (`STRATEGIES`): evaluation, the Serve app and the demo read these
    properties instead of keeping lists of their own."""

    run: Callable[[Context], Search] | None  # the search; None for pass (it needs the gold answer)
    needs_prm: bool  # scores steps with a Scorer
    spends: str  # "one": a single greedy solution; "pool": picks from N sampled solutions; "search": N candidates a step
    pick: Callable[[Sequence[str | None], Sequence[float]], tuple[int, str | None]] | None = None  # pool: (answers,
    #   aggregated scores) -> (chosen solution, answer); evaluation applies it to a shared pool of samples


STRATEGIES: dict[str, Strategy] = {
    "greedy": Strategy(greedy, False, "one"),
    "majority": Strategy(_pool("majority"), False, "pool", pick_majority),
    "best_of_n": Strategy(_pool("best_of_n"), True, "pool", pick_best),
    "weighted_majority": Strategy(_pool("weighted_majority"), True, "pool", pick_weighted),
    "pass": Strategy(None, False, "pool"),  # pass@N: any of N samples right; a metric for `mathprm evaluate`
    "guided": Strategy(guided, True, "search"),
    "guided_retry": Strategy(guided_retry, True, "search"),
    "beam": Strategy(beam, True, "search"),
    "dvts": Strategy(dvts, True, "search"),
    "mcts": Strategy(mcts, True, "search"),
}
RUNNABLE = tuple(name for name, s in STRATEGIES.items() if s.run is not None)  # what a search or a server can run


def parse_strategy(text: str, allowed: Sequence[str] = RUNNABLE) -> tuple[str, int | None]:
    """`name` or `name@N` -> (name, N or None), `name` one of `allowed` (default: what a search can
    run); ValueError naming the text otherwise."""
    name, at, n = str(text).partition("@")
    if name in allowed and (not at or (n.isdigit() and int(n) >= 1)):
        if STRATEGIES[name].spends == "one" and at:
            raise ValueError(f"strategy: {text!r}: {name} takes no @N")
        return name, int(n) if at else None
    raise ValueError(f"strategy: {text!r} is not one of {', '.join(allowed)} (optionally @N, N >= 1)")


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


def _finish(result: SearchResult, usage: Usage, emitted: int, on_step: Callable[[ScoredStep], None] | None):
    usage.blank_steps = result.usage.blank_steps  # counted by the strategy, the rest by the driver
    result.usage = usage
    if on_step is not None:  # steps a strategy decides only at its end are sent now
        for step in result.steps[emitted:]:
            on_step(step)
    return result


def run_search(strategy: str, generator: Any, scorer: Any, problem: Problem, cfg: SearchConfig,
               on_step: Callable[[ScoredStep], None] | None = None) -> SearchResult:
    """Run one strategy on one problem with a synchronous Generator and Scorer (the scorer may
    be None for greedy and majority). `on_step` gets each chosen step as soon as it is decided."""
    search = _start(strategy, problem, cfg, generator.step_format, scorer is not None)
    usage, emitted, reply = Usage(), 0, None
    while True:
        try:
            request = search.send(reply)
        except StopIteration as stop:
            return _finish(stop.value, usage, emitted, on_step)
        if isinstance(request, Chosen):
            emitted += 1
            if on_step is not None:
                on_step(request.step)
            reply = None
            continue
        reply = _execute(request, generator, scorer)
        _account(usage, request, reply)


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
    while replies:
        pending: dict[int, Request] = {}
        for i, reply in replies.items():
            try:
                request = searches[i].send(reply)
                while isinstance(request, Chosen):
                    request = searches[i].send(None)
            except StopIteration as stop:
                results[i] = _finish(stop.value, usages[i], 0, None)
                continue
            pending[i] = request
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
    return results  # type: ignore[return-value]


async def run_search_async(strategy: str, generator: Any, scorer: Any, problem: Problem, cfg: SearchConfig,
                           step_format: StepFormat, on_step: Callable[[ScoredStep], Any] | None = None) -> SearchResult:
    """`run_search` for asynchronous backends (`await generator.next_steps(...)`, `await
    scorer.score(...)`, e.g. Serve deployment handles). `on_step` may be a coroutine function."""
    import inspect

    search = _start(strategy, problem, cfg, step_format, scorer is not None)
    usage, emitted, reply = Usage(), 0, None

    async def emit(step: ScoredStep) -> None:
        if on_step is not None:
            out = on_step(step)
            if inspect.isawaitable(out):
                await out

    while True:
        try:
            request = search.send(reply)
        except StopIteration as stop:
            result: SearchResult = _finish(stop.value, usage, emitted, None)
            for step in result.steps[emitted:]:
                await emit(step)
            return result
        if isinstance(request, Chosen):
            emitted += 1
            await emit(request.step)
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
