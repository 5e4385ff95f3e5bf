"""Prefix reuse in the PRM scorers (mathprm.models.prefix): search-like calls score the same with the
cache as with today's full pass per solution, compute fewer tokens, and hold at most the bound."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mathprm.models import prefix
from mathprm.models.prefix import PrefixCache, shared_groups
from mathprm.models.prm import PRMExample, PRMScorer, build_prm, collate, encode_solution, save_prm, step_logits
from mathprm.scorer import load_scorer
from mathprm.steps import StepFormat

KINDS = ["qwen", "math_shepherd", "rlhflow", "skywork"]
# Two searches in one call (the lockstep driver or Serve's batch merges them): N candidates that
# share (question, steps so far), of different lengths, some sharing the start of their last step.
SEARCH_A = ("Start with 12, add 5, multiply by 2, subtract 4.", ["12 + 5 = 17", "17 * 2 = 34"],
            ["34 - 4 = 30", "34 - 4 = 31", "The answer is 30", "34 - 4 = 30, so we have 30 left over"])
SEARCH_B = ("What is 2+3?", ["2 + 3 = 5"], ["The answer is 5", "5 + 0 = 5", "The answer is 6"])
ALONE = ("What is 1+1?", ["1 + 1 = 2"])  # a group of one
# Round 2 of both searches: the prefix is round 1's chosen solution.
NEXT_A = ["The answer is 30", "30 + 0 = 30", "So the answer is 30, which is even"]
NEXT_B = ["The answer is 5", "So 5"]


def _round(search, chosen=None, after=None):
    question, steps, candidates = search
    if chosen is not None:
        steps, candidates = steps + [candidates[chosen]], after
    return [question] * len(candidates), [steps + [c] for c in candidates]


def _calls(extra_step: str | None = None) -> list[tuple[list[str], list[list[str]]]]:
    """Search-like calls: round 1 of two searches with a group of one and an empty solution;
    a call where nothing is shared; round 2 of both searches. `extra_step`: a candidate more for
    search A (a step of two lines, for the published kinds)."""
    a = SEARCH_A if extra_step is None else (SEARCH_A[0], SEARCH_A[1], SEARCH_A[2] + [extra_step])
    qa, sa = _round(a)
    qb, sb = _round(SEARCH_B)
    first = (qa + qb + [ALONE[0], "Is 4 even?"], sa + sb + [ALONE[1], []])
    nothing_shared = (["What is 7-2?", "Is 9 odd?", "Halve 10."], [["7 - 2 = 5"], ["9 = 2 * 4 + 1"], ["10 / 2 = 5"]])
    qa2, sa2 = _round(a, 0, NEXT_A)
    qb2, sb2 = _round(SEARCH_B, 1, NEXT_B)
    return [first, nothing_shared, (qa2 + qb2, sa2 + sb2)]


def _close(got, want, tol=1e-4):
    assert [len(s) for s in got] == [len(s) for s in want]
    worst = max((abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)), default=0.0)
    assert worst < tol, (worst, got, want)


# ----------------------------------------------------------------------------- the pure parts


def test_groups_are_runs_of_the_sorted_ids_that_save_the_most_tokens():
    encodings = [[9, 9], [1, 2, 3, 4, 6], [1, 2, 3, 7], [1, 2, 3, 4, 5]]
    # Sorted: 12345, 12346, 1237, 99. {12345, 12346} would share 3 tokens once (3 saved); with 1237
    # as well, 2 tokens twice (4 saved). 99 alone keeps all but its last token.
    assert shared_groups(encodings) == [(2, [3, 1, 2]), (1, [0])]
    # A member that is the whole common prefix still keeps a token of its own.
    assert shared_groups([[1, 2, 3], [1, 2, 3, 4]]) == [(2, [0, 1])]
    assert shared_groups([[5, 6], [7, 8]]) == [(1, [0]), (1, [1])]


def _kv(tokens: int, fill: float) -> list:
    """A fake cached KV: one model, two layers of (1, 2 heads, tokens, 4)."""
    t = torch.full((1, 2, tokens, 4), fill)
    return [[(t, t.clone()), (t.clone(), t.clone())]]


def test_the_cache_reuses_any_common_prefix_drops_what_another_entry_extends_and_evicts_the_oldest():
    cache = PrefixCache(max_tokens=10)
    cache.put([1, 2, 3, 4], _kv(3, 1.0), torch.zeros(3, 1))
    assert cache.find([1, 2, 3, 4, 5], limit=4)[0] == 3  # all 3 positions, their next token 4 matching
    assert cache.find([1, 2, 3, 9], limit=3)[0] == 2  # positions 0, 1: position 2 read token 4, not 9
    assert cache.find([1, 2, 3, 4, 5], limit=1)[0] == 1  # never past the group's prefix
    assert cache.find([7, 8], limit=1) == (0, None)
    assert (cache.counts["hits"], cache.counts["misses"], cache.counts["tokens_reused"]) == (3, 1, 6)
    cache.put([1, 2, 3, 4, 5, 6], _kv(5, 2.0), torch.zeros(5, 1))  # extends the first: it replaces it
    cache.put([1, 2, 3], _kv(2, 3.0), torch.zeros(2, 1))  # held already, inside the second
    assert cache.stats()["entries"] == 1 and cache.held_tokens == 5
    cache.put([7, 8, 9, 1], _kv(3, 4.0), torch.zeros(3, 1))
    cache.find([1, 2, 3, 4, 5, 6, 7], limit=6)  # the older entry is used, so the newer is evicted next
    cache.put([5, 5, 5], _kv(2, 5.0), torch.zeros(2, 1))  # 5 + 3 + 2 = 10: no eviction yet
    assert cache.held_tokens == 10 and cache.counts["evicted"] == 0
    cache.put([6, 6], _kv(1, 6.0), torch.zeros(1, 1))
    assert cache.counts["evicted"] == 1 and cache.find([7, 8, 9, 1], limit=3) == (0, None)
    cache.put(list(range(20)), _kv(19, 7.0), torch.zeros(19, 1))  # alone over the bound: not kept
    stats = cache.stats()
    assert stats["held_tokens"] == 8 and stats["entries"] == 3
    per_token = 2 * 2 * 2 * 4 * 4 + 4  # layers x (k, v) x heads x head_dim x 4 bytes, and a float value
    assert stats["held_bytes"] == 8 * per_token
    with pytest.raises(ValueError, match="prefix_cache_tokens"):
        PrefixCache(-1)


def test_release_frees_what_only_the_ended_searches_own():
    cache = PrefixCache(max_tokens=100)
    cache.put([1, 2, 3, 4], _kv(3, 1.0), torch.zeros(3, 1), {"a"})
    cache.put([1, 2, 3, 4, 5, 6], _kv(5, 1.0), torch.zeros(5, 1), {"a"})  # a's next round: replaces it
    cache.put([1, 2, 3], _kv(2, 1.0), torch.zeros(2, 1), {"b"})  # b asks the same question: shares it
    cache.put([7, 8, 9], _kv(2, 1.0), torch.zeros(2, 1), {"c"})
    cache.put([5, 5, 5], _kv(2, 1.0), torch.zeros(2, 1))  # untagged
    assert cache.stats()["entries"] == 3
    cache.release(["a"])  # b still owns the first entry
    assert cache.stats()["entries"] == 3 and cache.find([1, 2, 3, 4, 5, 6, 7], limit=6)[0] == 5
    cache.release(["b", "c", "never seen"])
    stats = cache.stats()
    assert (stats["entries"], stats["held_tokens"], stats["released"]) == (1, 2, 2)  # the untagged one stays
    cache.clear()
    assert cache.stats()["entries"] == 0
    # Two searches on one question: the first to end leaves the entries to the other.
    cache.acquire(["q", "q"])
    cache.put([4, 4, 4], _kv(2, 1.0), torch.zeros(2, 1), {"q"})
    cache.release(["q"])
    assert cache.stats()["entries"] == 1
    cache.release(["q"])
    assert cache.stats()["entries"] == 0


# ----------------------------------------------------------------------------- the mathprm PRM


def _save_prm(base, tokenizer, fmt, path, hidden_head=True, **meta):
    """An untrained PRM whose head reads every feature (an untrained one reads only the prefix
    minimum and scores ~1e-6, where any tolerance passes)."""
    model = build_prm(base, hidden_head=hidden_head)
    with torch.no_grad():
        model.feature_weights.weight.copy_(torch.tensor([[0.4, 0.3, 0.2]]))
        model.score.bias.fill_(1.5)
    save_prm(model, tokenizer, fmt, path, {"base": str(base), **meta})
    return path


@pytest.fixture(scope="module")
def prm_dirs(tiny_policy_dir, qwen_policy_dir, tmp_path_factory):
    """The PRM on the char-tokenised tiny policy, its calibrated prior (one model, no hidden
    head), and a PRM on the BPE chat policy (chat prompts, "\\n\\n" steps)."""
    from transformers import AutoTokenizer

    tiny_tok = AutoTokenizer.from_pretrained(tiny_policy_dir)
    return {"char": _save_prm(tiny_policy_dir, tiny_tok, StepFormat("\n"), tmp_path_factory.mktemp("prm-char")),
            "prior": _save_prm(tiny_policy_dir, tiny_tok, StepFormat("\n"), tmp_path_factory.mktemp("prm-prior"),
                               hidden_head=False),
            "bpe": _save_prm(qwen_policy_dir, AutoTokenizer.from_pretrained(qwen_policy_dir), StepFormat("\n\n"),
                             tmp_path_factory.mktemp("prm-bpe"), chat=True)}


@pytest.mark.parametrize("which", ["char", "prior", "bpe"])
def test_the_prm_scores_search_rounds_as_the_full_pass_does_with_fewer_tokens(prm_dirs, which):
    full = PRMScorer(prm_dirs[which], device="cpu", batch_size=3)
    cached = PRMScorer(prm_dirs[which], device="cpu", batch_size=3, prefix_cache_tokens=4096)
    computed = []
    for questions, steps in _calls():
        before = cached.cache_stats()
        _close(cached.score(questions, steps), full.score(questions, steps))
        after = cached.cache_stats()
        computed.append((after["tokens_computed"] - before["tokens_computed"],
                         after["tokens_full"] - before["tokens_full"]))
    (first, first_full), (alone, alone_full), (second, second_full) = computed
    assert first < 0.6 * first_full  # N candidates share their prefix within the call
    assert alone <= alone_full  # different questions: at most their prompt's opening is shared
    assert second < 0.35 * second_full  # and the next round starts from the cached prefix
    stats = cached.cache_stats()
    assert stats["hits"] >= 2 and stats["tokens_reused"] > 0 and 0 < stats["held_tokens"] <= 4096
    assert full.cache_stats()["tokens_computed"] == full.cache_stats()["tokens_full"] == sum(
        f for _, f in computed)


def test_a_cache_of_0_is_today_s_full_pass(prm_dirs, monkeypatch):
    scorer = PRMScorer(prm_dirs["char"], device="cpu", batch_size=16)
    monkeypatch.setattr("mathprm.models.prm.run_shared", lambda *a, **k: pytest.fail("the cache ran"))
    questions, steps = _calls()[0]
    got = scorer.score(questions, steps)
    # Today's path by hand: every solution in one batch (16 hold them all), shortest first.
    rows = sorted(((i, *encode_solution(scorer.prompter, q, s), len(scorer.prompter.ids(q)))
                   for i, (q, s) in enumerate(zip(questions, steps)) if s), key=lambda row: len(row[1]))
    batch = collate([PRMExample(ids, pos, [0.0] * len(pos), steps_from=n) for _, ids, pos, n in rows], scorer.pad_id)
    with torch.inference_mode():
        probs = torch.sigmoid(step_logits(scorer.model, batch).float())
    assert all(got[i] == probs[r, pos].tolist() for r, (i, _, pos, _) in enumerate(rows))
    assert scorer.cache_stats()["entries"] == 0


def test_a_solution_longer_than_the_context_takes_the_windowed_full_pass(prm_dirs):
    full = PRMScorer(prm_dirs["char"], device="cpu")
    cached = PRMScorer(prm_dirs["char"], device="cpu", prefix_cache_tokens=4096)
    full.max_length = cached.max_length = 90  # A's round-1 solutions are ~80-100 tokens
    questions, steps = _calls()[0]
    _close(cached.score(questions, steps), full.score(questions, steps))


def test_a_long_search_holds_at_most_the_bound(prm_dirs):
    """Two searches, 16 rounds each of a growing solution (past the bound): the held tokens and
    bytes never pass the bound, old prefixes are evicted, and the scores stay those of the full
    pass."""
    bound = 150
    cached = PRMScorer(prm_dirs["char"], device="cpu", batch_size=8, prefix_cache_tokens=bound)
    full = PRMScorer(prm_dirs["char"], device="cpu", batch_size=8)
    chosen = {"What is 2+3?": [], "Count up from 1.": []}
    per_token = None
    for r in range(16):
        questions, steps = [], []
        for question, so_far in chosen.items():
            candidates = [f"{r} + 1 = {r + 1}", f"{r} + 1 = {r + 2}", f"so {r + 1}"]
            questions += [question] * len(candidates)
            steps += [so_far + [c] for c in candidates]
        got = cached.score(questions, steps)
        if r % 8 == 7:
            _close(got, full.score(questions, steps))
        stats = cached.cache_stats()
        per_token = per_token or stats["held_bytes"] / stats["held_tokens"]
        assert stats["held_tokens"] <= bound and stats["held_bytes"] <= bound * per_token
        for question in chosen:
            chosen[question] = chosen[question] + [f"{r} + 1 = {r + 1}"]
    stats = cached.cache_stats()
    assert stats["evicted"] > 0 and stats["hits"] > 10
    assert stats["tokens_computed"] < 0.5 * stats["tokens_full"]


# ----------------------------------------------------------------------------- the published kinds


@pytest.mark.parametrize("kind", KINDS)
def test_published_kinds_score_search_rounds_as_the_full_pass_does_with_fewer_tokens(published_prms, kind):
    full = load_scorer(kind, str(published_prms[kind]), device="cpu", batch_size=3)
    cached = load_scorer(kind, str(published_prms[kind]), device="cpu", batch_size=3, prefix_cache_tokens=4096)
    for questions, steps in _calls(extra_step="Then 34 - 4 = 30.\nThe answer is 30"):
        got, want = cached.score(questions, steps), full.score(questions, steps)
        _close(got, want)
        flat = [x for s in want for x in s]
        assert max(flat) - min(flat) > 0.01  # scores differ by step, so a misplaced read would show
    stats, plain = cached.cache_stats(), full.cache_stats()
    assert stats["tokens_full"] == plain["tokens_full"] == plain["tokens_computed"]
    assert stats["tokens_computed"] < 0.6 * stats["tokens_full"] and stats["hits"] >= 1


@pytest.mark.parametrize("kind", KINDS)
def test_published_kinds_with_a_cache_of_0_never_run_the_cache(published_prms, kind, monkeypatch):
    scorer = load_scorer(kind, str(published_prms[kind]), device="cpu")
    monkeypatch.setattr("mathprm.models.published.run_shared", lambda *a, **k: pytest.fail("the cache ran"))
    questions, steps = _calls()[0]
    assert [len(s) for s in scorer.score(questions, steps)] == [len(s) for s in steps]
    assert prefix.PrefixCache(0).stats()["entries"] == scorer.cache_stats()["entries"] == 0


# ----------------------------------------------------------------------------- in a search stage


def test_an_evaluation_with_both_caches_searches_as_one_without_and_reports_them(tiny_policy_dir, prm_dirs,
                                                                                 tmp_path):
    """`mathprm evaluate` with the policy's and the PRM's prefix caches on: the same per-problem
    records (steps, scores, answers) as with them off, and the caches' counters in the report,
    fewer tokens computed than full passes would."""
    from mathprm.eval.evaluate import EvalConfig, run_evaluation

    def run(name: str, tokens: int) -> tuple[dict, list[dict]]:
        cfg = EvalConfig(policy=str(tiny_policy_dir), prm=str(prm_dirs["char"]), dataset="arith:easy", limit=3,
                         strategies=["guided@3", "beam@2"], temperature=0.8, max_steps=4, max_step_tokens=16,
                         device="cpu", out=str(tmp_path / f"{name}.json"), prm_prefix_cache_tokens=tokens,
                         policy_prefix_cache_tokens=tokens)
        report = run_evaluation(cfg)
        lines = (tmp_path / f"{name}.problems.jsonl").read_text().splitlines()
        return report, [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in lines]

    (off, off_rows), (on, on_rows) = run("off", 0), run("on", 4096)
    assert on["strategies"] == off["strategies"] and "prefix_cache" not in off
    assert len(on_rows) == len(off_rows) == 3
    for a, b in zip(on_rows, off_rows):
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or _close_records(a, b)
    for which in ("policy", "prm"):
        stats = on["prefix_cache"][which]
        assert stats["hits"] > 0 and stats["tokens_computed"] < stats["tokens_full"], (which, stats)
        assert stats["entries"] == 0 and stats["released"] > 0, (which, stats)  # every search ended
    with pytest.raises(ValueError, match="policy_prefix_cache_tokens"):
        EvalConfig(policy=str(tiny_policy_dir), backend="vllm", policy_prefix_cache_tokens=64)


def _close_records(a: dict, b: dict) -> bool:
    """Equal but for float rounding of PRM scores (a prefix pass and a full pass add in different
    orders): the same keys, texts and answers, numbers within 1e-5."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close_records(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close_records(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < 1e-5
    return a == b


