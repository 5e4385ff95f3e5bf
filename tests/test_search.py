"""PRM-guided search strategies, with a scripted noisy policy and the exact arithmetic oracle."""

from __future__ import annotations

import asyncio
import dataclasses
import random

import pytest

from mathprm.data import arith
from mathprm.generation import Rollout, StepSample
from mathprm.scorer import ArithOracle
from mathprm.search import (
    RUNNABLE,
    STRATEGIES,
    SearchConfig,
    parse_strategy,
    run_search,
    run_search_async,
    run_searches,
)
from mathprm.steps import StepFormat
from tests.conftest import MEMORISED

FMT = StepFormat(arith.STEP_SEPARATOR)


class NoisyArithPolicy:
    """A Generator for arithmetic-world problems that writes each operation right with
    probability `p_correct`, else one too high, and continues from what it wrote (so an error
    carries to the answer). Greedy decoding takes the likelier branch. Samples depend only on
    each prefix's seed, as the contract asks. `calls` logs every call's kind."""

    context_length = 1 << 20

    def __init__(self, problems, p_correct: float, finish: bool = True) -> None:
        self.by_q = {p.question: p for p in problems}
        self.p, self.finish, self.step_format, self.calls = p_correct, finish, FMT, []

    def room(self, prefix):
        return self.context_length

    def _step(self, problem, steps, rng, greedy):
        start, ops = arith.chain(problem)
        i = len(steps)
        value = start if i == 0 else int(steps[-1].rsplit(" = ", 1)[1])
        if i >= len(ops):
            if not self.finish:  # a policy that never ends: keeps adding zero
                return StepSample(f"{value} + 0 = {value}", 8, False)
            text = f"The answer is {value}"
            return StepSample(text, len(text) + 1, True)
        op, b = ops[i]
        right = arith.apply_op(value, op, b)
        if right is None:  # only after an error: an inexact division; write a value that stays wrong
            right = value // b + 1000
        ok = (self.p >= 0.5) if greedy else rng.random() < self.p
        text = f"{value} {op} {b} = {right if ok else right + 1}"
        return StepSample(text, len(text) + 1, False)

    def next_steps(self, prefixes, n, sampling):
        self.calls.append(("next_steps", len(prefixes), n))
        out = []
        for i, pre in enumerate(prefixes):
            rng = random.Random(pre.sample_seed(sampling, i))
            out.append([self._step(self.by_q[pre.question], list(pre.steps), rng, sampling.greedy) for _ in range(n)])
        return out

    def rollouts(self, prefixes, n, sampling):
        self.calls.append(("rollouts", len(prefixes), n))
        out = []
        for i, pre in enumerate(prefixes):
            rng, rolls = random.Random(pre.sample_seed(sampling, i)), []
            for _ in range(n):
                steps, tokens = list(pre.steps), 0
                while True:
                    s = self._step(self.by_q[pre.question], steps, rng, sampling.greedy)
                    steps.append(s.text)
                    tokens += s.n_tokens
                    if s.finished or len(steps) > 30:
                        break
                rolls.append(Rollout(steps=steps[len(pre.steps):], text=FMT.join(steps[len(pre.steps):]),
                                     n_tokens=tokens, finished=s.finished))
            out.append(rolls)
        return out


class CountingOracle(ArithOracle):
    def __init__(self, problems) -> None:
        super().__init__(problems)
        self.calls = []

    def score(self, questions, steps_per_question):
        self.calls.append(len(questions))
        return super().score(questions, steps_per_question)


PROBLEMS = arith.generate("medium", 12, seed=5, split="test")


def accuracy(results, problems):
    return sum(r.answer is not None and int(r.answer) == int(p.answer) for r, p in zip(results, problems)) / len(problems)


def test_guided_search_with_an_exact_verifier_fixes_a_policy_whose_greedy_answer_is_always_wrong():
    policy, oracle = NoisyArithPolicy(PROBLEMS, p_correct=0.4), ArithOracle(PROBLEMS)
    cfg = SearchConfig(n=8, seed=1)
    greedy = run_searches("greedy", policy, None, PROBLEMS, cfg)
    guided = run_searches("guided", policy, oracle, PROBLEMS, cfg)
    majority = run_searches("majority", policy, None, PROBLEMS, cfg)
    assert accuracy(greedy, PROBLEMS) == 0.0  # the likelier branch is the wrong one
    # P(all 8 candidates wrong at a step) = 0.6^8 < 2 %: guided with an exact PRM nearly always succeeds.
    assert accuracy(guided, PROBLEMS) >= 10 / 12
    assert accuracy(guided, PROBLEMS) > accuracy(majority, PROBLEMS)
    for r, p in zip(guided, PROBLEMS):
        if int(r.answer) == int(p.answer):
            assert [s.score for s in r.steps] == [1.0] * len(r.steps) and r.finished
            assert arith.first_error(p, [s.text for s in r.steps]) == -1


