"""PRM scoring speed: one forward pass per solution against one pass per step prefix (the seed's way).

    .venv/bin/python benchmarks/bench_prm.py [--prm runs/arith/prm] [--n 64] [--repeats 3] [--write]

Solutions: the first `--n` arith:hard test problems (seed 0) whose reference solution has
exactly 8 steps (7 operations and the answer line); the preset has 7-9 operations, so these
are whole solutions, neither padded nor cut. Two ways to get every step's score:

- one pass: `PRMScorer.score(questions, steps)`, one forward pass per solution;
- per prefix (the seed's way): each prefix steps[:i+1] in its own forward pass, keeping its
  last step's score. Here all 8N prefixes go through the same `score` call, so they are
  batched and length-sorted exactly like the one-pass side: the comparison counts passes and
  tokens, not batching. A causal PRM reads step i at its end either way, so both must give
  the same scores (checked: max |difference|).

Each is timed `--repeats` times after a warm-up call; the median counts. Target (the issue):
one pass >= 5x faster in solutions/s. Training throughput comes from the PRM's
prm_summary.json (steps x batch_size x num_workers / elapsed_s). With no PRM at `--prm`, an
untrained one is built on `--base` in a temporary directory (speed does not depend on the
head's weights) and training is "not measured". With --write the table replaces the
"## PRM scoring speed" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import repo_relative, write_section  # noqa: E402

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.models.prm import PRM_CONFIG_FILE, PRMScorer, build_prm, encode_solution, save_prm  # noqa: E402
from mathprm.prompts import Prompter  # noqa: E402
from mathprm.steps import StepFormat  # noqa: E402
from mathprm.train.prm import PRM_STAGE  # noqa: E402

SUMMARY_FILE = PRM_STAGE.summary_file

SECTION = "PRM scoring speed"
STEPS = 8
TARGET = 5.0


def solutions(n: int) -> tuple[list[str], list[list[str]]]:
    """The first `n` arith:hard test problems (seed 0) with exactly STEPS reference steps."""
    pool = 4 * n  # about a third of arith:hard chains have 7 operations
    while True:
        found = [p for p in arith.generate("hard", pool, seed=0, split="test") if len(arith.solution_steps(p)) == STEPS]
        if len(found) >= n:
            break
        pool *= 2
    return [p.question for p in found[:n]], [arith.solution_steps(p) for p in found[:n]]


def score_prefixes(scorer: PRMScorer, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
    """Step i's score read at the end of the prefix steps[:i+1], each prefix its own sequence."""
    scores = scorer.score([q for q, s in zip(questions, steps) for _ in s],
                          [s[: i + 1] for s in steps for i in range(len(s))])
    last = iter(row[-1] for row in scores)
    return [[next(last) for _ in s] for s in steps]


def timed(fn: Callable[[], list[list[float]]], repeats: int) -> tuple[float, list[list[float]]]:
    """(median seconds of `repeats` calls after one warm-up call, the warm-up's result)."""
    result = fn()
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds), result


def scoring(prm_dir: Path, n: int, repeats: int) -> dict:
    scorer = PRMScorer(prm_dir)
    questions, steps = solutions(n)
    fmt, tok = scorer.step_format, scorer.tokenizer
    tokens_one = sum(len(encode_solution(Prompter(tok, fmt), q, s)[0]) for q, s in zip(questions, steps))
    tokens_prefix = sum(len(encode_solution(Prompter(tok, fmt), q, s[: i + 1])[0])
                        for q, s in zip(questions, steps) for i in range(len(s)))
    one_s, one = timed(lambda: scorer.score(questions, steps), repeats)
    prefix_s, prefix = timed(lambda: score_prefixes(scorer, questions, steps), repeats)
    diff = max(abs(a - b) for r1, r2 in zip(one, prefix) for a, b in zip(r1, r2))
    return {"solutions": n, "steps": STEPS, "device": str(scorer.device), "dtype": str(scorer.model.dtype),
            "batch_size": scorer.batch_size, "repeats": repeats,
            "one_pass": {"passes": n, "tokens": tokens_one, "median_s": round(one_s, 4),
                         "solutions_per_s": round(n / one_s, 1)},
            "per_prefix": {"passes": n * STEPS, "tokens": tokens_prefix, "median_s": round(prefix_s, 4),
                           "solutions_per_s": round(n / prefix_s, 1)},
            "speedup": round(prefix_s / one_s, 2), "max_abs_diff": diff}


