"""`mathprm evaluate`: how often a policy reaches the gold answer, per decoding strategy.

    mathprm evaluate --policy runs/arith/policy --dataset arith:hard --limit 200 --seed 0 \\
        --strategies greedy,majority@16,pass@16 --out runs/eval/policy.json
    mathprm evaluate --policy runs/arith/policy --prm runs/arith/prm --dataset arith:hard --limit 100 \\
        --strategies greedy,majority@8,best_of_n@8,weighted_majority@8,guided@8,beam@8,dvts@8 \\
        --out runs/arith/eval.json --plot runs/arith/accuracy_vs_n.png

Strategies:

- `greedy`: one solution at temperature 0.
- From one pool of sampled solutions per problem (n = the largest k asked for, one temperature
  and seed; `x@4` judges the first 4 of the same samples `x@16` judges):
  - `majority@k`: the most frequent final answer wins (self-consistency, Wang et al. 2023);
    ties go to the answer reached first.
  - `pass@k`: whether any of k samples is right, i.e. the ceiling a perfect verifier could
    reach. With a pool of n >= k samples it is the unbiased estimator of Chen et al. (2021),
    1 - C(n-c, k) / C(n, k), which is exactly "any of the k" when n == k.
  - `best_of_n@k` (PRM): the sample whose step scores aggregate highest (`aggregation`).
  - `weighted_majority@k` (PRM): each answer weighs the sum of its samples' aggregated scores.
- Step by step, by `mathprm.search` (PRM; many problems in lockstep, one batched generator
  call and one PRM call per round): `guided@k` (k candidate next steps, the PRM keeps the
  best), `beam@k` (`beam_width` beams, k candidates each), `dvts@k`, `mcts@k`. See
  `mathprm.search` for each one's definition; the pool strategies are the same definitions
  evaluated on a shared pool.

Each strategy reports `accuracy`, `n_problems`, `samples_per_problem`, `generated_tokens`
(the tokens of the samples it used: the equal-compute axis) and, for PRM strategies,
`prm_scored_solutions`. With two or more values of k for one strategy, a PNG of accuracy
versus k per strategy is written beside the JSON (`plot`).

Diagnostics say how the policy fails: `parseable` (a final answer can be read),
`finished` (the model ended the solution itself) and, in the arithmetic world where
`arith.check_step` judges every line exactly, `step_accuracy` (steps correct given the
steps before them as written) and `first_error` (where wrong solutions go wrong).

The core (strategy parsing, voting, pass@k, scoring from per-problem records) is pure;
`run_evaluation` wires it to a `Generator` (and a `Scorer` for PRM strategies), in this
process or, with `use_ray`, on a Ray Data actor pool (one generator and PRM per actor), and
writes the JSON (and one JSON line per problem) atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathprm import atomic
from mathprm.data import arith
from mathprm.data.answers import Judge
from mathprm.data.problems import Problem, load_problems, token_caps
from mathprm.generation import GENERATORS, Prefix, Rollout, Sampling, load_generator
from mathprm.models import check_model_dir
from mathprm.prompts import DEFAULT_SYSTEM
from mathprm.scorer import (
    AGGREGATIONS,
    ArithOracle,
    PRMRef,
    aggregate,
    build_scorer,
    check_oracle,
    parse_prm,
    trained_separator,
)
from mathprm.search import STRATEGIES, parse_strategy, release, run_searches
from mathprm.stats import pass_at_k
from mathprm.steps import StepFormat, content, step_format_for


@dataclasses.dataclass
class EvalConfig:
    policy: str = "runs/arith/policy"  # any Hugging Face causal-LM directory
    dataset: str = "arith:hard"  # a name load_problems knows: arith:*, gsm8k, math500, math_hard, ...
    limit: int | None = 200  # first N problems (arith: N fresh test-split problems)
    seed: int = 0  # arith problem seed and sampling seed
    strategies: list[str] = dataclasses.field(default_factory=lambda: ["greedy", "majority@16", "pass@16"])
    prm: str | None = None  # none | oracle (arith: exact step truth, the upper bound) | DIR | KIND:DIR
    #                          (mathprm.scorer.parse_prm); needed by best_of_n, weighted_majority, guided, beam, ...
    temperature: float = 1.0  # of the sampled strategies
    top_p: float = 1.0
    # A longer solution is cut (and counts as unparseable if no answer yet); a longer step of a
    # step-by-step strategy is cut. None: the dataset's (mathprm.data.problems.token_caps:
    # arith 64 / 384, GSM8K 256 / 1024, MATH-length 512 / 2048).
    max_solution_tokens: int | None = None
    max_step_tokens: int | None = None
    aggregation: str = "min"  # PRM step scores -> solution score: last | min | prod | mean
    beam_width: int = 4  # beam: beams kept; dvts: candidates per step of each subtree
    max_steps: int = 24  # step-by-step strategies stop a solution after this many steps
    simulations: int = 16  # mcts: rounds per problem
    tie_break: str = "first"  # guided, beam, dvts: equally scored candidates -> first (sampled) | mode (most)
    retry_below: float = 0.9  # guided_retry: resample a step whose candidates all score below this x the parent's
    max_retries: int = 2  # guided_retry: resamplings of one step at most
    separator: str | None = None  # step separator; None: "\n" for arith:*, "\n\n" otherwise
    backend: str = "hf"  # a key of mathprm.generation.GENERATORS
    # the system message of a chat prompt when the policy's tokenizer has a chat template (mathprm.prompts)
    system_prompt: str | None = DEFAULT_SYSTEM
    batch_problems: int = 16  # problems per generator call (each brings its samples)
    # KV caches of shared prefixes (mathprm.models.prefix), in tokens; 0: off. The PRM's: a search
    # round's candidates share their prefix, computed once, and the next round starts from it. The
    # policy's (hf backend; vLLM caches prefixes itself): a prompt starts from the longest kept one.
    prm_prefix_cache_tokens: int = 0
    policy_prefix_cache_tokens: int = 0
    device: str | None = None  # hf backend and PRM; None: cuda if available
    out: str | None = None  # JSON path; None: runs/eval/<policy dir name>__<dataset>__seed<seed>.json
    plot: str | None = None  # accuracy-vs-k PNG; None: beside `out` as <out stem>.accuracy_vs_n.png
    use_ray: bool = False  # run the problems on a Ray Data actor pool (jobs/evaluate.py sets it)
    num_actors: int = 2  # use_ray: actors, each with its own generator and PRM
    ray_address: str | None = None  # use_ray: None joins RAY_ADDRESS or starts a local cluster

    def __post_init__(self) -> None:
        steps, solutions = token_caps(self.dataset)
        self.max_step_tokens = steps if self.max_step_tokens is None else self.max_step_tokens
        self.max_solution_tokens = solutions if self.max_solution_tokens is None else self.max_solution_tokens
        if not self.strategies:
            raise ValueError("strategies: give at least one, e.g. greedy,majority@16,pass@16")
        parsed = [eval_strategy(s) for s in self.strategies]  # ValueError names the bad one
        needing = [s.name for s in parsed if s.needs_prm]
        if needing and self.prm_ref.kind == "none":
            raise ValueError(f"prm: {', '.join(needing)} need a PRM; give one, e.g. --prm runs/arith/prm")
        check_oracle(self.prm_ref, self.dataset)
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.backend not in GENERATORS:
            raise ValueError(f"backend: unknown {self.backend!r}; backends: {', '.join(GENERATORS)}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation: unknown {self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        for name in ("batch_problems", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("prm_prefix_cache_tokens", "policy_prefix_cache_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0: off), got {getattr(self, name)}")
        if self.policy_prefix_cache_tokens and self.backend != "hf":
            raise ValueError(f"policy_prefix_cache_tokens: only the hf backend keeps one ({self.backend} caches "
                             "prefixes itself); set it to 0")
        self.search_config(1)  # SearchConfig's checks (beam_width, max_steps, simulations, token limits)

    def search_config(self, k: int):
        from mathprm.search import SearchConfig

        return SearchConfig(n=k, beam_width=self.beam_width, max_steps=self.max_steps, temperature=self.temperature,
                            top_p=self.top_p, max_step_tokens=self.max_step_tokens,
                            max_solution_tokens=self.max_solution_tokens, aggregation=self.aggregation,
                            simulations=self.simulations, tie_break=self.tie_break,
                            retry_below=self.retry_below, max_retries=self.max_retries, seed=self.seed)

    @property
    def prm_ref(self) -> PRMRef:
        return parse_prm(self.prm)

    @property
    def step_format(self) -> StepFormat:
        return step_format_for(self.dataset, self.separator, trained_separator(self.prm_ref))

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.dataset)
        return Path("runs/eval") / f"{Path(self.policy).name}__{safe}__seed{self.seed}.json"

    @property
    def plot_path(self) -> Path:
        return Path(self.plot) if self.plot else self.out_path.with_suffix(".accuracy_vs_n.png")


# ----------------------------------------------------------------------------- pure core


@dataclasses.dataclass(frozen=True)
class EvalStrategy:
    kind: str  # a key of mathprm.search.STRATEGIES
    k: int  # samples (or candidates per step) per problem

    @property
    def name(self) -> str:
        return self.kind if STRATEGIES[self.kind].spends == "one" else f"{self.kind}@{self.k}"

    @property
    def spends(self) -> str:
        return STRATEGIES[self.kind].spends

    @property
    def needs_prm(self) -> bool:
        return STRATEGIES[self.kind].needs_prm


def eval_strategy(text: str) -> EvalStrategy:
    """`greedy` or `KIND@K` (K >= 1, KIND in STRATEGIES, pass included); ValueError naming
    `strategies` otherwise."""
    try:
        kind, k = parse_strategy(text, allowed=tuple(STRATEGIES))
    except ValueError as e:
        raise ValueError(f"strategies: {e}") from None
    if k is None and STRATEGIES[kind].spends != "one":
        raise ValueError(f"strategies: {text!r} needs @K (K >= 1), e.g. {kind}@8")
    return EvalStrategy(kind, k or 1)


def step_stats(problem: Problem, steps: Sequence[str]) -> tuple[int, int, int]:
    """(steps judged, steps correct given the steps before them, index of the first wrong step or -1)."""
    steps = content(steps)
    ok = [arith.check_step(problem, steps[:i], s) for i, s in enumerate(steps)]
    return len(ok), sum(ok), next((i for i, good in enumerate(ok) if not good), -1)


def judge_rollout(judge: Judge, rollout: Rollout) -> dict[str, Any]:
    key = judge.key(rollout.text)
    out = {"text": rollout.text, "key": key, "correct": judge.correct(key), "tokens": rollout.n_tokens,
           "finished": rollout.finished}
    if judge.arith:
        out["steps"], out["steps_ok"], out["first_error"] = step_stats(judge.problem, rollout.steps)
    return out


def _solution_score(sample: dict[str, Any], how: str) -> float:
    scores = sample.get("scores")
    return aggregate(scores, how) if scores else -math.inf


def _pool_pick(used: Sequence[dict[str, Any]], kind: str, how: str) -> bool:
    """Whether the pool strategy `kind` picks a right answer from the samples `used` (its
    `STRATEGIES` pick, as the search applies it)."""
    i, answer = STRATEGIES[kind].pick([s["key"] for s in used], [_solution_score(s, how) for s in used])
    return answer is not None and bool(used[i]["correct"])


def score(records: Sequence[dict[str, Any]], strategies: Sequence[EvalStrategy], aggregation: str = "min") -> dict:
    """Per strategy: accuracy, n_problems, samples_per_problem, generated_tokens (and
    prm_scored_solutions for PRM strategies), from the per-problem records."""
    out: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        hits, tokens, scored = 0.0, 0, 0
        for r in records:
            if strategy.kind == "greedy":
                hits += r["greedy"]["correct"]
                tokens += r["greedy"]["tokens"]
            elif strategy.spends == "search":
                s = r["search"][strategy.name]
                hits += s["correct"]
                tokens += s["tokens"]
                scored += s["scored_solutions"]
            else:
                used = r["samples"][: strategy.k]
                tokens += sum(s["tokens"] for s in used)
                if strategy.kind == "pass":
                    hits += pass_at_k(len(r["samples"]), sum(s["correct"] for s in r["samples"]), strategy.k)
                else:
                    hits += _pool_pick(used, strategy.kind, aggregation)
                    scored += sum(1 for s in used if s.get("scores")) if strategy.needs_prm else 0
        n = len(records)
        out[strategy.name] = {"accuracy": hits / n if n else 0.0, "n_problems": n,
                              "samples_per_problem": strategy.k, "generated_tokens": tokens}
        if strategy.needs_prm:
            out[strategy.name]["prm_scored_solutions"] = scored
    return out


def diagnostics(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """How the greedy and the sampled solutions fail (see the module docstring)."""
    out = {}
    for name, rows in (("greedy", [r["greedy"] for r in records if r.get("greedy")]),
                       ("sampled", [s for r in records for s in r.get("samples", [])])):
        if not rows:
            continue
        d: dict[str, Any] = {
            "solutions": len(rows),
            "parseable": sum(s["key"] is not None for s in rows) / len(rows),
            "finished": sum(s["finished"] for s in rows) / len(rows),
            "mean_tokens": sum(s["tokens"] for s in rows) / len(rows),
        }
        if "steps" in rows[0]:
            steps = sum(s["steps"] for s in rows)
            d["step_accuracy"] = sum(s["steps_ok"] for s in rows) / steps if steps else 0.0
            wrong = [s["first_error"] for s in rows if s["first_error"] >= 0]
            d["solutions_with_a_wrong_step"] = len(wrong) / len(rows)
            d["first_error_histogram"] = {str(i): wrong.count(i) for i in sorted(set(wrong))}
        out[name] = d
    return out


def format_evaluation(report: dict[str, Any]) -> str:
    prm = f"  prm={report['prm']}" if report.get("prm") else ""
    lines = [f"{report['dataset']}  policy={report['policy']}{prm}  ({report['n_problems']} problems, "
             f"T={report['sampling']['temperature']}, {report['backend']}"
             + (f", {report['skipped_too_long']} skipped: too long for the context" if report.get("skipped_too_long")
                else "") + ")",
             f"{'strategy':<22}{'accuracy':>10}{'k':>5}{'tokens':>12}{'PRM-scored':>12}"]
    for name, s in report["strategies"].items():
        prm_col = f"{s['prm_scored_solutions']:>12,}" if "prm_scored_solutions" in s else f"{'-':>12}"
        lines.append(f"{name:<22}{s['accuracy']:>10.1%}{s['samples_per_problem']:>5}{s['generated_tokens']:>12,}"
                     f"{prm_col}")
    for name, d in report["diagnostics"].items():
        extra = f", step accuracy {d['step_accuracy']:.1%}" if "step_accuracy" in d else ""
        lines.append(f"{name} solutions: {d['parseable']:.1%} parseable, {d['finished']:.1%} finished{extra}")
    return "\n".join(lines)


def plot_accuracy_vs_n(report: dict[str, Any], path: str | Path) -> Path | None:
    """A PNG of accuracy against k, one line per strategy with two or more values of k (greedy
    as a dashed line); None (and no file) when no strategy has two values of k."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, s in report["strategies"].items():
        if name != "greedy":
            series.setdefault(name.split("@")[0], []).append((s["samples_per_problem"], s["accuracy"]))
    series = {kind: sorted(points) for kind, points in series.items() if len(points) >= 2}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for kind, points in series.items():
        style = ":" if kind == "pass" else "-"
        ax.plot([k for k, _ in points], [100 * a for _, a in points], style, marker="o", label=kind)
    if "greedy" in report["strategies"]:
        ax.axhline(100 * report["strategies"]["greedy"]["accuracy"], color="grey", ls="--", label="greedy")
    ax.set_xscale("log", base=2)
    ks = sorted({k for points in series.values() for k, _ in points})
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("N (samples, or candidates per step)")
    ax.set_ylabel("accuracy (%)")
    prm = f", PRM {Path(report['prm']).name}" if report.get("prm") else ""
    ax.set_title(f"{report['dataset']}: {report['n_problems']} problems, policy {Path(report['policy']).name}{prm}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic.file(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return Path(path)


# ----------------------------------------------------------------------------- shell


def evaluate_chunk(problems: Sequence[Problem], generator: Any, scorer: Any, cfg: EvalConfig,
                   strategies: Sequence[EvalStrategy], chunk_index: int) -> list[dict[str, Any]]:
    """Every strategy on one chunk of problems: one record (a JSON-able dict) per problem. A
    problem whose prompt leaves less than `max_step_tokens` of the policy's context is skipped
    (its record says `skipped_too_long`, one line each) and the rest are evaluated."""
    skipped = []
    fitting = []
    for p in problems:
        room = generator.room(Prefix(p.question))
        if room < cfg.max_step_tokens:
            context = generator.context_length
            print(f"[evaluate] skipped {p.id}: its prompt leaves {max(room, 0)} of the policy's {context} tokens of "
                  f"context, less than max_step_tokens {cfg.max_step_tokens}", flush=True)
            skipped.append({"id": p.id, "gold": p.answer, "skipped_too_long": context - room})
        else:
            fitting.append(p)
    if skipped:
        return skipped + (evaluate_chunk(fitting, generator, scorer, cfg, strategies, chunk_index) if fitting else [])
    judges = [Judge(p) for p in problems]
    records: list[dict[str, Any]] = [{"id": p.id, "gold": p.answer, "greedy": None, "samples": [], "search": {}}
                                     for p in problems]
    prefixes = [Prefix(p.question) for p in problems]
    if any(s.kind == "greedy" for s in strategies):
        greedy = Sampling(temperature=0.0, max_solution_tokens=cfg.max_solution_tokens, seed=cfg.seed)
        for r, j, (roll,) in zip(records, judges, generator.rollouts(prefixes, 1, greedy)):
            r["greedy"] = judge_rollout(j, roll)
    pool = max((s.k for s in strategies if s.spends == "pool"), default=0)
    if pool:
        # A generator seeds prefix i of a call from (seed, i): give each chunk its own seed,
        # or problem 0 of every chunk would draw the same random stream.
        sampling = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_solution_tokens=cfg.max_solution_tokens,
                            seed=cfg.seed * 1_000_003 + chunk_index)
        for r, j, rolls in zip(records, judges, generator.rollouts(prefixes, pool, sampling)):
            r["samples"] = [judge_rollout(j, roll) | {"_steps": content(roll.steps)} for roll in rolls]
        if any(s.needs_prm for s in strategies if s.spends == "pool"):
            todo = [(p, s) for p, r in zip(problems, records) for s in r["samples"] if s["_steps"]]
            got = scorer.score([p.question for p, _ in todo], [s["_steps"] for _, s in todo]) if todo else []
            for (_, s), scores in zip(todo, got):
                s["scores"] = [round(float(x), 6) for x in scores]
        for r in records:
            for s in r["samples"]:
                del s["_steps"]
    for strategy in strategies:
        if strategy.spends != "search":
            continue
        started = time.monotonic()
        results = run_searches(strategy.kind, generator, scorer, problems, cfg.search_config(strategy.k))
        print(f"[evaluate] chunk {chunk_index}: {strategy.name} on {len(problems)} problems, "
              f"{time.monotonic() - started:.0f}s", flush=True)
        for r, j, res in zip(records, judges, results):
            r["search"][strategy.name] = {
                "key": res.answer, "correct": j.correct(res.answer), "finished": res.finished,
                "steps": [s.text for s in res.steps], "scores": [s.score for s in res.steps],
                "tokens": res.usage.generated_tokens, "scored_solutions": res.usage.scored_solutions,
                "prm_calls": res.usage.prm_calls,
            }
    release(generator, scorer, [p.question for p in problems])  # the greedy and pool prompts' prefixes
    return records