@pytest.mark.parametrize("strategy", ["best_of_n", "weighted_majority", "beam", "dvts", "mcts"])
def test_every_prm_strategy_finds_right_answers_with_the_oracle(strategy):
    policy, oracle = NoisyArithPolicy(PROBLEMS, p_correct=0.5), ArithOracle(PROBLEMS)
    cfg = SearchConfig(n=8, beam_width=2, simulations=24, seed=2)
    results = run_searches(strategy, policy, oracle, PROBLEMS, cfg)
    majority = run_searches("majority", policy, None, PROBLEMS, cfg)
    assert accuracy(results, PROBLEMS) >= 0.75, strategy
    assert accuracy(results, PROBLEMS) > accuracy(majority, PROBLEMS), strategy
    for r in results:
        kept = [node for node in r.trace if node["kept"]]
        assert [node["step"] for node in kept] == [s.text for s in r.steps]  # the trace holds the answer's path
        assert r.usage.prm_calls >= 1 and r.usage.generated_tokens > 0


def test_best_of_n_beats_a_wrong_majority_and_weighted_majority_weighs_votes():
    problem = PROBLEMS[0]
    good = arith.solution_steps(problem)
    start, ops = arith.chain(problem)
    bad = [f"{start} {ops[0][0]} {ops[0][1]} = 1000", *good[1:]]  # wrong first step, same right answer text
    wrong = [f"{start} {ops[0][0]} {ops[0][1]} = 999", "The answer is 999"]

    class Fixed:
        step_format = FMT

        def rollouts(self, prefixes, n, sampling):
            sols = [wrong, wrong, good, bad][:n]
            return [[Rollout(s, FMT.join(s), 10, True) for s in sols]]

    cfg = SearchConfig(n=4)
    maj = run_search("majority", Fixed(), None, problem, cfg)
    assert maj.answer == "999" and [s.text for s in maj.steps] == wrong and maj.steps[0].score is None
    best = run_search("best_of_n", Fixed(), ArithOracle([problem]), problem, cfg)
    assert best.answer == str(int(problem.answer)) and [s.text for s in best.steps] == good
    # weighted: "999" weighs 0 + 0 (min of its step scores), the right answer 1 (good) + 0 (bad).
    wm = run_search("weighted_majority", Fixed(), ArithOracle([problem]), problem, cfg)
    assert wm.answer == str(int(problem.answer)) and [s.text for s in wm.steps] == good
    assert best.usage.prm_calls == 1 and best.usage.scored_solutions == 4 and best.usage.generator_calls == 1
    assert best.usage.generated_tokens == 40 and best.usage.scored_steps == 2 * 2 + 2 * len(good)


def test_usage_counts_every_sampled_token_and_prm_call():
    problem = PROBLEMS[1]
    policy, oracle = NoisyArithPolicy([problem], p_correct=1.0), CountingOracle([problem])
    result = run_search("guided", policy, oracle, problem, SearchConfig(n=5))
    steps = arith.solution_steps(problem)
    assert [s.text for s in result.steps] == steps and result.finished
    u = result.usage
    assert u.generator_calls == len(steps) == len(policy.calls) and u.samples == 5 * len(steps)
    assert u.generated_tokens == 5 * sum(len(s) + 1 for s in steps)
    # All 5 candidates of a step are the same text: the PRM scores it once per step.
    assert u.prm_calls == len(steps) == len(oracle.calls) and u.scored_solutions == len(steps)
    assert u.scored_steps == sum(range(1, len(steps) + 1))
    assert len(result.trace) == 5 * len(steps)


