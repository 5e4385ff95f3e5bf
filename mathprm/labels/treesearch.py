"""Step labels by tree search: how often a prefix of a solution can still reach the gold answer.

A process reward model needs a score for every step. Without human annotation, a step is
scored by Monte-Carlo completion: roll the policy out from the prefix ending in that step and
count how many completions reach the gold answer. Two searches decide which prefixes to score:

- `math_shepherd` (Wang et al. 2023, arXiv 2312.08935): sample `num_solutions`
  solutions, then score every step of every distinct solution with `rollouts_per_step`
  completions. All prefixes of a problem go to the generator in one batched call.
- `omegaprm` (Luo et al. 2024, arXiv 2406.06592): a tree of states (prefixes).
  Wrong rollouts are kept as candidates, the most promising one by Q(s, r) + U(s) is picked,
  and a binary search over its steps finds the first error, with `rollouts_per_step`
  completions per probe. The rollouts of every probe join the pool. This repeats until the
  per-problem `rollout_budget` or the pool runs out.

Both return `StepLabel`s, one for each scored state: the state's last step, the steps before
it, and score = MC = the fraction of its completions that reach the gold answer (the "soft
estimation" of Math-Shepherd; the hard label `score > 0` is derived later, see `to_trl`).
Grading is a plain callable (`Grader`), so the search never knows the answer format.

Reused rollouts (`reuse_rollouts`, on by default): a completion sampled from an earlier state
that wrote exactly the steps of a later state s is, from s on, a sample of the policy from s
(sampling is autoregressive: what follows s depends on s alone, up to how
the tokenizer splits the text at s's end). So s's MC counts those
completions too, besides its own `rollouts_per_step`, at no generation cost. A state's
`n_rollouts` / `n_correct` include them. This is what OmegaPRM's "reuse of rollouts" asks for
and what pulls right states of a weak policy off MC = 0: a right state whose own k completions
all failed is often passed through by a root solution that reached the answer. Two exclusions
keep the estimate unbiased: a completion that triggered a state's probe (OmegaPRM probes the
steps of a rollout because it failed) is not counted for the states it made the search probe;
root solutions count only when they were sampled like the scoring completions
(`rollout_temperature` null or equal to `temperature`). A completion is counted once it has
written the state's last step whole: more steps follow it, or it ended there (EOS). A truncated
completion's cut last step never matches. OmegaPRM's binary search also reads the reused
completions: a probe whose own completions all failed but that a reused one passed through to
the answer is right, and the search moves past it.

Choices and departures from the papers:

- Searches are coroutines (`LabelSearch`): they yield `RolloutRequest`s for completions instead of calling
  a generator, so `label_problems` can merge the requests of many problems into one batched
  generator call (a Ray actor holds one engine and keeps it busy this way).
- Seeds: request `i` of a problem seeds its prefix `j` with
  `prefix_seed(call_seed(cfg.seed, problem.id, i), j)`, carried on the `Prefix`, so every
  rollout replays whichever problems share its batch.
- The solution text that is graded is the prefix's steps followed by the completion, so an
  answer written in the prefix still counts if the completion adds nothing.
- Math-Shepherd: the last step of a finished solution is scored by grading that solution
  (n_rollouts=1; with reused rollouts, the root solutions that end there, this one among
  them) instead of completing a finished text. A truncated solution's last step is
  partial and gets no label. Identical prefixes across solutions are scored once.
- OmegaPRM, pool: the paper's rule, wrong rollouts from states with 0 < MC(s) < 1, plus the
  wrong rollouts of the root when MC(root) = 0. The empty prefix cannot hold an error, so the
  binary search's lower end still holds there, and hard questions still yield labels.
  Rollouts cut at `max_solution_tokens` count as wrong in MC but are never searched: without
  an answer line there is no known-wrong end to search towards.
- OmegaPRM, len(r) in Q is the rollout's generated tokens (as in the paper; `Rollout.n_tokens`,
  counting EOS). Defaults c_puct=0.125, alpha=0.5, beta=0.9, L=500 are the paper's.
- OmegaPRM, tree: every probed state becomes a node, including the MC = 0 ones at and past
  the first error (the paper adds "the states before the first error"; the negatives are what
  a PRM learns errors from). If the first error is the rollout's last step, nothing was probed
  there, so the whole solution becomes a node graded directly (n_rollouts=1, score 0). A probe
  whose state is already in the tree reuses its MC without new rollouts.
- OmegaPRM, budget: the paper caps the number of searches; here the cap is on rollouts, which
  is what costs. The search stops at the first probe that would go past `rollout_budget`.
- A node can extend its parent by several steps, so its label's `prefix` is the full prefix,
  not the parent. `to_trl` merges such steps into one completion (see there).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Literal

from mathprm.data.problems import Problem
from mathprm.generation import MIN_TEMPERATURE, Prefix, Rollout, Sampling, prefix_seed
from mathprm.generation import Generator as GeneratorProtocol
from mathprm.labels.steptable import StepLabel
from mathprm.steps import StepFormat

State = tuple[str, ...]  # a prefix: the steps written so far
Grader = Callable[[Problem, str], bool]  # (problem, solution text) -> reaches the gold answer


@dataclass
class SearchStats:
    """What one problem's search cost and produced."""

    n_rollouts: int = 0  # completions generated (graded-only final steps not included)
    n_tokens: int = 0  # tokens generated in those completions
    n_calls: int = 0  # generator.rollouts calls
    n_labels: int = 0  # StepLabels returned
    n_all_failed: int = 0  # labels with score 0: no completion reached the gold answer
    n_searches: int = 0  # omegaprm: binary searches started (0 for math_shepherd)
    skipped_too_long: int = 0  # 1: not searched, its prompt leaves less than max_solution_tokens of the context
    no_labels: str = ""  # why the search gave no label (one of NO_LABELS); "" when it gave some


