"""Tree-search step labels on the arithmetic world, with a policy whose error rate is known."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from mathprm.data import arith
from mathprm.data.answers import judge_grader
from mathprm.data.problems import Problem
from mathprm.generation import Prefix, Rollout, Sampling, StepSample
from mathprm.labels.steptable import StepLabel
from mathprm.labels.treesearch import (
    ALL_RIGHT,
    BUDGET_SPENT,
    NO_LABELS,
    NO_WHOLE_STEP,
    NOTHING_TO_SEARCH,
    TOO_LONG,
    TreeSearchConfig,
    call_seed,
    label_problems,
    math_shepherd,
    omegaprm,
    selection_value,
    to_trl,
)
from mathprm.stats import auroc
from mathprm.steps import StepFormat

FMT = StepFormat(arith.STEP_SEPARATOR)


class NoisyArithGenerator:
    """Continues an arith solution from any prefix it wrote, each step (answer line included)
    wrong with probability `p` (`p_root` from the empty prefix), off by 1-3.

    Once a written value is wrong, no later step writes a value of the gold path (a collision
    is bumped by one), so a wrong prefix can never reach the gold answer: from a correct prefix
    with m steps still to write a completion is right with probability exactly (1 - p)^m, from
    a wrong one never. Prefix i of a call draws from `prefix.sample_seed(sampling, i)`.
    """

    step_format = FMT

    def __init__(self, problems: list[Problem], p: float, p_root: float | None = None) -> None:
        self.problems = {pr.question: pr for pr in problems}
        self.p, self.p_root = p, p if p_root is None else p_root
        self.calls: list[list[Prefix]] = []
        self.n_rollouts = 0

    def _steps(self, problem: Problem, steps: tuple[str, ...], rng: random.Random, p: float) -> list[str]:
        start, ops = arith.chain(problem)
        gold = [start]  # gold[i]: the value after i operations
        for op, n in ops:
            gold.append(arith.apply_op(gold[-1], op, n))
        if steps and steps[-1].startswith("The answer is"):
            return []
        value = int(steps[-1].rsplit("= ", 1)[1]) if steps else start
        wrong = value != gold[len(steps)]
        out = []
        for i in range(len(steps), len(ops) + 1):
            if i < len(ops):
                op, n = ops[i]
                result = value // n if op == "/" else arith.apply_op(value, op, n)
            else:
                result = value  # the answer line repeats the last value
            if rng.random() < p:
                result += rng.choice((-3, -2, -1, 1, 2, 3))
                wrong = True
            if wrong and result == gold[min(i + 1, len(ops))]:
                result += 1
            out.append(f"{value} {op} {n} = {result}" if i < len(ops) else f"The answer is {result}")
            value = result
        return out

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        self.calls.append(list(prefixes))
        self.n_rollouts += n * len(prefixes)
        out = []
        for i, prefix in enumerate(prefixes):
            rng = random.Random(prefix.sample_seed(sampling, i))
            p = self.p if prefix.steps else self.p_root
            texts = ["\n".join(self._steps(self.problems[prefix.question], prefix.steps, rng, p)) for _ in range(n)]
            out.append([Rollout(FMT.split(t), t, len(t) + 1, finished=True) for t in texts])
        return out

    def next_steps(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[StepSample]]:
        """The protocol's other half (the searches here only roll out): a rollout's first step."""
        return [[StepSample(r.steps[0], len(r.steps[0]) + 1, len(r.steps) == 1) if r.steps
                 else StepSample("", 1, True) for r in rs] for rs in self.rollouts(prefixes, n, sampling)]


def truth(problem: Problem, lab: StepLabel) -> bool:
    """Whether every step up to and including the labelled one is right."""
    return arith.step_labels(problem, [*lab.prefix, lab.step])[-1]


def run(method, problems, p, cfg, p_root=None):
    gen = NoisyArithGenerator(problems, p, p_root)
    results = [method(pr, gen, judge_grader, cfg) for pr in problems]
    return gen, results


MEDIUM = arith.generate("medium", 30, seed=0)
HARD = arith.generate("hard", 10, seed=0)
CFG = TreeSearchConfig(num_solutions=4, rollouts_per_step=8, rollout_budget=120)


def test_the_double_errs_at_the_rate_it_is_told():
    pr = HARD[0]
    gen = NoisyArithGenerator([pr], p=0.0)
    [[r]] = gen.rollouts([Prefix(pr.question)], 1, Sampling(seed=1))
    assert r.steps == arith.solution_steps(pr)
    gen = NoisyArithGenerator([pr], p=0.2)
    rs = gen.rollouts([Prefix(pr.question)], 400, Sampling(seed=1))[0]
    n_steps = len(arith.solution_steps(pr))
    assert sum(arith.is_correct(pr, r.text) for r in rs) / 400 == pytest.approx(0.8**n_steps, abs=0.06)
    assert all(arith.first_error(pr, r.steps) == -1 for r in rs if arith.is_correct(pr, r.text))


@pytest.mark.parametrize("method", [math_shepherd, omegaprm])
def test_a_wrong_prefix_scores_zero_and_a_right_one_about_its_survival_odds(method):
    p = 0.15
    _, results = run(method, MEDIUM, p, CFG)
    gaps, n_wrong = [], 0
    for pr, (labels, _) in zip(MEDIUM, results):
        n_steps = len(arith.solution_steps(pr))
        for lab in labels:
            if truth(pr, lab):
                gaps.append(lab.score - (1 - p) ** (n_steps - lab.depth - 1))
            else:
                n_wrong += 1
                assert lab.score == 0.0, lab
    assert n_wrong > 20 and len(gaps) > 50
    assert abs(sum(gaps) / len(gaps)) < 0.04


@pytest.mark.parametrize("method", [math_shepherd, omegaprm])
def test_scores_rank_steps_like_the_exact_labels(method):
    _, results = run(method, MEDIUM, 0.15, CFG)
    scores, truths = [], []
    for pr, (labels, _) in zip(MEDIUM, results):
        scores += [lab.score for lab in labels]
        truths += [truth(pr, lab) for lab in labels]
    assert auroc(scores, truths) > 0.9


def test_math_shepherd_labels_every_step_once_in_two_calls():
    # Own completions only: the accounting below is per state (reuse has its own tests).
    gen, results = run(math_shepherd, MEDIUM[:5], 0.3, replace(CFG, reuse_rollouts=False))
    assert len(gen.calls) == 10
    for (labels, stats), batch in zip(results, gen.calls[1::2]):
        assert stats.n_calls == 2
        states = [(*lab.prefix, lab.step) for lab in labels]
        assert len(set(states)) == len(states)
        assert all(s[:-1] in states[:i] for i, s in enumerate(states) if len(s) > 1)  # in step order
        # Every state but the finished solutions' last ones is completed, each once, in one call.
        finals = [lab for lab in labels if lab.step.startswith("The answer is")]
        assert all(lab.n_rollouts == 1 for lab in finals)
        assert sorted(p.steps for p in batch) == sorted(set(states) - {(*f.prefix, f.step) for f in finals})
        assert stats.n_rollouts == CFG.num_solutions + CFG.rollouts_per_step * len(batch)
        assert stats.n_labels == len(labels) and stats.n_all_failed == sum(lab.score == 0 for lab in labels)


class TrailingSeparator(NoisyArithGenerator):
    """Ends every root solution with the separator before EOS, as a real policy may."""

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        out = super().rollouts(prefixes, n, sampling)
        return [rs if p.steps else [Rollout(FMT.split(r.text + "\n"), r.text + "\n", r.n_tokens + 1, True) for r in rs]
                for p, rs in zip(prefixes, out)]


def test_a_completion_that_adds_nothing_is_graded_with_its_prefix():
    gen = TrailingSeparator(MEDIUM[:3], 0.0)
    for pr in MEDIUM[:3]:
        labels, _ = math_shepherd(pr, gen, judge_grader, replace(CFG, reuse_rollouts=False))
        answer, end = labels[-2:]
        # The answer line is now inside the solution: completed, by nothing, and still right.
        assert answer.step.startswith("The answer is") and (answer.n_rollouts, answer.score) == (8, 1.0)
        assert (end.step, end.n_rollouts, end.score) == ("", 1, 1.0)


class Truncating(NoisyArithGenerator):
    """Cuts every root solution inside its answer line, as `max_solution_tokens` would."""

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        out = super().rollouts(prefixes, n, sampling)
        return [rs if p.steps else [Rollout(FMT.split(r.text[:-4]), r.text[:-4], r.n_tokens - 4, False, True)
                                    for r in rs] for p, rs in zip(prefixes, out)]


def test_a_truncated_solution_has_no_label_on_its_cut_step_and_is_not_searched():
    pr = MEDIUM[0]
    labels, _ = math_shepherd(pr, Truncating([pr], 0.3), judge_grader, CFG)
    n_ops = len(arith.chain(pr)[1])
    assert labels and max(lab.depth for lab in labels) == n_ops - 1  # up to the last operation
    assert not any(lab.step.startswith("The answer") for lab in labels)
    labels, stats = omegaprm(pr, Truncating([pr], 0.3), judge_grader, CFG)
    assert (labels, stats.n_searches, stats.n_rollouts) == ([], 0, CFG.num_solutions)


class Silent(NoisyArithGenerator):
    """Ends every root solution at once, without a step, as a policy that samples EOS first."""

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        return [[Rollout([], "", 1, True) for _ in range(n)] for _ in prefixes]


def test_a_problem_without_labels_says_why():
    pr, hard = MEDIUM[0], HARD[0]
    cases = [  # (search, generator, config) -> the reason it gives no label
        (omegaprm, NoisyArithGenerator([pr], 0.0), CFG, ALL_RIGHT),  # no wrong root solution to search
        (omegaprm, Truncating([pr], 0.3), CFG, NOTHING_TO_SEARCH),  # the wrong ones are all cut
        (omegaprm, Silent([pr], 0.3), CFG, NOTHING_TO_SEARCH),  # the wrong ones hold no step
        (omegaprm, NoisyArithGenerator([hard], 0.3), replace(CFG, rollout_budget=CFG.num_solutions), BUDGET_SPENT),
        (math_shepherd, Silent([pr], 0.3), CFG, NO_WHOLE_STEP),
    ]
    assert {why for *_, why in cases} == set(NO_LABELS) - {TOO_LONG}  # the stage's own skip: tests/test_mcts.py
    for search, gen, cfg, why in cases:
        problem = hard if why == BUDGET_SPENT else pr
        labels, stats = search(problem, gen, judge_grader, cfg)
        assert (labels, stats.no_labels) == ([], why), (search.__name__, type(gen).__name__)
    for search in (omegaprm, math_shepherd):  # a labelled problem gives no reason
        labels, stats = search(hard, NoisyArithGenerator([hard], 0.3), judge_grader, CFG)
        assert labels and stats.no_labels == ""


@pytest.mark.parametrize("budget", [4, 12, 13, 37, 60])
def test_omegaprm_never_goes_past_its_rollout_budget(budget):
    cfg = replace(CFG, rollout_budget=budget)
    gen, results = run(omegaprm, HARD, 0.3, cfg)
    assert gen.n_rollouts == sum(stats.n_rollouts for _, stats in results)
    for _, stats in results:
        # Hard chains (6-8 steps) at p=0.3 always leave a wrong root solution to search, so
        # the search stops only when the next probe of k=8 would not fit.
        assert budget - cfg.rollouts_per_step < stats.n_rollouts <= budget
        assert stats.n_calls == 1 + (stats.n_rollouts - cfg.num_solutions) // cfg.rollouts_per_step


def root_solutions(problem: Problem, gen: NoisyArithGenerator, cfg: TreeSearchConfig) -> list[Rollout]:
    """The solutions a search sampled at the root: its first call, replayed."""
    sampling = cfg.sampling(call_seed(cfg.seed, problem.id, 0))
    return gen.rollouts([Prefix(problem.question)], cfg.num_solutions, sampling)[0]


@pytest.mark.parametrize("reuse", [False, True])
def test_omegaprm_binary_search_finds_each_wrong_solutions_first_error(reuse):
    # Errors only at the root: from any later prefix the policy is exact, so MC > 0 exactly
    # when the prefix is right, and the binary search must land on arith.first_error. With
    # reuse, a right state also counts the root solutions through it, some of which err later.
    cfg = replace(CFG, num_solutions=6, rollout_budget=1000, reuse_rollouts=reuse)
    _, results = run(omegaprm, HARD, 0.0, cfg, p_root=0.2)
    n_checked = 0
    for pr, (labels, stats) in zip(HARD, results):
        scores = {(*lab.prefix, lab.step): lab.score for lab in labels}
        wrong = [r.steps for r in root_solutions(pr, NoisyArithGenerator([pr], 0.0, 0.2), cfg)
                 if not arith.is_correct(pr, r.text)]
        assert stats.n_searches == len(wrong)
        for steps in wrong:
            err = arith.first_error(pr, steps)
            assert scores[tuple(steps[: err + 1])] == 0.0  # the first wrong step is labelled wrong
            if err > 0:
                before = scores[tuple(steps[:err])]  # and the step before it right
                assert before == 1.0 if not reuse else 0.5 < before <= 1.0
            n_checked += 1
    assert n_checked >= 10


def test_omegaprm_searches_the_highest_valued_rollout_first():
    # c_puct = 0 and a steep length term: the first search is on the shortest wrong root
    # solution (in tokens), and a budget of one probe shows which one it was.
    cfg = replace(CFG, c_puct=0.0, beta=0.5, length_scale=1.0, rollout_budget=CFG.num_solutions + 8)
    n_not_first = 0
    for pr in HARD:
        gen = NoisyArithGenerator([pr], 0.3)
        labels, stats = omegaprm(pr, gen, judge_grader, cfg)
        wrong = [r for r in root_solutions(pr, gen, cfg) if not arith.is_correct(pr, r.text)]
        shortest = min(wrong, key=lambda r: r.n_tokens)
        [probed] = labels
        assert [*probed.prefix, probed.step] == shortest.steps[: probed.depth + 1]
        n_not_first += shortest is not wrong[0]
    assert n_not_first >= 3


# ----------------------------------------------------------------------------- reused rollouts


@pytest.mark.parametrize("rollout_temperature", [None, 0.5])
def test_math_shepherd_counts_the_completions_that_passed_through_a_state(rollout_temperature):
    # An exact policy: the 4 root solutions are the reference, and every completion of state
    # j passes through every later state. State d (0-based, m operations then the answer line)
    # has its own 8, the 8 of each earlier state, and the 4 roots when they were sampled like
    # the completions; the answer line, completed by nobody, counts the roots that end there
    # (or is graded once when they were not sampled alike) and every state's completions.
    cfg = replace(CFG, rollout_temperature=rollout_temperature)
    k, roots = cfg.rollouts_per_step, cfg.num_solutions if rollout_temperature is None else 0
    for pr in MEDIUM[:3]:
        labels, _ = math_shepherd(pr, NoisyArithGenerator([pr], 0.0), judge_grader, cfg)
        m = len(arith.chain(pr)[1])
        assert [lab.depth for lab in labels] == list(range(m + 1))
        want = [k + roots + k * d for d in range(m)] + [(roots or 1) + k * m]
        assert [lab.n_rollouts for lab in labels] == want
        assert all(lab.n_correct == lab.n_rollouts for lab in labels)


class WrongLastLine(NoisyArithGenerator):
    """Root solutions: the reference with a wrong answer line. Completions: exact."""

    def rollouts(self, prefixes: list[Prefix], n: int, sampling: Sampling) -> list[list[Rollout]]:
        out = super().rollouts(prefixes, n, sampling)
        bad = [Rollout(r.steps[:-1] + ["The answer is -1"], "\n".join(r.steps[:-1] + ["The answer is -1"]),
                       r.n_tokens, True) for r in out[0]]
        return [bad if not p.steps else rs for p, rs in zip(prefixes, out)]


def test_omegaprm_does_not_count_the_failed_rollout_that_made_it_probe_a_state():
    # One root solution, wrong only in its answer line: its binary search probes right states,
    # all of whose completions succeed. Counting the probed rollout itself would pull each
    # probe below 1; it is left out, so every probe is exactly 1 over its own completions and
    # those of the earlier probes that passed through it, and the answer line is the root
    # solution's one grading.
    cfg = replace(CFG, num_solutions=1, rollout_budget=1000)
    for pr in HARD[:3]:
        labels, stats = omegaprm(pr, WrongLastLine([pr], 0.0), judge_grader, cfg)
        probes, (end,) = labels[:-1], labels[-1:]
        assert stats.n_searches == 1 and len(probes) >= 2
        assert all(lab.score == 1.0 for lab in probes)
        assert sorted(lab.n_rollouts for lab in probes) == [8 * (i + 1) for i in range(len(probes))]
        assert (end.step, end.n_rollouts, end.score) == ("The answer is -1", 1, 0.0)


@pytest.mark.parametrize("method", [math_shepherd, omegaprm])
def test_reuse_lifts_right_states_off_zero_and_never_lifts_a_wrong_one(method):
    # A weak policy on hard chains: many right states see all their own completions fail. In
    # this world a wrong prefix never reaches the gold answer, so reuse can only add evidence
    # to right states, and it must leave fewer of them at 0 and rank the steps at least as well.
    cfg = replace(CFG, rollouts_per_step=4, rollout_budget=60)
    by = {}
    for reuse in (False, True):
        _, results = run(method, HARD, 0.25, replace(cfg, reuse_rollouts=reuse))
        rows = [(lab.score, truth(pr, lab)) for pr, (labels, _) in zip(HARD, results) for lab in labels]
        assert all(score == 0 for score, right in rows if not right)
        by[reuse] = (sum(score == 0 for score, right in rows if right), auroc(*zip(*rows)))
    assert by[False][0] > 0 and by[True][0] < by[False][0]
    assert by[True][1] >= by[False][1]


@pytest.mark.parametrize("method", [math_shepherd, omegaprm])
def test_same_seed_same_labels_other_seed_other_labels(method):
    a = run(method, MEDIUM[:8], 0.2, CFG)[1]
    b = run(method, MEDIUM[:8], 0.2, CFG)[1]
    c = run(method, MEDIUM[:8], 0.2, replace(CFG, seed=1))[1]
    assert a == b
    assert [labels for labels, _ in a] != [labels for labels, _ in c]


@pytest.mark.parametrize(
    "field,value",
    [("method", "beam"), ("num_solutions", 0), ("rollouts_per_step", -1), ("rollout_budget", 2),
     ("alpha", 0.0), ("beta", 1.5), ("c_puct", -0.1), ("length_scale", 0), ("temperature", 3.0), ("top_p", 0),
     ("reuse_rollouts", "yes")],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        TreeSearchConfig(**{field: value})


def test_selection_value_by_hand():
    cfg = TreeSearchConfig(c_puct=0.125, alpha=0.5, beta=0.9, length_scale=500)
    # Q = 0.5^(1-0.5) * 0.9^(250/500) = sqrt(0.45); U = 0.125 * sqrt(4) / (1 + 1) = 0.125.
    assert selection_value(cfg, 0.5, 250, 1, 4) == pytest.approx(0.45**0.5 + 0.125)
    assert selection_value(cfg, 1.0, 0, 0, 0) == 1.0  # Q's ceiling, nothing visited yet
    # A wrong rollout from a state that looks right beats one from a state that looks wrong.
    assert selection_value(cfg, 0.9, 100, 0, 0) > selection_value(cfg, 0.1, 100, 0, 0)


def test_auroc_by_hand():
    # Positives 0.9, 0.4; negatives 0.4, 0.1. Pairs: (.9,.4) 1, (.9,.1) 1, (.4,.4) 1/2, (.4,.1) 1.
    # Ranks: .1 -> 1, .4 .4 -> 2.5 each, .9 -> 4; R+ = 6.5, U = 6.5 - 3 = 3.5, 3.5 / 4.
    assert auroc([0.9, 0.4, 0.4, 0.1], [True, True, False, False]) == 0.875
    assert auroc([0.5, 0.5, 0.5], [True, False, True]) == 0.5
    assert auroc([0.2, 0.8], [False, True]) == 1.0
    assert auroc([0.2, 0.8], [True, False]) == 0.0
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [True, True])


def test_to_trl_merges_steps_between_labelled_states():
    def lab(*state: str, score: float) -> StepLabel:
        return StepLabel("p", "Q?", state[:-1], state[-1], score, 8, round(8 * score), len(state) - 1, "omegaprm")

    labels = [lab("a", score=0.5), lab("a", "b", "c", score=0.25), lab("a", "b", "c", "d", score=0.0),
              lab("a", "e", score=1.0), lab("f", "g", score=0.0)]
    rows = to_trl(labels, hard=False, fmt=FMT)
    assert rows == [
        {"prompt": "Q?\n", "completions": ["a", "b\nc", "d"], "labels": [0.5, 0.25, 0.0]},
        {"prompt": "Q?\n", "completions": ["a", "e"], "labels": [0.5, 1.0]},
        {"prompt": "Q?\n", "completions": ["f\ng"], "labels": [0.0]},
    ]
    assert to_trl(labels, hard=True, fmt=FMT)[0]["labels"] == [True, True, False]


def test_to_trl_gives_one_row_per_math_shepherd_solution():
    pr = MEDIUM[0]
    gen = NoisyArithGenerator([pr], 0.3)
    labels, _ = math_shepherd(pr, gen, judge_grader, CFG)
    rows = to_trl(labels, hard=True, fmt=FMT)
    solutions = {tuple(r.steps) for r in root_solutions(pr, gen, CFG)}
    assert sorted(tuple(row["completions"]) for row in rows) == sorted(solutions)
    for row in rows:
        assert row["prompt"] == FMT.prompt(pr.question)
        truths = arith.step_labels(pr, row["completions"])
        assert all(ok for hard, ok in zip(row["labels"], truths, strict=True) if hard)  # reaches gold => right


@pytest.mark.parametrize("method", ["math_shepherd", "omegaprm"])
def test_lockstep_searches_batch_many_problems_per_call_and_label_exactly_as_one_by_one(method):
    cfg = replace(CFG, method=method)
    one_gen, alone = run(math_shepherd if method == "math_shepherd" else omegaprm, HARD, 0.1, cfg)
    gen = NoisyArithGenerator(HARD, 0.1)
    done = []
    together = label_problems(HARD, gen, judge_grader, cfg, on_done=lambda i, labels, stats: done.append(i))
    assert together == alone  # seeds travel with the prefixes, not with the batch
    assert sorted(done) == list(range(len(HARD)))
    # Many problems share each call: far fewer calls, each with prefixes of several problems.
    assert len(gen.calls) < len(one_gen.calls) / 3
    assert max(len({p.question for p in call}) for call in gen.calls) == len(HARD)


def test_lockstep_searches_refuse_a_generator_that_drops_prefixes():
    class Short(NoisyArithGenerator):
        def rollouts(self, prefixes, n, sampling):
            return super().rollouts(prefixes, n, sampling)[:-1]

    with pytest.raises(ValueError, match="completions for 1 prefixes, asked for 2"):
        label_problems(HARD[:2], Short(HARD, 0.1), judge_grader, CFG)


@pytest.mark.parametrize("method", ["math_shepherd", "omegaprm"])
def test_root_solutions_and_scoring_completions_use_their_own_temperatures(method):
    class Recording(NoisyArithGenerator):
        def rollouts(self, prefixes, n, sampling):
            self.temps = getattr(self, "temps", []) + [(any(p.steps for p in prefixes), sampling.temperature)]
            return super().rollouts(prefixes, n, sampling)

    gen = Recording(MEDIUM, 0.2)
    label_problems(MEDIUM[:4], gen, judge_grader, replace(CFG, method=method, temperature=0.9, rollout_temperature=0.3))
    assert gen.temps[0] == (False, 0.9) and {t for deep, t in gen.temps if deep} == {0.3}
    gen = Recording(MEDIUM, 0.2)
    label_problems(MEDIUM[:4], gen, judge_grader, replace(CFG, method=method, temperature=0.9))
    assert {t for _, t in gen.temps} == {0.9}
    for bad in (3.0, 1e-38):  # 1e-38: logits / T overflow; refused here, not inside an expander actor
        with pytest.raises(ValueError, match="^rollout_temperature: must be null, 0"):
            replace(CFG, rollout_temperature=bad)


@pytest.mark.parametrize("method", ["math_shepherd", "omegaprm"])
@pytest.mark.parametrize("separator", ["\n", "\n\n"])
def test_the_labeller_takes_empty_blank_and_cut_rollouts_without_raising(method, separator):
    """Rollouts whose text is empty, the separator alone, blank steps or a cut end: every
    prefix the labeller asks for can be written (OddPolicy raises otherwise), and every label
    is a prefix of a sampled text."""
    from tests.conftest import OddPolicy

    fmt = StepFormat(separator)
    policy = OddPolicy(fmt)
    problems = [Problem(f"odd-{i}", f"What is {i} + 1?", str(i + 1), "table") for i in range(8)]
    cfg = replace(CFG, method=method, num_solutions=6, rollouts_per_step=3, rollout_budget=40)
    results = label_problems(problems, policy, lambda p, text: "2" in text, cfg)
    assert len(results) == len(problems) and policy.prompts
    labels = [lab for labs, _ in results for lab in labs]
    assert labels, "no problem was labelled"
    for lab in labels:
        assert 0.0 <= lab.score <= 1.0 and lab.n_rollouts >= 1
        assert (*lab.prefix, lab.step) != ("",)  # the one prefix that cannot be written
        fmt.prompt(lab.question, [*lab.prefix, lab.step])