@pytest.mark.parametrize("strategy", sorted(RUNNABLE))
def test_merged_searches_equal_searches_run_alone(strategy):
    problems = PROBLEMS[:5]
    cfg = SearchConfig(n=4, beam_width=2, simulations=6, seed=7)
    scorer = ArithOracle(problems) if STRATEGIES[strategy].needs_prm else None
    merged_policy = NoisyArithPolicy(problems, p_correct=0.6)
    merged = run_searches(strategy, merged_policy, scorer, problems, cfg)
    alone = [run_search(strategy, NoisyArithPolicy(problems, 0.6), scorer, p, cfg) for p in problems]
    assert [r.to_dict() for r in merged] == [r.to_dict() for r in alone]
    # Merging means fewer, bigger generator calls.
    alone_calls = sum(r.usage.generator_calls for r in alone)
    assert len(merged_policy.calls) < alone_calls or alone_calls == len(problems)


def test_guided_streams_each_step_as_soon_as_it_is_decided_and_other_strategies_at_the_end():
    problem = PROBLEMS[2]
    policy = NoisyArithPolicy([problem], p_correct=0.5)
    seen = []
    result = run_search("guided", policy, ArithOracle([problem]), problem, SearchConfig(n=8),
                        on_step=lambda s: seen.append((s, len(policy.calls))))
    assert [c.step for c, _ in seen] == result.steps
    assert [calls for _, calls in seen] == list(range(1, len(result.steps) + 1))  # step k streamed after call k
    # Each step comes with the candidates it was chosen from: the ones the trace recorded
    # under its parent, the chosen one the best scored.
    nodes, parent = result.trace, -1
    for c, _ in seen:
        kids = [t for t in nodes if t["parent"] == parent]
        assert [(k.text, k.score, k.finished) for k in c.candidates] == [(t["step"], t["score"], t["finished"])
                                                                          for t in kids]
        assert c.candidates[c.index].text == c.step.text and c.step.score == max(k.score for k in c.candidates)
        parent = next(t["id"] for t in kids if t["kept"])
    seen.clear()
    result = run_search("beam", policy, ArithOracle([problem]), problem, SearchConfig(n=4, beam_width=2),
                        on_step=lambda s: seen.append((s, len(policy.calls))))
    assert [c.step for c, _ in seen] == result.steps and all(c.candidates == () for c, _ in seen)


def test_the_async_driver_equals_the_sync_one():
    problem = PROBLEMS[3]
    policy, oracle = NoisyArithPolicy([problem], 0.5), ArithOracle([problem])

    class AsyncGen:
        async def next_steps(self, *a):
            await asyncio.sleep(0)
            return policy.next_steps(*a)

        async def rollouts(self, *a):
            return policy.rollouts(*a)

    class AsyncScorer:
        async def score(self, *a):
            return oracle.score(*a)

    streamed = []

    async def on_step(chosen):
        streamed.append(chosen.step)

    for strategy in ("guided", "best_of_n", "beam"):
        cfg = SearchConfig(n=4, beam_width=2, seed=3)
        sync = run_search(strategy, policy, oracle, problem, cfg)
        streamed.clear()
        got = asyncio.run(run_search_async(strategy, AsyncGen(), AsyncScorer(), problem, cfg, FMT, on_step))
        assert got.to_dict() == sync.to_dict() and streamed == got.steps


def test_guided_retry_resamples_only_the_steps_whose_candidates_all_look_worse():
    problems = arith.generate("medium", 12, seed=7, split="test")
    cfg = SearchConfig(n=4, seed=3, max_retries=2)
    policy, oracle = NoisyArithPolicy(problems, p_correct=0.3), ArithOracle(problems)
    guided = run_searches("guided", policy, oracle, problems, cfg)
    retry = run_searches("guided_retry", policy, oracle, problems, cfg)
    # A step after a right prefix: 4 candidates find a right one with P 1 - 0.7^4 = 0.76, 12 with 0.99.
    assert accuracy(retry, problems) >= accuracy(guided, problems) + 0.25
    tokens = lambda rs: sum(r.usage.generated_tokens for r in rs)  # noqa: E731
    assert tokens(guided) < tokens(retry) < (1 + cfg.max_retries) * tokens(guided)
    for r in retry:  # at most n * (1 + max_retries) candidates below any node
        children = {}
        for node in r.trace:
            children[node["parent"]] = children.get(node["parent"], 0) + 1
        assert max(children.values()) <= 4 * 3
    # A policy that is always right never looks worse: guided_retry is guided, to the token.
    sure = NoisyArithPolicy(problems, p_correct=1.0)
    same = run_searches("guided_retry", sure, oracle, problems, cfg)
    plain = run_searches("guided", sure, oracle, problems, cfg)
    assert [[s.text for s in r.steps] for r in same] == [[s.text for s in r.steps] for r in plain]
    assert [r.usage.generated_tokens for r in same] == [r.usage.generated_tokens for r in plain]
    with pytest.raises(ValueError, match="retry_below"):
        SearchConfig(retry_below=1.5)


