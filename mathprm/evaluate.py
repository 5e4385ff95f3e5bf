"""`mathprm evaluate`: how often a policy reaches the gold answer, per decoding strategy.

    mathprm evaluate --policy runs/arith/policy --dataset arith:hard --limit 200 --seed 0 \\
        --strategies greedy,majority@16,pass@16 --out runs/eval/policy.json

Strategies (later stages add PRM-guided ones to `STRATEGIES`):

- `greedy`: one solution at temperature 0.
- `majority@k`: k sampled solutions, the most frequent final answer wins (self-consistency,
  Wang et al. 2023); ties go to the answer reached first.
- `pass@k`: whether any of k samples is right, i.e. the ceiling a perfect verifier could
  reach. With a pool of n >= k samples it is the unbiased estimator of Chen et al. (2021),
  1 - C(n-c, k) / C(n, k), which is exactly "any of the k" when n == k.

All sampled strategies draw from one pool per problem (n = the largest k asked for, at one
temperature and seed), so `majority@16` and `pass@16` judge the same 16 samples, and
`majority@4` the first 4 of them. Each strategy reports `accuracy`, `n_problems`,
`samples_per_problem` and `generated_tokens` (the tokens of the samples it uses).

Diagnostics say how the policy fails: `parseable` (a final answer can be read),
`finished` (the model ended the solution itself) and, in the arithmetic world where
`arith.check_step` judges every line exactly, `step_accuracy` (steps correct given the
steps before them as written) and `first_error` (where wrong solutions go wrong).

The core (strategy parsing, voting, pass@k, scoring) is pure; `run_evaluation` wires it to a
`Generator` backend and writes the JSON (and one JSON line per problem) atomically.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathprm import arith, atomic
from mathprm.answers import Judge, majority_vote  # noqa: F401  (re-exported)
from mathprm.generation import GENERATORS, Prefix, Rollout, Sampling, load_generator
from mathprm.problems import Problem, load_problems
from mathprm.steps import StepFormat

STRATEGIES = ("greedy", "majority", "pass")  # greedy, majority@k, pass@k


@dataclasses.dataclass
class EvalConfig:
    policy: str = "runs/arith/policy"  # any Hugging Face causal-LM directory
    dataset: str = "arith:hard"  # a name load_problems knows: arith:*, gsm8k, math500, math_hard, ...
    limit: int | None = 200  # first N problems (arith: N fresh test-split problems)
    seed: int = 0  # arith problem seed and sampling seed
    strategies: list[str] = dataclasses.field(default_factory=lambda: ["greedy", "majority@16", "pass@16"])
    temperature: float = 1.0  # of the sampled strategies
    top_p: float = 1.0
    max_solution_tokens: int = 384  # a longer solution is cut (and counts as unparseable if no answer yet)
    separator: str | None = None  # step separator; None: "\n" for arith:*, "\n\n" otherwise
    backend: str = "hf"  # a key of mathprm.generation.GENERATORS
    batch_problems: int = 16  # problems per generator call (each brings its samples)
    device: str | None = None  # hf backend only; None: cuda if available
    out: str | None = None  # JSON path; None: runs/eval/<policy dir name>__<dataset>__seed<seed>.json

    def __post_init__(self) -> None:
        for s in self.strategies:
            parse_strategy(s)  # ValueError names the bad one
        if not self.strategies:
            raise ValueError("strategies: give at least one, e.g. greedy,majority@16,pass@16")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.backend not in GENERATORS:
            raise ValueError(f"backend: unknown {self.backend!r}; backends: {', '.join(GENERATORS)}")
        if self.batch_problems < 1:
            raise ValueError(f"batch_problems: must be >= 1, got {self.batch_problems}")
        Sampling(temperature=self.temperature, top_p=self.top_p, max_solution_tokens=self.max_solution_tokens,
                 seed=self.seed)  # its own checks, named by field

    @property
    def step_format(self) -> StepFormat:
        return step_format_for(self.dataset, self.separator)

    @property
    def out_path(self) -> Path:
        if self.out:
            return Path(self.out)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.dataset)
        return Path("runs/eval") / f"{Path(self.policy).name}__{safe}__seed{self.seed}.json"


def step_format_for(dataset: str, separator: str | None) -> StepFormat:
    """`separator`, or the dataset's own: one line per step in the arithmetic world, a blank line
    between steps on real math."""
    if separator is not None:
        return StepFormat(separator)
    return StepFormat(arith.STEP_SEPARATOR if dataset.startswith("arith:") else "\n\n")


# ----------------------------------------------------------------------------- pure core


@dataclasses.dataclass(frozen=True)
class Strategy:
    kind: str  # one of STRATEGIES
    k: int  # samples per problem

    @property
    def name(self) -> str:
        return "greedy" if self.kind == "greedy" else f"{self.kind}@{self.k}"


def parse_strategy(text: str) -> Strategy:
    """`greedy`, `majority@K` or `pass@K` (K >= 1); ValueError naming the text otherwise."""
    if text == "greedy":
        return Strategy("greedy", 1)
    kind, at, k = str(text).partition("@")
    if kind in STRATEGIES and kind != "greedy" and at and k.isdigit() and int(k) >= 1:
        return Strategy(kind, int(k))
    raise ValueError(f"strategies: {text!r} is not greedy, majority@K or pass@K (K >= 1)")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chance that at least one of k samples drawn without replacement from n (c correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def step_stats(problem: Problem, steps: Sequence[str]) -> tuple[int, int, int]:
    """(steps judged, steps correct given the steps before them, index of the first wrong step or -1)."""
    steps = [s for s in steps if s.strip()]
    ok = [arith.check_step(problem, steps[:i], s) for i, s in enumerate(steps)]
    return len(ok), sum(ok), next((i for i, good in enumerate(ok) if not good), -1)


@dataclasses.dataclass
class ProblemResult:
    """One problem's solutions, reduced to what the strategies and diagnostics need."""

    id: str
    gold: str | None
    greedy: dict[str, Any] | None = None  # {"text", "key", "correct", "tokens", "finished"}
    samples: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the same, per sample


