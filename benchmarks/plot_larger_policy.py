"""Issue 6's "small policy + guided@8 against the larger policy's greedy", as one PNG: the larger
policy's greedy accuracy along its training (evaluation reports of its `snapshot_every` copies and
of the final policy) against the small policy's strategies as horizontal lines.

(Not a bench_*.py: it reads reports that `mathprm evaluate` wrote, it measures nothing itself.)

    python jobs/sft.py --config mathprm/configs/sft_arith_small.yaml snapshot_every=500
    for d in runs/arith/policy_small-snapshots/step-* runs/arith/policy_small; do
        mathprm evaluate --config mathprm/configs/eval_arith.yaml policy=$d "strategies=[greedy]" \\
            out=runs/exp/larger/$(basename $d).json plot=null; done
    python benchmarks/plot_larger_policy.py --larger 'runs/exp/larger/step-*.json' \\
        --larger-final 3000=runs/exp/larger/policy_small.json \\
        --small runs/arith/eval.json --small 'exact PRM=runs/exp/oracle.json:guided@8' --out docs/img/larger_policy.png

`--larger` reports are placed by the step in their name (step-001500.json -> 1,500 updates);
`--small [LABEL=]REPORT[:STRATEGY,...]` draws the strategies named (default: each of greedy / guided@8 /
guided_retry@7 / guided@16 the report has; LABEL prefixes their names). All reports must be on the same problems (dataset, seed, count).
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

SMALL_STRATEGIES = ("greedy", "guided@8", "guided_retry@7", "guided@16")


def _read(path: str) -> dict:
    try:
        report = json.loads(Path(path).read_text())
        return {"problems": (report["dataset"], report["seed"], report["n_problems"]),
                "accuracy": {k: v["accuracy"] for k, v in report["strategies"].items()}}
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"plot_larger_policy: {path}: not a `mathprm evaluate` report ({e})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--larger", required=True, help="glob of the snapshots' reports (a step-N in each name)")
    ap.add_argument("--larger-final", default=None, help="STEPS=REPORT of the final larger policy")
    ap.add_argument("--small", action="append", default=[], help="[LABEL=]REPORT[:STRATEGY,...] of the small policy")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    points = {}
    for path in sorted(glob.glob(args.larger)):
        m = re.search(r"step-0*(\d+)", Path(path).name)
        if not m:
            sys.exit(f"plot_larger_policy: --larger {path}: no step-N in its name")
        points[int(m.group(1))] = _read(path)
    if args.larger_final:
        steps, _, path = args.larger_final.partition("=")
        if not steps.isdigit() or not path:
            sys.exit(f"plot_larger_policy: --larger-final must be STEPS=REPORT, got {args.larger_final!r}")
        points[int(steps)] = _read(path)
    if not points:
        sys.exit(f"plot_larger_policy: --larger {args.larger!r} matched no report")
    lines = []
    for spec in args.small:
        label, _, path = spec.rpartition("=")
        path, _, only = path.partition(":")
        report = _read(path)
        names = only.split(",") if only else [k for k in SMALL_STRATEGIES if k in report["accuracy"]]
        for k in names:
            if k not in report["accuracy"]:
                sys.exit(f"plot_larger_policy: --small {spec}: no strategy {k!r} in {path}")
            lines.append((f"{label} {k}".strip(), report["accuracy"][k], report["problems"]))
    problems = {p["problems"] for p in points.values()} | {p for *_, p in lines}
    if len(problems) != 1:
        sys.exit(f"plot_larger_policy: the reports are on different problems: {sorted(problems)}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(points)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(steps, [100 * points[s]["accuracy"]["greedy"] for s in steps], "o-", color="black", lw=2,
            label="larger policy, greedy")
    for i, (name, acc, _) in enumerate(lines):
        ax.axhline(100 * acc, ls="--", color=f"C{i}", label=f"small policy, {name}")
    dataset, seed, n = problems.pop()
    ax.set(xlabel="larger policy's SFT updates", ylabel="accuracy (%)", ylim=(0, 100),
           title=f"{dataset}: {n} test problems (seed {seed})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"[plot_larger_policy] wrote {args.out}")


if __name__ == "__main__":
    main()