def training(prm: Path) -> dict | None:
    """Training throughput from the PRM's prm_summary.json, or None without one."""
    file = prm / SUMMARY_FILE
    if not file.is_file():
        return None
    s = json.loads(file.read_text())
    bs, workers = s["config"]["batch_size"], s["config"]["num_workers"]
    return {"steps": s["steps"], "batch_size": bs, "num_workers": workers, "elapsed_s": round(s["elapsed_s"], 1),
            "train_solutions": s.get("train_solutions"), "val_bce": s.get("val_bce"), "val_auroc": s.get("val_auroc"),
            "solutions_per_s": round(s["steps"] * bs * workers / s["elapsed_s"], 1)}


def table(r: dict, source: str) -> str:
    one, pre = r["one_pass"], r["per_prefix"]
    verdict = "met" if r["speedup"] >= TARGET else "MISSED"
    lines = ["| scoring | forward passes | tokens | median time | solutions/s |", "|---|---:|---:|---:|---:|",
             f"| one pass per solution (`PRMScorer.score`) | {one['passes']} | {one['tokens']:,} | "
             f"{one['median_s']:.3f} s | {one['solutions_per_s']:,.1f} |",
             f"| one pass per step prefix (the seed's way) | {pre['passes']} | {pre['tokens']:,} | "
             f"{pre['median_s']:.3f} s | {pre['solutions_per_s']:,.1f} |",
             "", f"Speed-up: **{r['speedup']}x** (target >= {TARGET:g}x: {verdict}); max |score difference| "
             f"between the two: {r['max_abs_diff']:.2e} "
             f"(must be < 1e-4: {'ok' if r['max_abs_diff'] < 1e-4 else 'FAILED'})."]
    t = r["training"]
    if t is None:
        lines.append("\nTraining throughput: not measured (no prm_summary.json).")
    else:
        val = ", ".join(f"{k} {t[k]:.4f}" for k in ("val_bce", "val_auroc") if t[k] is not None) or "no validation"
        lines.append(f"\nTraining throughput: **{t['solutions_per_s']:,.1f} solutions/s** ({t['steps']} steps x batch "
                     f"{t['batch_size']} x {t['num_workers']} workers in {t['elapsed_s']} s, validation passes and "
                     f"checkpoints included; {t['train_solutions']} training solutions); {val}.")
    lines.append(f"\nPRM: {source}. {r['solutions']} arith:hard test solutions of exactly {r['steps']} steps (7 "
                 f"operations and the answer line, seed 0); {r['device']}, {r['dtype'].removeprefix('torch.')}, "
                 f"batch {r['batch_size']} solutions, length-sorted, the same for both; median of {r['repeats']} "
                 "timed calls after a warm-up call.")
    return "\n".join(lines)


def figures(r: dict) -> list[tuple[str, str]]:
    """The row of docs/BENCHMARKS.md's figures table: solutions/s of both ways, and the speed-up."""
    return [("PRM scoring speed, one pass per solution vs one per step prefix",
             f"{r['one_pass']['solutions_per_s']:,.1f} vs {r['per_prefix']['solutions_per_s']:,.1f} solutions/s "
             f"({r['speedup']}x; {r['solutions']} solutions of {r['steps']} steps)")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prm", default=str(REPO / "runs" / "arith" / "prm"))
    parser.add_argument("--base", default=str(REPO / "runs" / "arith" / "policy"),
                        help="causal LM to build an untrained PRM on when --prm does not exist")
    parser.add_argument("--n", type=int, default=64, help="solutions to score")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    prm = Path(args.prm)
    with tempfile.TemporaryDirectory(prefix="bench_prm_") as tmp:
        if (prm / PRM_CONFIG_FILE).is_file():
            prm_dir, source = prm, f"`{repo_relative(prm)}`"
        elif (Path(args.base) / "config.json").is_file():
            from transformers import AutoTokenizer

            print(f"no PRM at {prm}: building an untrained one on {args.base} in {tmp} (speed only)", flush=True)
            save_prm(build_prm(args.base), AutoTokenizer.from_pretrained(args.base), StepFormat(arith.STEP_SEPARATOR),
                     tmp, {"base": str(args.base), "note": "untrained head, built by benchmarks/bench_prm.py"})
            prm_dir = Path(tmp)
            source = f"untrained head on `{repo_relative(args.base)}` (no PRM at `{repo_relative(prm)}`)"
        else:
            print(f"no PRM at {prm} and no model at {args.base}: run `make demo` (or `mathprm train-prm`) first",
                  file=sys.stderr)
            return 2
        results = scoring(prm_dir, args.n, args.repeats)
    results["training"] = training(prm)
    text = table(results, source)
    print(text)
    out = REPO / "runs" / "bench" / "prm.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, results)
    if args.write:
        command = "python benchmarks/bench_prm.py" + "".join(
            f" --{k} {v}" for k, v in (("prm", args.prm), ("n", args.n), ("repeats", args.repeats))
            if v != parser.get_default(k)) + " --write"
        write_section(SECTION, command, text, figures(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