def judge_rollout(judge: Judge, rollout: Rollout) -> dict[str, Any]:
    key = judge.key(rollout.text)
    out = {"text": rollout.text, "key": key, "correct": judge.correct(key), "tokens": rollout.n_tokens,
           "finished": rollout.finished}
    if judge.arith:
        out["steps"], out["steps_ok"], out["first_error"] = step_stats(judge.problem, rollout.steps)
    return out


def score(results: Sequence[ProblemResult], strategies: Sequence[Strategy], judges: Sequence[Judge]) -> dict:
    """Per strategy: accuracy, n_problems, samples_per_problem, generated_tokens."""
    out: dict[str, dict[str, Any]] = {}
    for strategy in strategies:
        hits, tokens = 0.0, 0
        for r, judge in zip(results, judges, strict=True):
            if strategy.kind == "greedy":
                hits += r.greedy["correct"]
                tokens += r.greedy["tokens"]
                continue
            used = r.samples[: strategy.k]
            tokens += sum(s["tokens"] for s in used)
            if strategy.kind == "majority":
                hits += judge.correct(majority_vote([s["key"] for s in used]))
            else:
                hits += pass_at_k(len(r.samples), sum(s["correct"] for s in r.samples), strategy.k)
        n = len(results)
        out[strategy.name] = {"accuracy": hits / n if n else 0.0, "n_problems": n,
                              "samples_per_problem": strategy.k, "generated_tokens": tokens}
    return out