def _problems(cfg: EvalConfig) -> list[Problem]:
    if cfg.dataset.startswith("arith:"):
        return load_problems(cfg.dataset, limit=cfg.limit, seed=cfg.seed)
    return load_problems(cfg.dataset, limit=cfg.limit)


def _generator(cfg: EvalConfig) -> Any:
    options: dict[str, Any] = {"device": cfg.device} if cfg.backend == "hf" and cfg.device else {}
    options["system_prompt"] = cfg.system_prompt
    if cfg.policy_prefix_cache_tokens:
        options["prefix_cache_tokens"] = cfg.policy_prefix_cache_tokens
    return load_generator(cfg.backend, cfg.policy, cfg.step_format, **options)


def _scorer(cfg: EvalConfig, problems: Sequence[Problem]) -> Any:
    options: dict[str, Any] = {"device": cfg.device} if cfg.device else {}
    if cfg.prm_prefix_cache_tokens:
        options["prefix_cache_tokens"] = cfg.prm_prefix_cache_tokens
    return build_scorer(cfg.prm_ref, lambda: ArithOracle(problems), **options)


def _cache_stats(cfg: EvalConfig, generator: Any, scorer: Any) -> dict[str, Any]:
    """The prefix caches' counters (`cache_stats()`) of the caches this run turned on."""
    out = {}
    if cfg.policy_prefix_cache_tokens:
        out["policy"] = generator.cache_stats()
    if cfg.prm_prefix_cache_tokens and cfg.prm_ref.kind not in ("none", "oracle"):
        out["prm"] = scorer.cache_stats()
    return out