def test_guided_retry_scores_a_resampled_candidate_it_has_seen_once():
    # The noisy policy's wrong step is always the same text (one too high), so a resampled round
    # repeats candidates of the first: those keep their scores instead of going to the PRM again.
    problems = arith.generate("medium", 8, seed=7, split="test")
    cfg = SearchConfig(n=4, seed=3, max_retries=2)
    policy, oracle = NoisyArithPolicy(problems, p_correct=0.3), ArithOracle(problems)

    class Counting:
        def __init__(self):
            self.seen = []

        def score(self, questions, steps_per_question):
            self.seen += [(q, tuple(s)) for q, s in zip(questions, steps_per_question)]
            return oracle.score(questions, steps_per_question)

    counting = Counting()
    retry = run_searches("guided_retry", policy, counting, problems, cfg)
    assert sum(r.usage.prm_calls for r in retry) > sum(len(r.steps) for r in retry)  # it did resample
    assert len(counting.seen) == len(set(counting.seen))  # ... and scored no solution twice
    assert sum(r.usage.scored_solutions for r in retry) == len(counting.seen)


class Scripted:
    """Samples `script[len(steps)]` (a list of (text, finished) per step) for any prefix."""

    step_format = FMT

    def __init__(self, script) -> None:
        self.script = script

    def next_steps(self, prefixes, n, sampling):
        return [[StepSample(t, len(t), f) for t, f in self.script[len(pre.steps)][:n]] for pre in prefixes]


class TableScorer:
    """Each step's score is `table[step]` (default 0.5): a PRM that cannot tell most steps apart."""

    def __init__(self, table) -> None:
        self.table = table

    def score(self, questions, steps_per_question):
        return [[self.table.get(s, 0.5) for s in steps] for steps in steps_per_question]


@pytest.mark.parametrize("strategy", ["guided", "beam", "dvts"])
def test_equally_scored_candidates_go_to_the_one_sampled_most_often(strategy):
    problem = PROBLEMS[0]
    first = [("1 + 1 = 3", False), ("1 + 1 = 2", False), ("1 + 1 = 2", False), ("1 + 1 = 3", False),
             ("1 + 1 = 2", False), ("1 + 1 = 4", False)]
    script = [first, [("The answer is 2", True)] * 6]
    cfg = SearchConfig(n=6, beam_width=1 if strategy == "beam" else 6, tie_break="mode")  # dvts: one subtree
    steps = lambda r: [s.text for s in r.steps]  # noqa: E731
    tied = TableScorer({"1 + 1 = 3": 0.5 + 1e-9})  # float noise: still a tie at 6 decimals
    assert steps(run_search(strategy, Scripted(script), tied, problem, cfg))[0] == "1 + 1 = 2"
    fifo = dataclasses.replace(cfg, tie_break="first")  # the default
    assert steps(run_search(strategy, Scripted(script), tied, problem, fifo))[0] == "1 + 1 = 3"
    # A higher score wins over any count.
    rare = TableScorer({"1 + 1 = 4": 0.6})
    assert steps(run_search(strategy, Scripted(script), rare, problem, cfg))[0] == "1 + 1 = 4"


def test_a_policy_that_never_finishes_stops_at_max_steps():
    problem = PROBLEMS[0]
    policy = NoisyArithPolicy([problem], 1.0, finish=False)
    for strategy in ("guided", "beam", "dvts", "mcts"):
        r = run_search(strategy, policy, ArithOracle([problem]), problem, SearchConfig(n=2, max_steps=9, simulations=4))
        assert len(r.steps) == 9 and not r.finished and r.answer is None, strategy


def test_mcts_spends_its_simulation_budget():
    problem = PROBLEMS[4]
    policy = NoisyArithPolicy([problem], 0.5)
    r = run_search("mcts", policy, ArithOracle([problem]), problem, SearchConfig(n=3, simulations=30, max_steps=12))
    # Each simulation expands at most one node (one generator call); the budget is far more than
    # the tree needs to finish, so it also explores beyond the first finished solution.
    assert r.finished and int(r.answer) == int(problem.answer)
    assert len(arith.solution_steps(problem)) < r.usage.generator_calls <= 30
    assert r.usage.prm_calls == r.usage.generator_calls