# Why a problem ends with no label, as the searches below decide it (`SearchStats.no_labels`);
# the labelling stage counts them in its summary and progress line.
ALL_RIGHT = "all rollouts right: nothing to label"  # omegaprm: no wrong root solution to search
NOTHING_TO_SEARCH = "no wrong rollout to search: each was cut or wrote no step"  # omegaprm
BUDGET_SPENT = "rollout budget spent before the first probe"  # omegaprm: rollout_budget < num_solutions + k
NO_WHOLE_STEP = "no solution wrote a whole step"  # math_shepherd: every solution empty or cut in its first step
TOO_LONG = "skipped: the prompt leaves less than max_solution_tokens"  # the labelling stage's skip
NO_LABELS = (ALL_RIGHT, NOTHING_TO_SEARCH, BUDGET_SPENT, NO_WHOLE_STEP, TOO_LONG)


@dataclass
class TreeSearchConfig:
    """Step labelling by tree search: the method, its knobs and the sampling of every call."""

    method: Literal["math_shepherd", "omegaprm"] = "math_shepherd"
    num_solutions: int = 8  # solutions sampled at the root (both methods)
    rollouts_per_step: int = 8  # completions per scored state (K in Math-Shepherd, k in OmegaPRM)
    rollout_budget: int = 200  # omegaprm: most completions generated per problem, root's included
    c_puct: float = 0.125  # omegaprm: weight of the exploration term U(s)
    alpha: float = 0.5  # omegaprm: Q(s, r) = alpha^(1 - MC(s)) * beta^(len(r) / L), alpha in (0, 1]
    beta: float = 0.9  # omegaprm: in (0, 1]; below 1 prefers short wrong rollouts
    length_scale: float = 500.0  # omegaprm: L, in generated tokens
    temperature: float = 1.0  # of the solutions sampled at the root
    # Of the completions that score a state; None: `temperature`. Lower makes a weak policy's
    # completions from a right state succeed more often (see docs/BENCHMARKS.md).
    rollout_temperature: float | None = None
    top_p: float = 1.0
    max_solution_tokens: int = 384  # a longer completion is cut (and is wrong unless it has the answer)
    seed: int = 0
    # Count, in a state's score, the rollouts of earlier states that passed through it (module
    # docstring, "reused rollouts"); False: only the state's own completions.
    reuse_rollouts: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("num_solutions", "rollouts_per_step", "rollout_budget"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")
        if self.rollout_budget < self.num_solutions:
            raise ValueError(
                f"rollout_budget: must cover the {self.num_solutions} root solutions, got {self.rollout_budget}"
            )
        for name in ("alpha", "beta"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in (0, 1], got {getattr(self, name)!r}")
        if not self.c_puct >= 0:
            raise ValueError(f"c_puct: must be >= 0, got {self.c_puct!r}")
        if not self.length_scale > 0:
            raise ValueError(f"length_scale: must be > 0, got {self.length_scale!r}")
        self.sampling(0)  # Sampling's own checks, named by field (temperature, top_p, ...)
        if self.rollout_temperature is not None:
            try:
                self.sampling(0, root=False)
            except ValueError:  # Sampling's rule, under this field's name
                raise ValueError(f"rollout_temperature: must be null, 0 (greedy) or in [{MIN_TEMPERATURE:g}, 2], got "
                                 f"{self.rollout_temperature!r}") from None
        if not isinstance(self.reuse_rollouts, bool):
            raise ValueError(f"reuse_rollouts: must be true or false, got {self.reuse_rollouts!r}")

    def sampling(self, seed: int, root: bool = True) -> Sampling:
        """The sampling of root solutions (`root`) or of the completions that score a state."""
        t = self.temperature if root or self.rollout_temperature is None else self.rollout_temperature
        return Sampling(temperature=t, top_p=self.top_p, max_solution_tokens=self.max_solution_tokens, seed=seed)


def call_seed(seed: int, problem_id: str, iteration: int) -> int:
    """The sampling seed of generator call `iteration` for a problem; stable across processes
    (sha256, not `hash`), in [0, 2^63)."""
    digest = hashlib.sha256(f"{seed}\x00{problem_id}\x00{iteration}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass(frozen=True)
class RolloutRequest:
    """What a running search needs next: `n` completions of each prefix (each carries its seed),
    sampled as root solutions (`root`, at `temperature`) or as scoring completions."""

    prefixes: list[Prefix]
    n: int
    root: bool = False


# A running search: yields Requests, is sent each one's completions (per prefix, in order),
# and returns (labels, stats).
LabelSearch = Generator[RolloutRequest, list[list[Rollout]], tuple[list["StepLabel"], SearchStats]]


class _Search:
    """What both methods share: one problem, its rollout requests, grading and stats."""

    def __init__(self, problem: Problem, grader: Grader, cfg: TreeSearchConfig, fmt: StepFormat) -> None:
        self.problem, self.grader, self.cfg, self.fmt = problem, grader, cfg, fmt
        self.stats = SearchStats()
        self.graded: list[tuple[State, Rollout, bool]] = []  # every graded completion: (from state, rollout, ok)
        self.excluded: dict[State, set[int]] = {}  # state -> id() of rollouts not to reuse for it
        # Root solutions are reused only when they were sampled like the scoring completions.
        t = cfg.rollout_temperature
        self.reuse_root = t is None or t == cfg.temperature

    def rollouts(self, states: list[State], n: int) -> Generator[RolloutRequest, list[list[Rollout]], list[list[tuple[Rollout, bool]]]]:
        """`n` graded completions per state, as one request (`yield from` it)."""
        seed = call_seed(self.cfg.seed, self.problem.id, self.stats.n_calls)
        prefixes = [Prefix(self.problem.question, s, seed=prefix_seed(seed, i)) for i, s in enumerate(states)]
        outs = yield RolloutRequest(prefixes, n, root=states == [()])
        self.stats.n_calls += 1
        if len(outs) != len(states):
            raise ValueError(f"generator returned completions for {len(outs)} prefixes, asked for {len(states)}")
        graded = []
        for state, rollouts in zip(states, outs, strict=True):
            if len(rollouts) != n:
                raise ValueError(f"generator returned {len(rollouts)} rollouts for a prefix, asked for {n}")
            self.stats.n_rollouts += n
            self.stats.n_tokens += sum(r.n_tokens for r in rollouts)
            graded.append([(r, self.grade(state, r.text)) for r in rollouts])
            self.graded += [(state, r, ok) for r, ok in graded[-1]]
        return graded

    def reused(self, state: State) -> tuple[int, int]:
        """(n, correct) over the completions of strictly earlier states that passed through
        `state`: their continuation after it is a sample of the policy from `state` (module
        docstring, "reused rollouts"). (0, 0) when `cfg.reuse_rollouts` is off."""
        if not self.cfg.reuse_rollouts:
            return 0, 0
        skip = self.excluded.get(state, set())
        n = correct = 0
        for start, rollout, ok in self.graded:
            m = len(state) - len(start)
            if m <= 0 or state[: len(start)] != start or id(rollout) in skip or (not start and not self.reuse_root):
                continue
            # Its first m steps are the state's; the m-th is whole (more follow, or it ended there).
            if tuple(rollout.steps[:m]) == state[len(start) :] and (len(rollout.steps) > m or rollout.finished):
                n, correct = n + 1, correct + ok
        return n, correct

    def grade(self, state: State, completion: str) -> bool:
        head = self.fmt.join(state) + self.fmt.separator if state else ""
        return self.grader(self.problem, head + completion)

    def label(self, state: State, n: int, correct: int, method: str) -> StepLabel:
        return StepLabel(
            problem_id=self.problem.id,
            question=self.problem.question,
            prefix=state[:-1],
            step=state[-1],
            score=correct / n,
            n_rollouts=n,
            n_correct=correct,
            depth=len(state) - 1,
            method=method,
        )

    def finish(self, labels: list[StepLabel], why: str) -> tuple[list[StepLabel], SearchStats]:
        """The search's result; `why` is the reason recorded if `labels` is empty."""
        self.stats.n_labels = len(labels)
        self.stats.n_all_failed = sum(lab.n_correct == 0 for lab in labels)
        self.stats.no_labels = "" if labels else why
        return labels, self.stats


def _writable(state: State) -> bool:
    """Whether a generator can be prompted with `state`: the lone empty step is the one prefix
    `StepFormat.join` refuses (it reads back as no steps), e.g. a solution opening with the
    separator; every other prefix of a split text joins back."""
    return state != ("",)


def math_shepherd_search(problem: Problem, grader: Grader, cfg: TreeSearchConfig, fmt: StepFormat) -> LabelSearch:
    """Math-Shepherd labels: every step of every distinct sampled solution, scored by
    `cfg.rollouts_per_step` completions from the prefix ending in it. Two requests."""
    search = _Search(problem, grader, cfg, fmt)
    solutions: dict[State, bool] = {}  # distinct solutions, in sampling order -> finished
    for rollout, _ in (yield from search.rollouts([()], cfg.num_solutions))[0]:
        solutions.setdefault(tuple(rollout.steps), rollout.finished)

    order: list[State] = []  # every state to label, first appearance first
    ends: set[State] = set()  # last states of finished solutions: graded, not completed
    inner: dict[State, None] = {}  # the other states, to complete (an ordered set)
    for steps, finished in solutions.items():
        states = [steps[: i + 1] for i in range(len(steps)) if _writable(steps[: i + 1])]
        # A truncated solution's last step is partial; a finished one's is graded as is.
        last = states.pop() if states and states[-1] == steps else None
        for s in states:
            inner.setdefault(s)
        if last is not None and finished:
            ends.add(last)
            states.append(last)
        order += states

    counts: dict[State, tuple[int, int]] = {}  # state -> (n, correct)
    to_complete = list(inner)
    if to_complete:
        k = cfg.rollouts_per_step
        for state, graded in zip(to_complete, (yield from search.rollouts(to_complete, k)), strict=True):
            counts[state] = (k, sum(ok for _, ok in graded))
    for state in ends - inner.keys():  # a state inside another solution is completed instead
        if cfg.reuse_rollouts and search.reuse_root:
            counts[state] = (0, 0)  # the solutions ending here are reused below, this one among them
        else:
            counts[state] = (1, int(search.grade((), search.fmt.join(state))))

    labels, done = [], set()
    for state in order:
        if state not in done:
            done.add(state)
            labels.append(search.label(state, *_plus(counts[state], search.reused(state)), "math_shepherd"))
    return search.finish(labels, NO_WHOLE_STEP)


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return a[0] + b[0], a[1] + b[1]


@dataclass
class _Node:
    """A state of the OmegaPRM tree."""

    state: State
    n: int  # completions from this state (1 for a finished solution graded directly)
    correct: int  # of those, the ones that reach the gold answer
    visits: int = 0  # N(s): times a rollout of this state was selected for a binary search

    @property
    def mc(self) -> float:
        return self.correct / self.n


@dataclass
class _Tree:
    nodes: dict[State, _Node] = field(default_factory=dict)  # in creation order
    pool: list[tuple[_Node, Rollout]] = field(default_factory=list)  # candidate (state, wrong rollout)

    def add(self, state: State, graded: list[tuple[Rollout, bool]]) -> _Node:
        node = _Node(state, len(graded), sum(ok for _, ok in graded))
        self.nodes[state] = node
        if node.correct > 0 or not state:  # 0 < MC(s) < 1, or the root (module docstring)
            for rollout, ok in graded:
                if not ok and rollout.finished and rollout.steps and _writable(state + tuple(rollout.steps[:1])):
                    self.pool.append((node, rollout))
        return node

    def select(self, cfg: TreeSearchConfig) -> tuple[_Node, Rollout]:
        """Remove and return the candidate with the highest `selection_value`; ties go to the
        oldest candidate."""
        total = sum(node.visits for node in self.nodes.values())
        values = [selection_value(cfg, node.mc, rollout.n_tokens, node.visits, total) for node, rollout in self.pool]
        return self.pool.pop(values.index(max(values)))


def selection_value(cfg: TreeSearchConfig, mc: float, n_tokens: int, visits: int, total_visits: int) -> float:
    """OmegaPRM's Q(s, r) + U(s) for a wrong rollout r of `n_tokens` from state s (Luo et al.
    2024): Q = alpha^(1 - MC(s)) * beta^(len(r) / L) favours wrong rollouts from
    states that look right and short ones; U = c_puct * sqrt(sum_i N(s_i)) / (1 + N(s)) favours
    states searched less often. `visits` is N(s), `total_visits` the sum over the tree."""
    q = cfg.alpha ** (1 - mc) * cfg.beta ** (n_tokens / cfg.length_scale)
    u = cfg.c_puct * math.sqrt(total_visits) / (1 + visits)
    return q + u


def omegaprm_search(problem: Problem, grader: Grader, cfg: TreeSearchConfig, fmt: StepFormat) -> LabelSearch:
    """OmegaPRM labels: one per tree node but the root (the node's state, score MC(s)).

    Binary search over a wrong rollout r from state s, invariant: s + r[:lo] reaches the gold
    answer at least once (MC > 0), s + r[:hi] never does; the first error is step hi - 1 of r.
    """
    search = _Search(problem, grader, cfg, fmt)
    k = cfg.rollouts_per_step
    tree = _Tree()
    root = (yield from search.rollouts([()], cfg.num_solutions))[0]
    tree.add((), root)
    # A search always labels a node, so no label means an empty pool or a budget spent at once.
    why = ALL_RIGHT if all(ok for _, ok in root) else NOTHING_TO_SEARCH
    while tree.pool:
        node, rollout = tree.select(cfg)
        node.visits += 1
        search.stats.n_searches += 1
        steps = tuple(rollout.steps)
        lo, hi = 0, len(steps)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            state = node.state + steps[:mid]
            probe = tree.nodes.get(state)
            if probe is None:
                if search.stats.n_rollouts + k > cfg.rollout_budget:
                    return search.finish(_omegaprm_labels(search, tree), BUDGET_SPENT)
                search.excluded.setdefault(state, set()).add(id(rollout))  # probed because `rollout` failed
                probe = tree.add(state, (yield from search.rollouts([state], k))[0])
            if probe.correct > 0 or search.reused(state)[1] > 0:
                lo = mid
            else:
                hi = mid
        end = node.state + steps
        if hi == len(steps) and end not in tree.nodes:  # the error is the last step: never probed
            tree.nodes[end] = _Node(end, 1, 0)  # a wrong finished solution, graded when sampled
            search.excluded.setdefault(end, set()).add(id(rollout))  # that grading is its (1, 0)
    return search.finish(_omegaprm_labels(search, tree), why)


def _omegaprm_labels(search: _Search, tree: _Tree) -> list[StepLabel]:
    return [search.label(s, *_plus((node.n, node.correct), search.reused(s)), "omegaprm")
            for s, node in tree.nodes.items() if s]


SEARCHES: dict[str, Callable[[Problem, Grader, TreeSearchConfig, StepFormat], LabelSearch]] = {
    "math_shepherd": math_shepherd_search,
    "omegaprm": omegaprm_search,
}
METHODS = tuple(SEARCHES)


def label_problems(
    problems: Sequence[Problem],
    generator: GeneratorProtocol,
    grader: Grader,
    cfg: TreeSearchConfig,
    on_done: Callable[[int, list[StepLabel], SearchStats], None] | None = None,
) -> list[tuple[list[StepLabel], SearchStats]]:
    """Run `cfg.method` on every problem at once, in lockstep: each round, the pending requests
    of all unfinished searches become one `generator.rollouts` call per distinct (`n`, root or
    not), so the
    engine sees one large batch instead of many small ones. Every prefix carries its own seed,
    so a problem's labels do not depend on which problems it was batched with.

    `on_done(index, labels, stats)` is called as each problem finishes. Returns (labels, stats)
    per problem, in order.
    """
    search_fn = SEARCHES[cfg.method]
    fmt = generator.step_format
    results: list[tuple[list[StepLabel], SearchStats] | None] = [None] * len(problems)
    running: dict[int, LabelSearch] = {}
    pending: dict[int, RolloutRequest] = {}

    def advance(i: int, reply: list[list[Rollout]] | None) -> None:
        try:
            pending[i] = running[i].send(reply)
        except StopIteration as stop:
            del running[i]
            pending.pop(i, None)
            results[i] = stop.value
            if on_done is not None:
                on_done(i, *stop.value)

    for i, problem in enumerate(problems):
        running[i] = search_fn(problem, grader, cfg, fmt)
        advance(i, None)
    while pending:
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, request in pending.items():
            groups.setdefault((request.n, request.root), []).append(i)
        for (n, root), members in groups.items():
            prefixes = [p for i in members for p in pending[i].prefixes]
            # The sampling's seed is unused: every prefix carries its own.
            outs = generator.rollouts(prefixes, n, cfg.sampling(0, root=root))
            if len(outs) != len(prefixes):
                raise ValueError(f"generator returned completions for {len(outs)} prefixes, asked for {len(prefixes)}")
            at = 0
            for i in members:
                size = len(pending[i].prefixes)
                advance(i, outs[at : at + size])
                at += size
    return results  # type: ignore[return-value]


def math_shepherd(
    problem: Problem, generator: GeneratorProtocol, grader: Grader, cfg: TreeSearchConfig
) -> tuple[list[StepLabel], SearchStats]:
    """`math_shepherd_search` on one problem with `generator` (whatever `cfg.method` says)."""
    return label_problems([problem], generator, grader, dataclasses.replace(cfg, method="math_shepherd"))[0]


def omegaprm(
    problem: Problem, generator: GeneratorProtocol, grader: Grader, cfg: TreeSearchConfig
) -> tuple[list[StepLabel], SearchStats]:
    """`omegaprm_search` on one problem with `generator` (whatever `cfg.method` says)."""
    return label_problems([problem], generator, grader, dataclasses.replace(cfg, method="omegaprm"))[0]


# ----------------------------------------------------------------------------- using labels


def to_trl(labels: Sequence[StepLabel], hard: bool, fmt: StepFormat) -> list[dict]:
    """TRL stepwise-supervision rows {"prompt", "completions", "labels"}: one per root-to-leaf
    path of each problem's labelled states.

    A leaf is a labelled state that no other labelled state of the problem extends, so for
    math_shepherd a row is a sampled solution (a solution that is a prefix of another rides in
    the longer one's row); for omegaprm it is a path to a tree leaf. Along the path, the steps
    between two labelled states are joined with `fmt.separator` into one completion carrying
    the later state's label: an OmegaPRM node can extend its parent by several steps, and only
    node states have measured scores. `prompt` is `fmt.prompt(question)`, so with TRL's
    `step_separator = fmt.separator` the text is exactly the policy's. Labels are scores, or
    `score > 0` (can still reach the gold answer; Math-Shepherd's hard estimation) when `hard`.
    """
    groups: dict[tuple[str, str], list[StepLabel]] = {}
    for lab in labels:
        groups.setdefault((lab.problem_id, lab.method), []).append(lab)
    rows = []
    for group in groups.values():
        by_state = {(*lab.prefix, lab.step): lab for lab in group}
        inner = {s[:i] for s in by_state for i in range(len(s))}  # every proper prefix
        for leaf in (s for s in by_state if s not in inner):
            completions, values, last = [], [], 0
            for end in range(1, len(leaf) + 1):
                lab = by_state.get(leaf[:end])
                if lab is not None:
                    completions.append(fmt.separator.join(leaf[last:end]))  # not join: a lone "" step is fine here
                    values.append(lab.score > 0 if hard else lab.score)
                    last = end
            rows.append({"prompt": fmt.prompt(group[0].question), "completions": completions, "labels": values})
    return rows
