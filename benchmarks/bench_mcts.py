"""Step labels by tree search on the arithmetic world: label quality vs rollout budget, and speed.

    .venv/bin/python benchmarks/bench_mcts.py [--policy runs/arith/policy] [--problems 20] \
        [--budgets 4,8,16,32] [--reuse both] [--backend hf] [--write]

Quality: for each budget K (rollouts per scored state), Math-Shepherd with K rollouts per
step, then OmegaPRM with K rollouts per probe and a per-problem rollout budget equal to what
Math-Shepherd spent per problem at that K (equal rollouts). Both label the same arith:hard
training-split problems with the same generator; AUROC of `score` against the exact truth
(`mcts.label_quality`), and how often a truly right state got score 0. `--reuse both` runs
each search with and without reused rollouts (`reuse_rollouts`): the same generated
completions for Math-Shepherd, so the difference is the counting alone.

Speed, in the same run with the same generator: raw sampling tokens/s (root prefixes x 8
samples, the shape of a search's first call), then rollout tokens/s, rollouts/s and labelled
steps/s of each search (problems searched in lockstep, as one expander actor does).

With --write the tables replace the "## Tree-search labels" section of docs/BENCHMARKS.md and
the plot goes to docs/img/mcts_auroc.png. Needs a trained policy (`make demo`).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import repo_relative, rollout_speed, write_section  # noqa: E402

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.data.answers import judge_grader  # noqa: E402
from mathprm.generation import Prefix, load_generator  # noqa: E402
from mathprm.labels.stage import label_quality  # noqa: E402
from mathprm.labels.treesearch import TreeSearchConfig, label_problems  # noqa: E402
from mathprm.steps import StepFormat  # noqa: E402

SECTION = "Tree-search labels"
PLOT = REPO / "docs" / "img" / "mcts_auroc.png"


def raw_speed(gen, problems, cfg: TreeSearchConfig, repeats: int = 3) -> dict:
    """Tokens/s of plain sampling: every problem's root prefix x num_solutions in one call; the
    best of `repeats` calls after a warm-up (the raw side of the ratio is not flattered)."""
    return rollout_speed(gen, [Prefix(p.question) for p in problems], cfg.num_solutions, cfg.sampling(7), repeats)


def search(gen, problems, cfg: TreeSearchConfig) -> dict:
    t0 = time.perf_counter()
    results = label_problems(problems, gen, judge_grader, cfg)
    dt = time.perf_counter() - t0
    labels = [lab for labs, _ in results for lab in labs]
    rollouts = sum(s.n_rollouts for _, s in results)
    tokens = sum(s.n_tokens for _, s in results)
    row = {"method": cfg.method, "k": cfg.rollouts_per_step, "reuse": cfg.reuse_rollouts, "labels": len(labels),
           "rollouts": rollouts,
           "rollouts_per_problem": round(rollouts / len(problems), 1), "tokens": tokens, "seconds": round(dt, 1),
           "steps_labelled_per_s": round(len(labels) / dt, 2), "rollouts_per_s": round(rollouts / dt, 1),
           "tokens_per_s": round(tokens / dt, 1), **label_quality(problems, labels)}
    print(f"{cfg.method:13} K={cfg.rollouts_per_step:<3} reuse={cfg.reuse_rollouts!s:5} {len(labels):5} labels  "
          f"AUROC {row['auroc']}  "
          f"reachable {row['auroc_reachable']}  local {row['auroc_local']}  right->0 {row['right_states_scored_0']}  "
          f"unreachable>0 {row['unreachable_states_scored_above_0']}  {rollouts} rollouts "
          f"{dt:.0f}s  {row['tokens_per_s']:,.0f} tok/s", flush=True)
    return row


def run(policy: str, backend: str, n_problems: int, budgets: list[int], num_solutions: int,
        temperature: float, rollout_temperature: float | None, reuses: list[bool]) -> dict:
    problems = arith.generate("hard", n_problems, seed=0, split="train")
    options = {"batch_prefixes": 64} if backend == "hf" else {"run_dir": str(REPO / "runs" / "vllm")}
    gen = load_generator(backend, policy, StepFormat(arith.STEP_SEPARATOR), **options)
    base = TreeSearchConfig(num_solutions=num_solutions, temperature=temperature, max_solution_tokens=384,
                            rollout_budget=10_000, rollout_temperature=rollout_temperature)
    raw = raw_speed(gen, problems, base)
    print(f"raw sampling: {raw['tokens_per_s']:,.0f} tok/s", flush=True)
    rows = []
    for k in budgets:
        for reuse in reuses:
            ms = search(gen, problems, dataclasses.replace(base, method="math_shepherd", rollouts_per_step=k,
                                                           reuse_rollouts=reuse))
            budget = max(num_solutions, round(ms["rollouts_per_problem"]))
            om = search(gen, problems, dataclasses.replace(base, method="omegaprm", rollouts_per_step=k,
                                                           rollout_budget=budget, reuse_rollouts=reuse))
            rows += [ms, om]
    return {"policy": str(policy), "backend": backend, "problems": n_problems, "num_solutions": num_solutions,
            "temperature": temperature, "rollout_temperature": rollout_temperature, "raw": raw, "rows": rows,
            "date": time.strftime("%Y-%m-%d")}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for method, marker in (("math_shepherd", "o"), ("omegaprm", "s")):
        for reuse in (True, False):
            rows = [r for r in results["rows"] if r["method"] == method and r.get("reuse", True) == reuse]
            if not rows:
                continue
            ks, label, ls = [r["k"] for r in rows], f"{method}{'' if reuse else ', no reuse'}", "-" if reuse else ":"
            ax1.plot(ks, [r["auroc"] for r in rows], marker=marker, ls=ls, label=label)
            ax2.plot(ks, [r["right_states_scored_0"] for r in rows], marker=marker, ls=ls, label=label)
    for ax, title in ((ax1, "AUROC of score vs exact step truth"), (ax2, "right states scored 0")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rollouts per scored state (K)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    ax1.axhline(0.9, color="grey", ls="--", lw=1)
    fig.suptitle(f"arith:hard, {results['problems']} problems, {repo_relative(results['policy'])}, "
                 f"T={results['temperature']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def table(results: dict) -> str:
    raw = results["raw"]["tokens_per_s"]
    lines = ["| method | K | reused rollouts | labels | rollouts / problem | AUROC (first error) | AUROC (reachable) | "
             "AUROC (local) | "
             "right states scored 0 | unreachable states scored > 0 | labelled steps/s | rollouts/s | "
             "rollout tok/s | vs raw |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        reuse = "yes" if r.get("reuse", True) else "no"
        lines.append(f"| {r['method']} | {r['k']} | {reuse} | {r['labels']} | {r['rollouts_per_problem']} | {r['auroc']} | "
                     f"{r['auroc_reachable']} | {r['auroc_local']} | {_pct(r['right_states_scored_0'])} | "
                     f"{_pct(r['unreachable_states_scored_above_0'])} | {r['steps_labelled_per_s']} | "
                     f"{r['rollouts_per_s']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / raw:.2f} |")
    lines += ["", f"Raw sampling of the same generator in the same run: {raw:,.0f} tok/s "
              f"({results['raw']['tokens']} tokens, {results['problems']} prompts x {results['num_solutions']} samples "
              "in one call)."]
    return "\n".join(lines)


def figures(results: dict) -> list[tuple[str, str]]:
    """Rows of docs/BENCHMARKS.md's figures table: AUROC against K per method (the reused-rollout
    runs when there are any), and the searches' rollout tok/s as a share of raw sampling."""
    rows = results["rows"]
    reuse = any(r.get("reuse", True) for r in rows)
    per_method = []
    for method, name in (("omegaprm", "OmegaPRM"), ("math_shepherd", "Math-Shepherd")):
        mine = [r for r in rows if r["method"] == method and r.get("reuse", True) == reuse]
        if mine:
            ks = " / ".join(str(r["k"]) for r in mine)
            aurocs = " / ".join("n/a" if r["auroc"] is None else f"{r['auroc']:.3f}" for r in mine)
            per_method.append(f"{name} K = {ks}: {aurocs}")
    raw = results["raw"]["tokens_per_s"]
    shares = [r["tokens_per_s"] / raw for r in rows]
    return [("Tree-search label AUROC vs rollout budget (bench_mcts)",
             "; ".join(per_method)
             + f" ({'reused' if reuse else 'no reused'} rollouts; {results['problems']} problems)"),
            ("Tree-search rollout speed vs raw sampling",
             f"{min(shares):.2f}-{max(shares):.2f} of raw sampling ({raw:,.0f} tok/s, {results['backend']})")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(REPO / "runs" / "arith" / "policy"))
    parser.add_argument("--backend", default="hf")
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--budgets", default="4,8,16,32")
    parser.add_argument("--num-solutions", type=int, default=4)
    parser.add_argument("--temperature", type=float, default=0.85)
    parser.add_argument("--rollout-temperature", type=float, default=None, help="default: --temperature")
    parser.add_argument("--reuse", choices=("both", "on", "off"), default="both",
                        help="count reused rollouts (reuse_rollouts): both runs each search twice")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not (Path(args.policy) / "config.json").is_file():
        print(f"no policy at {args.policy}: run `make demo` (or `mathprm sft`) first", file=sys.stderr)
        return 2
    results = run(args.policy, args.backend, args.problems, [int(k) for k in args.budgets.split(",")],
                  args.num_solutions, args.temperature, args.rollout_temperature,
                  {"both": [True, False], "on": [True], "off": [False]}[args.reuse])
    out = REPO / "runs" / "bench" / f"mcts_{args.backend}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, results)
    text = table(results)
    print(text)
    if args.write:
        plot(results, PLOT)
        command = (f"python benchmarks/bench_mcts.py --problems {args.problems} --budgets {args.budgets} "
                   f"--reuse {args.reuse} --backend {args.backend} --write")
        write_section(SECTION, command, text + f"\n\n![AUROC vs budget](img/{PLOT.name})\n", figures(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