def test_a_search_s_prefixes_are_freed_when_it_ends(tiny_policy_dir, prm_dirs):
    """The drivers release a search's entries in the PRM's and the hf policy's caches when it
    ends: held while the searches run, nothing left after, the other search's kept meanwhile."""
    from mathprm.data.problems import Problem
    from mathprm.generation import load_generator
    from mathprm.search import SearchConfig, run_search, run_searches

    scorer = PRMScorer(prm_dirs["char"], device="cpu", prefix_cache_tokens=4096)
    gen = load_generator("hf", str(tiny_policy_dir), scorer.step_format, device="cpu", prefix_cache_tokens=4096)
    problems = [Problem("p1", "What is 2+3?", "5", "arith:x"), Problem("p2", "Start with 12, add 5.", "17", "arith:x")]
    cfg = SearchConfig(n=3, temperature=0.8, max_steps=3, max_step_tokens=12, seed=0)
    held = []
    run_search("guided", gen, scorer, problems[0], cfg,
               on_step=lambda _: held.append((scorer.cache_stats()["entries"], gen.cache_stats()["entries"])))
    assert held and all(p > 0 and g > 0 for p, g in held), held
    for stats in (scorer.cache_stats(), gen.cache_stats()):
        assert stats["entries"] == stats["held_tokens"] == 0 and stats["released"] > 0 and stats["hits"] > 0, stats
    # Lockstep, one search ending first (the memorised solutions have 2 and 3 steps): its entries
    # go, the other's stay until it ends.
    from tests.conftest import MEMORISED

    memorised = [Problem(f"m{i}", q, steps[-1].rsplit(" ", 1)[1], "arith:x") for i, (q, steps) in
                 enumerate(MEMORISED.items())]
    seen = []

    class Watch:
        def score(self, questions, steps):
            seen.append((set(questions), scorer.cache_stats()["entries"]))
            return scorer.score(questions, steps)

        def acquire(self, questions):
            scorer.acquire(questions)

        def release(self, questions):
            scorer.release(questions)

    results = run_searches("guided", gen, Watch(), memorised, dataclasses.replace(cfg, temperature=0.0, max_steps=6,
                                                                          max_step_tokens=24))
    assert [len(r.steps) for r in results] == [2, 3]
    assert seen[-1] == ({memorised[1].question}, 1)  # round 3: only the longer search, its prefix kept
    assert scorer.cache_stats()["entries"] == gen.cache_stats()["entries"] == 0
    # Two searches on the same question, one with fewer steps allowed: when it ends, the other's
    # prefix stays (the next round reuses it), and nothing after both.
    from mathprm.search import acquire, release

    seen.clear()
    acquire(gen, Watch(), [memorised[1].question])  # another request on the question, still running
    run_search("guided", gen, Watch(), memorised[1], dataclasses.replace(cfg, temperature=0.0, max_steps=2,
                                                                           max_step_tokens=24))
    assert scorer.cache_stats()["entries"] == 1 and gen.cache_stats()["entries"] >= 1
    release(gen, Watch(), [memorised[1].question])
    assert scorer.cache_stats()["entries"] == gen.cache_stats()["entries"] == 0


