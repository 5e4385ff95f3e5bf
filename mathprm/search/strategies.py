"""The strategies, each declared once in `STRATEGIES` with what it needs and how it spends N
(the list and what each does: the package docstring, `mathprm.search`). A strategy is a
generator over a `Context`: it yields requests and returns a `SearchResult`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mathprm.data.answers import majority_vote, weighted_vote
from mathprm.generation import Rollout
from mathprm.search.core import (
    Candidate,
    Chosen,
    Context,
    NextSteps,
    Path,
    Rollouts,
    Score,
    ScoredStep,
    Search,
    _best,
    _candidate_key,
    _children,
    _open,
    _score_new,
)
from mathprm.steps import content

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
                grown = [c for c in mine if len(c.steps) > len(parent.steps)]  # those that added a step
                yield Chosen(ScoredStep(paths[i].steps[-1], paths[i].scores[-1]),
                             tuple(Candidate(c.steps[-1], c.scores[-1], c.finished) for c in grown),
                             next(k for k, c in enumerate(grown) if c is paths[i]))


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
    if name in allowed and (not at or (n.isascii() and n.isdigit() and int(n) >= 1)):  # not "²", "٣"
        if STRATEGIES[name].spends == "one" and at:
            raise ValueError(f"strategy: {text!r}: {name} takes no @N")
        return name, int(n) if at else None
    raise ValueError(f"strategy: {text!r} is not one of {', '.join(allowed)} (optionally @N, N >= 1)")