_CACHE_COUNTERS = ("hits", "misses", "tokens_reused", "evicted", "released", "tokens_computed", "tokens_full")


def _cache_delta(now: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What each cache's counters added since `before` (both `_cache_stats`), with its holdings now."""
    return {model: stats | {k: stats[k] - before.get(model, {}).get(k, 0) for k in _CACHE_COUNTERS}
            for model, stats in now.items()}


def _sum_caches(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The prefix-cache report of an actor-pool run: the chunks' counters added up; the holdings
    (entries, held tokens and bytes) the largest one actor had at the end of a chunk."""
    out: dict[str, Any] = {}
    for part in parts:
        for model, stats in part.items():
            total = out.setdefault(model, dict.fromkeys(stats, 0))
            for k, v in stats.items():
                total[k] = total[k] + v if k in _CACHE_COUNTERS else max(total[k], v)
    return out


class _Worker:
    """Ray Data callable class: one generator and one PRM per actor, a chunk of problems per call.
    The prefix caches' counters of a chunk ride in its first record (`_prefix_cache`), which
    `run_evaluation` takes out and adds up."""

    def __init__(self, cfg: EvalConfig, problems: list[Problem]) -> None:
        self.cfg, self.generator, self.scorer = cfg, _generator(cfg), _scorer(cfg, problems)
        self.strategies = [eval_strategy(s) for s in dict.fromkeys(cfg.strategies)]
        self.by_id = {p.id: p for p in problems}
        self.caches: dict[str, Any] = {}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        chunk = [self.by_id[str(i)] for i in batch["id"]]
        records = evaluate_chunk(chunk, self.generator, self.scorer, self.cfg, self.strategies,
                                 int(batch["chunk"][0]))
        caches = _cache_stats(self.cfg, self.generator, self.scorer)
        if caches and records:
            records[0]["_prefix_cache"] = _cache_delta(caches, self.caches)
        self.caches = caches
        return {"record": [json.dumps(r) for r in records]}


def run_evaluation(cfg: EvalConfig, generator: Any | None = None, problems: list[Problem] | None = None,
                   scorer: Any | None = None) -> dict:
    """Evaluate `cfg.policy` (or a ready `generator`, and `scorer` for PRM strategies) and write
    `cfg.out_path` (+ one JSON line per problem, + the accuracy-vs-k PNG) atomically."""
    strategies = [eval_strategy(s) for s in dict.fromkeys(cfg.strategies)]
    if problems is None:
        problems = _problems(cfg)
    if not problems:
        raise ValueError(f"dataset {cfg.dataset!r} gave no problems")
    if scorer is None:
        cfg.step_format  # reads the PRM's config: fails now, naming the directory, not inside an actor
    if generator is None:
        check_model_dir(cfg.policy, "policy")  # here, not in each actor
    chunks = [problems[lo: lo + cfg.batch_problems] for lo in range(0, len(problems), cfg.batch_problems)]
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    caches: dict[str, Any] = {}  # in-process runs: the prefix caches' counters
    if cfg.use_ray and generator is None:
        from mathprm.data.ray_data import records_on_actor_pool
        from mathprm.ray_utils import check_job_paths, init_ray

        check_job_paths(policy=cfg.policy, prm=cfg.prm_ref.path, out=str(cfg.out_path), plot=str(cfg.plot_path))
        # Actors run in another working directory: ship absolute model paths.
        cfg = dataclasses.replace(cfg, policy=str(Path(cfg.policy).resolve()),
                                  prm=str(cfg.prm_ref.resolved()) if cfg.prm_ref.path else cfg.prm)
        init_ray(cfg.ray_address)
        records = records_on_actor_pool(_Worker, (cfg, problems), chunks, cfg.num_actors, progress="evaluate")
        caches = _sum_caches([r.pop("_prefix_cache") for r in records if "_prefix_cache" in r])
    else:
        generator = generator or _generator(cfg)
        scorer = scorer if scorer is not None else _scorer(cfg, problems)
        for c, chunk in enumerate(chunks):
            records += evaluate_chunk(chunk, generator, scorer, cfg, strategies, c)
            elapsed = time.monotonic() - started
            print(f"[evaluate] {len(records)}/{len(problems)} problems, {elapsed:.0f}s, "
                  f"eta {elapsed / len(records) * (len(problems) - len(records)):.0f}s", flush=True)
        caches = _cache_stats(cfg, generator, scorer)

    pool = max((s.k for s in strategies if s.spends == "pool"), default=0)
    skipped = [r["id"] for r in records if "skipped_too_long" in r]
    records_scored = [r for r in records if "skipped_too_long" not in r]
    report = {
        "policy": str(cfg.policy),
        "prm": cfg.prm,
        "dataset": cfg.dataset,
        "n_problems": len(records_scored),
        # prompts that leave no room for a step in the policy's context (keys present only when some did)
        **({"skipped_too_long": len(skipped), "skipped": skipped} if skipped else {}),
        "seed": cfg.seed,
        "backend": cfg.backend,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_solution_tokens": cfg.max_solution_tokens, "pool": pool},
        "search": {"aggregation": cfg.aggregation, "beam_width": cfg.beam_width, "max_steps": cfg.max_steps,
                   "simulations": cfg.simulations, "max_step_tokens": cfg.max_step_tokens},
        "strategies": score(records_scored, strategies, cfg.aggregation),
        "diagnostics": diagnostics(records_scored),
        **({"prefix_cache": caches} if caches else {}),
        "elapsed_s": round(time.monotonic() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    plot = plot_accuracy_vs_n(report, cfg.plot_path)
    report["plot"] = str(plot) if plot else None
    atomic.write_text(out.with_suffix(".problems.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    atomic.write_json(out, report)
    return report