def test_errors_name_what_is_wrong():
    problem = PROBLEMS[0]
    policy = NoisyArithPolicy([problem], 0.5)
    with pytest.raises(ValueError, match="guided needs a PRM"):
        run_search("guided", policy, None, problem, SearchConfig())
    with pytest.raises(ValueError, match="unknown 'nope'"):
        run_search("nope", policy, None, problem, SearchConfig())
    for bad, field in [({"n": 0}, "n"), ({"beam_width": -1}, "beam_width"), ({"aggregation": "max"}, "aggregation"),
                       ({"temperature": 3.0}, "temperature"), ({"max_steps": 1.5}, "max_steps"),
                       ({"c_puct": -1}, "c_puct"), ({"tie_break": "last"}, "tie_break")]:
        with pytest.raises(ValueError, match=field):
            SearchConfig(**bad)
    assert parse_strategy("guided@8") == ("guided", 8) and parse_strategy("beam") == ("beam", None)
    for text in ("guided@0", "guided@", "greedy@4", "search@8", "best_of_n@x"):
        with pytest.raises(ValueError, match="strategy"):
            parse_strategy(text)

    class Broken(ArithOracle):
        def score(self, questions, steps):
            return super().score(questions, steps)[:-1]

    with pytest.raises(RuntimeError, match="returned"):
        run_search("best_of_n", policy, Broken([problem]), problem, SearchConfig(n=2))


def test_search_runs_on_the_real_hf_backend_and_a_real_prm(tiny_policy_dir, tmp_path):
    """The strategies drive the project's real generator and PRM (untrained head: the scores
    are arbitrary, the plumbing is not): the memorised solution comes out of greedy and of
    guided search with every candidate identical, scores are probabilities, and merged
    batches equal single runs."""
    from mathprm.data.problems import Problem
    from mathprm.generation import load_generator
    from mathprm.models.prm import PRMScorer, build_prm, save_prm
    from mathprm.models.tokenizer import build_char_tokenizer

    prm_dir = tmp_path / "prm"
    save_prm(build_prm(str(tiny_policy_dir)), build_char_tokenizer(), FMT, prm_dir, {"base": str(tiny_policy_dir)})
    scorer = PRMScorer(str(prm_dir), device="cpu")
    gen = load_generator("hf", str(tiny_policy_dir), FMT, device="cpu")
    problems = [Problem(f"m{i}", q, steps[-1].rsplit(" ", 1)[1], "arith:memorised")
                for i, (q, steps) in enumerate(MEMORISED.items())]
    cfg = SearchConfig(n=3, temperature=0.0, max_steps=6)
    for strategy in ("greedy", "guided", "beam"):
        results = run_searches(strategy, gen, scorer if strategy != "greedy" else None, problems, cfg)
        for r, (q, steps) in zip(results, MEMORISED.items()):
            assert [s.text for s in r.steps] == list(steps) and r.finished, strategy
            assert r.answer == steps[-1].rsplit(" ", 1)[1]
            if strategy != "greedy":
                assert all(0.0 <= s.score <= 1.0 for s in r.steps)
        alone = run_search(strategy, gen, scorer if strategy != "greedy" else None, problems[1], cfg)
        assert [s.text for s in alone.steps] == [s.text for s in results[1].steps]


