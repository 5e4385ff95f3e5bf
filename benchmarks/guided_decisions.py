"""Where does guided search lose? Every decision of a guided / guided_retry search, judged by the
arithmetic world's exact step truth (no Ray: the hf generator and the PRM in-process).

(Not a bench_*.py: a diagnosis, not a figure `make bench` tracks.)

    python benchmarks/guided_decisions.py --policy runs/arith/policy --prm runs/arith/prm \\
        [--strategy guided] [--n 8] [--limit 200] [--seed 0] [--tie-break first] [--out FILE.json]

Each decision taken while the chosen prefix is still right falls in one of: `chosen right`;
`policy: no right candidate` (none of the step's candidates is right: the policy's coverage);
`PRM tie` / `PRM misrank` (a right candidate existed, the PRM scored a wrong one as high / higher).
Also greedy's and the search's accuracy and mean generated tokens. `--out` gets the summary and,
per decision, the parent's score, the best candidate's score and whether any / the chosen
candidate was right (the ratios behind guided_retry's `retry_below`), and where a decision was not `chosen right`
the question, the prefix and every candidate with its score.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.data.answers import Judge  # noqa: E402
from mathprm.data.problems import load_problems  # noqa: E402
from mathprm.generation import load_generator  # noqa: E402
from mathprm.scorer import load_scorer  # noqa: E402
from mathprm.search import SearchConfig, run_searches  # noqa: E402
from mathprm.steps import StepFormat  # noqa: E402


class LoggedScorer:
    """The scorer, recording every scored candidate step's score by (question, parent steps)."""

    def __init__(self, scorer) -> None:
        self.scorer, self.log = scorer, collections.defaultdict(dict)

    def score(self, questions, steps_per_question):
        got = self.scorer.score(questions, steps_per_question)
        for q, steps, s in zip(questions, steps_per_question, got):
            self.log[(q, tuple(steps[:-1]))][steps[-1]] = s[-1]
        return got


def classify(problems, results, log) -> tuple[collections.Counter, list[dict]]:
    kinds, rows = collections.Counter(), []
    for p, r in zip(problems, results):
        chosen = [s.text for s in r.steps]
        for k in range(len(chosen)):
            parent = tuple(chosen[:k])
            if arith.first_error(p, list(parent)) != -1:
                break
            scores = log.get((p.question, parent))
            if not scores:
                continue  # a step ended the solution without a new one
            right = {t: s for t, s in scores.items() if arith.first_error(p, [*parent, t]) == -1}
            if not right:
                kind = "policy: no right candidate"
            elif chosen[k] in right:
                kind = "chosen right"
            else:
                kind = "PRM tie" if abs(scores[chosen[k]] - max(right.values())) < 1e-6 else "PRM misrank"
            kinds[kind] += 1
            row = {"step": k, "parent_score": r.steps[k - 1].score if k else None, "best": max(scores.values()),
                   "any_right": bool(right), "chosen_right": chosen[k] in right, "distinct": len(scores), "kind": kind}
            if kind != "chosen right":  # what the PRM saw where it lost: each candidate, its score, right or not
                row["question"] = p.question
                row["prefix"] = list(parent)
                row["candidates"] = [{"text": t, "score": s, "right": t in right}
                                     for t, s in sorted(scores.items(), key=lambda ts: -ts[1])]
            rows.append(row)
    return kinds, rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--prm", required=True)
    ap.add_argument("--strategy", default="guided", choices=["guided", "guided_retry"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=0.85)
    ap.add_argument("--tie-break", default="first")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    problems = load_problems("arith:hard", limit=args.limit, seed=args.seed)
    generator = load_generator("hf", args.policy, StepFormat(arith.STEP_SEPARATOR))
    logged = LoggedScorer(load_scorer("prm", args.prm))
    cfg = SearchConfig(n=args.n, seed=args.seed, temperature=args.temperature, tie_break=args.tie_break)
    started = time.monotonic()
    greedy = run_searches("greedy", generator, None, problems, cfg)
    results = []
    for lo in range(0, len(problems), 25):
        results += run_searches(args.strategy, generator, logged, problems[lo: lo + 25], cfg)
        print(f"[guided_decisions] {len(results)}/{len(problems)} problems", flush=True)

    def accuracy(rs):
        return sum(Judge(p).correct(r.answer) for p, r in zip(problems, rs)) / len(problems)

    kinds, rows = classify(problems, results, logged.log)
    summary = {"strategy": f"{args.strategy}@{args.n}", "problems": len(problems), "seed": args.seed,
               "tie_break": args.tie_break, "greedy": accuracy(greedy), "accuracy": accuracy(results),
               "tokens_per_problem": sum(r.usage.generated_tokens for r in results) / len(results),
               "decisions": dict(kinds), "seconds": round(time.monotonic() - started)}
    print(json.dumps(summary))
    if args.out:
        atomic.write_json(Path(args.out), {**summary, "rows": rows})
    return summary


if __name__ == "__main__":
    main()