def test_an_actor_pool_evaluation_adds_up_its_chunks_cache_counters(tiny_policy_dir, prm_dirs, tmp_path):
    """The Ray Data path's actors (`_Worker`, called here in-process) send each chunk's counters
    in its first record; `_sum_caches` adds up what two actors sent."""
    from mathprm.data.problems import load_problems
    from mathprm.eval.evaluate import EvalConfig, _sum_caches, _Worker

    cfg = EvalConfig(policy=str(tiny_policy_dir), prm=str(prm_dirs["char"]), dataset="arith:easy", limit=4,
                     strategies=["guided@2"], max_steps=3, max_step_tokens=12, device="cpu",
                     out=str(tmp_path / "e.json"), prm_prefix_cache_tokens=2048, policy_prefix_cache_tokens=2048)
    problems = load_problems("arith:easy", limit=4, seed=cfg.seed)
    worker = _Worker(cfg, problems)
    parts = []
    for c, chunk in enumerate((problems[:2], problems[2:])):
        got = worker({"id": [p.id for p in chunk], "chunk": [c, c]})["record"]
        records = [json.loads(r) for r in got]
        assert "_prefix_cache" in records[0] and all("_prefix_cache" not in r for r in records[1:])
        parts.append(records[0]["_prefix_cache"])
    whole = worker.generator.cache_stats(), worker.scorer.cache_stats()
    total = _sum_caches(parts + parts)  # two actors that did the same
    for which, stats in zip(("policy", "prm"), whole):
        assert parts[0][which]["tokens_full"] + parts[1][which]["tokens_full"] == stats["tokens_full"] > 0
        assert total[which]["tokens_full"] == 2 * stats["tokens_full"]
        assert total[which]["hits"] == 2 * stats["hits"] and total[which]["max_tokens"] == 2048
