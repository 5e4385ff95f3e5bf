"""`mathprm evaluate-prm`: how good a PRM is, on solutions its policy samples for fresh problems.

    mathprm evaluate-prm --prm runs/arith/prm --policy runs/arith/policy --dataset arith:hard \\
        --limit 200 --seed 0 --out runs/arith/prm_eval.json

For each problem the policy samples `n` solutions; the scorer scores every step. Reported:

- `step_auroc`: AUROC of the step scores against the exact truth "every step so far is
  right" (`arith.step_labels`, ProcessBench's first-error label), over all sampled steps;
- `first_error_f1`: the ProcessBench metric on the same solutions: the predicted earliest
  error is the first step scored below `threshold` (or -1; by default the threshold the PRM's
  training picked on its labels, `mathprm.scorer.default_threshold`), compared with `arith.first_error`;
  F1 of the accuracies on erroneous and on correct solutions (in percent);
- `best_of_n@n`: accuracy when the solution with the highest aggregated score is kept
  (`aggregation`: last / min / prod / mean; all four are in `best_of_n_by_aggregation`),
  beside `majority@n` (self-consistency over the same samples) and `pass@n` (the ceiling).

Step truth exists only in the arithmetic world; on real math (gsm8k, math500) the step
metrics are None and best-of-n / majority are still measured. `prm: oracle` swaps the PRM
for the exact checker: the upper bound every PRM figure should be read against.

The core (`sample_and_score` for a batch of problems, `summarise` for the metrics) is plain
Python; `run_prm_evaluation` runs it in-process, or with `use_ray: true` as a Ray Data
`map_batches` over problems with an actor pool, each actor holding one generator and one
scorer (`jobs/eval_prm.py`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mathprm import atomic
from mathprm import scorer as scoring
from mathprm.data import arith
from mathprm.data.answers import Judge
from mathprm.data.problems import Problem, load_problems, token_caps
from mathprm.generation import GENERATORS, Prefix, Sampling, load_generator
from mathprm.models import check_model_dir
from mathprm.prompts import DEFAULT_SYSTEM
from mathprm.search import STRATEGIES
from mathprm.stats import auroc, pass_at_k
from mathprm.steps import step_format_for


@dataclasses.dataclass
class PRMEvalConfig:
    prm: str = "runs/arith/prm"  # DIR | KIND:DIR | oracle (arith: the exact checker), see mathprm.scorer.parse_prm
    policy: str = "runs/arith/policy"  # the HF causal-LM that samples the solutions
    dataset: str = "arith:hard"  # arith:* (fresh test-split problems), gsm8k, math500, ...
    limit: int | None = 200
    seed: int = 0  # problem seed (arith) and sampling seed
    n: int = 8  # solutions sampled per problem
    temperature: float = 0.85
    top_p: float = 1.0
    max_solution_tokens: int | None = None  # None: the dataset's (mathprm.data.problems.token_caps: arith 64/384, MATH 512/2048)
    aggregation: str = "min"  # step scores -> solution score for best_of_n
    threshold: float | None = None  # a step scored below it is the predicted first error; None: the PRM's
    #                                   own (picked on its validation labels, mathprm.scorer.default_threshold)
    separator: str | None = None  # None: the dataset's ("\n" for arith:*)
    backend: str = "hf"  # generator backend, a key of mathprm.generation.GENERATORS
    # the system message of a chat prompt when the policy's tokenizer has a chat template (mathprm.prompts)
    system_prompt: str | None = DEFAULT_SYSTEM
    batch_problems: int = 16  # problems per generator / scorer call
    device: str | None = None  # hf generator and PRM; None: cuda if available
    use_ray: bool = False  # run batches as a Ray Data actor pool (jobs/eval_prm.py sets it)
    num_actors: int = 2  # with use_ray
    ray_address: str | None = None
    out: str = "runs/arith/prm_eval.json"

    @property
    def prm_ref(self) -> scoring.PRMRef:
        return scoring.parse_prm(self.prm)

    def __post_init__(self) -> None:
        if self.max_solution_tokens is None:
            self.max_solution_tokens = token_caps(self.dataset)[1]
        if self.prm_ref.kind == "none":
            raise ValueError("prm: evaluate-prm needs a PRM: a directory, KIND:DIR or oracle")
        scoring.check_oracle(self.prm_ref, self.dataset)
        if self.aggregation not in scoring.AGGREGATIONS:
            raise ValueError(f"aggregation: unknown {self.aggregation!r}; choose one of {', '.join(scoring.AGGREGATIONS)}")
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold: must be in [0, 1], got {self.threshold}")
        for name in ("n", "batch_problems", "num_actors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.backend not in GENERATORS:
            raise ValueError(f"backend: unknown {self.backend!r}; backends: {', '.join(GENERATORS)}")
        self.sampling  # noqa: B018 - Sampling validates temperature, top_p, max_solution_tokens

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=self.temperature, top_p=self.top_p,
                        max_solution_tokens=self.max_solution_tokens, seed=self.seed)


# ----------------------------------------------------------------------------- core


def sample_and_score(problems: Sequence[Problem], generator: Any, scorer: Any, cfg: PRMEvalConfig,
                     batch_index: int) -> list[dict[str, Any]]:
    """For each problem: its `n` sampled solutions, each with steps, step scores, answer key,
    correctness and (arith) the true first error. `batch_index` seeds the call, so batch b of
    a run samples the same solutions however the batches are distributed."""
    sampling = dataclasses.replace(cfg.sampling, seed=cfg.seed * 1_000_003 + batch_index)
    rollouts = generator.rollouts([Prefix(p.question) for p in problems], cfg.n, sampling)
    flat = [(p, [s for s in r.steps if s.strip()], r) for p, rs in zip(problems, rollouts) for r in rs]
    scored = [(p, steps, r) for p, steps, r in flat if steps]
    scores = iter(scorer.score([p.question for p, _, _ in scored], [steps for _, steps, _ in scored]))
    out = []
    for p, rs in zip(problems, rollouts):
        judge, solutions = Judge(p), []
        for r in rs:
            steps = [s for s in r.steps if s.strip()]
            key = judge.key(r.text)
            solutions.append({
                "steps": steps, "scores": next(scores) if steps else [], "key": key, "correct": judge.correct(key),
                "tokens": r.n_tokens,
                "first_error": arith.first_error(p, steps) if judge.arith else None,
            })
        out.append({"id": p.id, "gold": p.answer, "solutions": solutions})
    return out


def summarise(records: Sequence[dict[str, Any]], n: int, aggregation: str, threshold: float) -> dict[str, Any]:
    """The metrics of the module docstring from `sample_and_score` records."""
    from mathprm.eval.processbench import predicted_first_error, processbench_f1

    step_scores, step_truth, labels, predicted = [], [], [], []
    hits = {"majority": 0.0, "pass": 0.0, **{f"best_of_n:{a}": 0.0 for a in scoring.AGGREGATIONS}}
    for rec in records:
        sols = rec["solutions"]
        for s in sols:
            if s["first_error"] is None or not s["steps"]:
                continue
            first = s["first_error"]
            step_truth += [first == -1 or i < first for i in range(len(s["steps"]))]
            step_scores += s["scores"]
            labels.append(first)
            predicted.append(predicted_first_error(s["scores"], threshold))
        keys = [s["key"] for s in sols]
        i, voted = STRATEGIES["majority"].pick(keys, [])
        hits["majority"] += voted is not None and sols[i]["correct"]
        hits["pass"] += pass_at_k(len(sols), sum(s["correct"] for s in sols), len(sols))
        for a in scoring.AGGREGATIONS:
            totals = [scoring.aggregate(s["scores"], a) if s["steps"] else -math.inf for s in sols]
            if any(s["steps"] for s in sols):
                hits[f"best_of_n:{a}"] += sols[STRATEGIES["best_of_n"].pick(keys, totals)[0]]["correct"]
    m = max(len(records), 1)
    f1 = processbench_f1(labels, predicted) if labels else None
    has_both = 0 < sum(step_truth) < len(step_truth)
    return {
        "step_auroc": round(auroc(step_scores, step_truth), 4) if has_both else None,
        "first_error_f1": None if f1 is None or f1["f1"] is None else round(f1["f1"], 2),
        f"best_of_n@{n}": round(hits[f"best_of_n:{aggregation}"] / m, 4),
        f"majority@{n}": round(hits["majority"] / m, 4),
        f"pass@{n}": round(hits["pass"] / m, 4),
        "best_of_n_by_aggregation": {a: round(hits[f"best_of_n:{a}"] / m, 4) for a in scoring.AGGREGATIONS},
        "processbench": f1,
        "n_problems": len(records),
        "n_solutions": sum(len(r["solutions"]) for r in records),
        "n_steps": len(step_scores),
        "wrong_steps": len(step_truth) - sum(step_truth),
    }


# ----------------------------------------------------------------------------- shells


def _problems(cfg: PRMEvalConfig) -> list[Problem]:
    if cfg.dataset.startswith("arith:"):
        return load_problems(cfg.dataset, limit=cfg.limit, seed=cfg.seed)
    return load_problems(cfg.dataset, limit=cfg.limit)


def _scorer(cfg: PRMEvalConfig, problems: Sequence[Problem]) -> Any:
    options = {"device": cfg.device} if cfg.device else {}
    return scoring.build_scorer(cfg.prm_ref, lambda: scoring.ArithOracle(problems), **options)


def _generator(cfg: PRMEvalConfig) -> Any:
    options = {"device": cfg.device} if cfg.backend == "hf" and cfg.device else {}
    options["system_prompt"] = cfg.system_prompt
    fmt = step_format_for(cfg.dataset, cfg.separator, scoring.trained_separator(cfg.prm_ref))
    return load_generator(cfg.backend, cfg.policy, fmt, **options)


class _Worker:
    """Ray Data callable class: one generator and one scorer per actor."""

    def __init__(self, cfg: PRMEvalConfig, problems: list[Problem]) -> None:
        self.cfg, self.generator = cfg, _generator(cfg)
        self.scorer = _scorer(cfg, problems)
        self.by_id = {p.id: p for p in problems}

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        import json

        ids = [str(i) for i in batch["id"]]
        records = sample_and_score([self.by_id[i] for i in ids], self.generator, self.scorer, self.cfg,
                                   int(batch["chunk"][0]))
        return {"record": [json.dumps(r) for r in records]}


def run_prm_evaluation(cfg: PRMEvalConfig, generator: Any | None = None, scorer: Any | None = None) -> dict:
    """Sample, score and summarise; writes `cfg.out` (and one JSON line per problem) atomically."""
    import json

    if scorer is None:
        scoring.trained_separator(cfg.prm_ref)  # reads the PRM's config: fails now, not inside an actor
    if generator is None:
        check_model_dir(cfg.policy, "policy")  # here, not in each actor
    problems = _problems(cfg)
    if not problems:
        raise ValueError(f"dataset: {cfg.dataset!r} gave no problems")
    started = time.monotonic()
    chunks = [problems[lo : lo + cfg.batch_problems] for lo in range(0, len(problems), cfg.batch_problems)]
    records: list[dict[str, Any]] = []
    if cfg.use_ray:
        from mathprm.data.ray_data import records_on_actor_pool
        from mathprm.ray_utils import init_ray

        # Actors run in another working directory: ship absolute model paths.
        cfg = dataclasses.replace(cfg, policy=str(Path(cfg.policy).resolve()),
                                  prm=str(cfg.prm_ref.resolved()))
        init_ray(cfg.ray_address)
        records = records_on_actor_pool(_Worker, (cfg, problems), chunks, cfg.num_actors, progress="evaluate-prm")
    else:
        generator = generator or _generator(cfg)
        scorer = scorer or _scorer(cfg, problems)
        for b, chunk in enumerate(chunks):
            records += sample_and_score(chunk, generator, scorer, cfg, b)
            elapsed = time.monotonic() - started
            print(f"[evaluate-prm] {len(records)}/{len(problems)} problems, {elapsed:.0f}s, "
                  f"eta {elapsed / len(records) * (len(problems) - len(records)):.0f}s", flush=True)
    if cfg.threshold is not None:
        threshold = cfg.threshold
    else:
        threshold = scoring.default_threshold(cfg.prm_ref)
    report = {"prm": cfg.prm, "policy": cfg.policy, "dataset": cfg.dataset,
              "seed": cfg.seed, "n": cfg.n, "temperature": cfg.temperature, "aggregation": cfg.aggregation,
              "threshold": threshold, **summarise(records, cfg.n, cfg.aggregation, threshold),
              "elapsed_s": round(time.monotonic() - started, 1), "date": time.strftime("%Y-%m-%d")}
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, report)
    atomic.write_text(out.with_suffix(".problems.jsonl"), "".join(json.dumps(r) + "\n" for r in records))
    return report


def format_report(report: dict[str, Any]) -> str:
    n = report["n"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.1%}"

    return "\n".join([
        f"{report['dataset']}  prm={report['prm']}  policy={report['policy']}  ({report['n_problems']} problems, "
        f"{report['n_solutions']} solutions, T={report['temperature']})",
        f"step AUROC {report['step_auroc']}   first-error F1 {report['first_error_f1']}   "
        f"({report['n_steps']} steps, {report['wrong_steps']} wrong)",
        f"best_of_n@{n} ({report['aggregation']}) {pct(report[f'best_of_n@{n}'])}   majority@{n} "
        f"{pct(report[f'majority@{n}'])}   pass@{n} {pct(report[f'pass@{n}'])}",
    ])