def diagnostics(results: Sequence[ProblemResult]) -> dict[str, dict[str, Any]]:
    """How the greedy and the sampled solutions fail (see the module docstring)."""
    out = {}
    for name, rows in (("greedy", [r.greedy for r in results if r.greedy]),
                       ("sampled", [s for r in results for s in r.samples])):
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


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{report['dataset']}  policy={report['policy']}  ({report['n_problems']} problems, "
             f"T={report['sampling']['temperature']}, {report['backend']})",
             f"{'strategy':<14}{'accuracy':>10}{'samples':>9}{'tokens':>12}"]
    for name, s in report["strategies"].items():
        lines.append(f"{name:<14}{s['accuracy']:>10.1%}{s['samples_per_problem']:>9}{s['generated_tokens']:>12,}")
    for name, d in report["diagnostics"].items():
        extra = f", step accuracy {d['step_accuracy']:.1%}" if "step_accuracy" in d else ""
        lines.append(f"{name} solutions: {d['parseable']:.1%} parseable, {d['finished']:.1%} finished{extra}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- shell


def run_evaluation(cfg: EvalConfig, generator: Any | None = None, problems: list[Problem] | None = None) -> dict:
    """Evaluate `cfg.policy` (or a ready `generator`) and write `cfg.out_path` atomically."""
    strategies = [parse_strategy(s) for s in dict.fromkeys(cfg.strategies)]
    if problems is None:
        problems = load_problems(cfg.dataset, limit=cfg.limit, seed=cfg.seed) if cfg.dataset.startswith(
            "arith:") else load_problems(cfg.dataset, limit=cfg.limit)
    if not problems:
        raise ValueError(f"dataset {cfg.dataset!r} gave no problems")
    if generator is None:
        if not (Path(cfg.policy) / "config.json").is_file():
            raise FileNotFoundError(f"policy {cfg.policy!r} is not a Hugging Face model directory (no config.json)")
        options = {"device": cfg.device} if cfg.backend == "hf" and cfg.device else {}
        generator = load_generator(cfg.backend, cfg.policy, cfg.step_format, **options)
    pool = max((s.k for s in strategies if s.kind != "greedy"), default=0)
    greedy = Sampling(temperature=0.0, max_solution_tokens=cfg.max_solution_tokens, seed=cfg.seed)
    sampled = Sampling(temperature=cfg.temperature, top_p=cfg.top_p, max_solution_tokens=cfg.max_solution_tokens,
                       seed=cfg.seed)

    judges = [Judge(p) for p in problems]
    results = [ProblemResult(p.id, p.answer) for p in problems]
    started = time.monotonic()
    for lo in range(0, len(problems), cfg.batch_problems):
        chunk = slice(lo, lo + cfg.batch_problems)
        prefixes = [Prefix(p.question) for p in problems[chunk]]
        if any(s.kind == "greedy" for s in strategies):
            for r, j, (roll,) in zip(results[chunk], judges[chunk], generator.rollouts(prefixes, 1, greedy)):
                r.greedy = judge_rollout(j, roll)
        if pool:
            # A generator seeds prefix i of a call from (seed, i): give each chunk its own seed,
            # or problem 0 of every chunk would draw the same random stream.
            chunk_sampling = dataclasses.replace(sampled, seed=cfg.seed * 1_000_003 + lo)
            for r, j, rolls in zip(results[chunk], judges[chunk], generator.rollouts(prefixes, pool, chunk_sampling)):
                r.samples = [judge_rollout(j, roll) for roll in rolls]
        done = min(lo + cfg.batch_problems, len(problems))
        elapsed = time.monotonic() - started
        print(f"[evaluate] {done}/{len(problems)} problems, {elapsed:.0f}s, "
              f"eta {elapsed / done * (len(problems) - done):.0f}s", flush=True)

    report = {
        "policy": str(cfg.policy),
        "dataset": cfg.dataset,
        "n_problems": len(problems),
        "seed": cfg.seed,
        "backend": cfg.backend,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p,
                     "max_solution_tokens": cfg.max_solution_tokens, "pool": pool},
        "strategies": score(results, strategies, judges),
        "diagnostics": diagnostics(results),
        "elapsed_s": round(time.monotonic() - started, 1),
        "date": time.strftime("%Y-%m-%d"),
    }
    out = cfg.out_path
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, report)
    import json

    lines = (json.dumps({"id": r.id, "gold": r.gold, "greedy": r.greedy, "samples": r.samples}) for r in results)
    atomic.write_text(out.with_suffix(".problems.jsonl"), "\n".join(lines) + "\n")
    return report