@pytest.mark.parametrize("separator", ["\n", "\n\n"])
@pytest.mark.parametrize("strategy", sorted(RUNNABLE))
def test_blank_separator_only_and_cut_steps_never_raise_nor_reach_the_prm(strategy, separator):
    """The rule of `mathprm.steps` ("Sampled steps"): blank samples are dropped, cut ones
    cleaned; with the old code an empty first step raised inside `StepFormat.join`."""
    from tests.conftest import LengthScorer, OddPolicy

    fmt = StepFormat(separator)
    problems = [arith.generate("easy", 1, seed=s, split="test")[0] for s in range(6)]
    scorer = LengthScorer() if STRATEGIES[strategy].needs_prm else None
    cfg = SearchConfig(n=4, beam_width=2, simulations=5, max_steps=6, seed=3)
    for only_odd in (False, True):
        policy = OddPolicy(fmt, only_odd=only_odd)
        merged = run_searches(strategy, policy, scorer, problems, cfg)
        alone = [run_search(strategy, OddPolicy(fmt, only_odd), scorer, p, cfg) for p in problems]
        via_async = [asyncio.run(run_search_async(strategy, _Async(OddPolicy(fmt, only_odd)), _Async(scorer),
                                                  p, cfg, fmt)) for p in problems]
        assert [r.to_dict() for r in merged] == [r.to_dict() for r in alone] == [r.to_dict() for r in via_async]
        for r in merged:
            texts = [s.text for s in r.steps]
            assert all(t.strip() for t in texts), texts  # no blank step in an answer
            fmt.join(texts)  # every answer writes and reads back
            assert fmt.split(fmt.join(texts)) == texts
            if only_odd:
                assert not any(t in policy.real for t in texts)
        if only_odd and strategy not in ("greedy", "majority", "best_of_n", "weighted_majority"):
            # Every next step was blank: each search ends at once (finished where a blank sample
            # ended the solution, else at a dead end) and counts what it dropped.
            assert all(r.steps == [] and (r.finished or r.usage.blank_steps > 0) for r in merged)
            assert sum(r.usage.blank_steps for r in merged) > 0


class _Async:
    """An awaitable view of a synchronous Generator or Scorer (the Serve driver's handles)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    async def next_steps(self, *a):
        return self.inner.next_steps(*a)

    async def rollouts(self, *a):
        return self.inner.rollouts(*a)

    async def score(self, *a):
        return self.inner.score(*a)


class Releasing:
    """A Generator or Scorer with `release`, logging each call's questions (and, for a lockstep
    run, how many scoring calls had happened by then)."""

    def __init__(self, inner, fail_after: int | None = None) -> None:
        self.inner, self.acquired, self.released, self.calls, self.fail_after = inner, [], [], 0, fail_after
        self.step_format = getattr(inner, "step_format", None)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, *a):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("the PRM went away")
        return self.inner.score(*a)

    def acquire(self, questions):
        self.acquired.append(list(questions))

    def release(self, questions):
        self.released.append((list(questions), self.calls))


def test_drivers_release_each_search_when_it_ends_answered_or_failed():
    problems = PROBLEMS[:4]
    policy = Releasing(NoisyArithPolicy(problems, 0.6))
    scorer = Releasing(ArithOracle(problems))
    cfg = SearchConfig(n=3, seed=1)
    run_search("guided", policy, scorer, problems[0], cfg)
    assert [q for q, _ in policy.released] == [q for q, _ in scorer.released] == [[problems[0].question]]
    assert policy.acquired == scorer.acquired == [[problems[0].question]]  # before the search, once
    # Lockstep: each search is released once, in the round it ended (its last scoring call).
    policy.released.clear()
    scorer = Releasing(ArithOracle(problems))
    results = run_searches("guided", policy, scorer, problems, cfg)
    assert scorer.acquired == [[p.question for p in problems]]
    released = [q for qs, _ in scorer.released for q in qs]
    assert sorted(released) == sorted(p.question for p in problems) and released == [q for qs, _ in policy.released
                                                                                      for q in qs]
    for p, r in zip(problems, results):
        at = next(calls for qs, calls in scorer.released if p.question in qs)
        assert at == r.usage.prm_calls  # no later than the round after its last decision
    # A failing scorer: the searches still running are released all the same.
    scorer = Releasing(ArithOracle(problems), fail_after=2)
    with pytest.raises(RuntimeError, match="went away"):
        run_searches("guided", NoisyArithPolicy(problems, 0.6), scorer, problems, cfg)
    assert sorted(q for qs, _ in scorer.released for q in qs) == sorted(p.question for p in problems)
    scorer = Releasing(ArithOracle(problems), fail_after=1)
    with pytest.raises(RuntimeError, match="went away"):
        run_search("guided", NoisyArithPolicy(problems, 0.6), scorer, problems[1], cfg)
    assert scorer.released == [([problems[1].question], 2)]

    class AsyncReleasing(_Async):
        told: list = []

        async def acquire(self, questions):
            self.told.append(("acquire", list(questions)))

        async def release(self, questions):
            self.told.append(("release", list(questions)))

    got = asyncio.run(run_search_async("guided", _Async(NoisyArithPolicy(problems, 0.6)),
                                       AsyncReleasing(ArithOracle(problems)), problems[2], cfg, FMT))
    assert got.steps and AsyncReleasing.told == [("acquire", [problems[2].question]),
                                                 ("release", [problems[2].question])]
