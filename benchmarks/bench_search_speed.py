"""Step-by-step search at MATH length with the prefix caches off and on, side by side in one run.

    .venv/bin/python benchmarks/bench_search_speed.py [--problems 2] [--max-steps 24] [--demo] [--write]

Models: a random-weight Qwen2 policy and a Qwen2.5-Math-PRM-layout PRM (`published` kind `qwen`)
of ~20M parameters each with byte-level BPE tokenizers (`tests.tiny_models`), built in a
temporary directory: speed does not depend on the weights, and a random policy rarely writes
the separator or EOS, so every step runs to `--step-tokens` (~MATH step length) and every
search to `--max-steps`, the prefix growing to ~1.5k tokens. Questions: the first
`--problems` of MATH-500 (shared data). For guided@8 and beam@4 (beam_width 4), the searches of
all problems run in lockstep (`run_searches`, as `mathprm evaluate` runs them), once with both
caches off and once with the policy's (`HFGenerator(prefix_cache_tokens=)`) and the PRM's
(`prefix_cache_tokens=`) on, the same seeds. Per decision (a PRM call of one search): PRM tokens
computed and PRM seconds; policy prompt tokens encoded; end-to-end seconds per problem; and
whether the two runs chose the same steps.

With `--demo` (needs `make demo`'s runs/arith/policy and runs/arith/prm): the demo's guided@8 on
50 arith:hard problems (`mathprm evaluate`), caches off vs on: accuracy, identical per-problem
records, seconds. JSON in runs/bench/search_speed.json; --write records the section "## Search
speed: prefix caches off vs on" of docs/BENCHMARKS.md and its figures rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import command_line, write_section  # noqa: E402

from mathprm import atomic  # noqa: E402

# ~20M parameters each: 6 layers of hidden 512 (8 query heads, 2 key-value heads), a 4k context.
SIZES = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 2, "max_position_embeddings": 4096, "initializer_range": 0.02}
STRATEGIES = (("guided", {"n": 8}), ("beam", {"n": 4, "beam_width": 4}))


def steady_policy(path: Path) -> None:
    """Make the random policy write MATH-length searches: its EOS ids and every token holding a
    newline (so the "\n\n" separator) get zero output rows, and the other rows are scaled so
    that the logits' spread is ~4, which leaves those tokens ~1e-6 of the probability: every step
    runs to `--step-tokens` and every search to `--max-steps`, as a long MATH solution would."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eos = GenerationConfig.from_pretrained(path).eos_token_id
    banned = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    banned |= {i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i])}
    head = model.get_output_embeddings().weight
    with torch.no_grad():
        text = tokenizer(" ".join(["Let x be the sum of the first ten primes and compute it."] * 8),
                         return_tensors="pt")
        spread = model(**text).logits.float().std().item()
        head.mul_(4.0 / spread)
        head[sorted(banned)] = 0.0
    model.save_pretrained(path)


class TimedScorer:
    """A Scorer that adds up the seconds of its `score` calls."""

    def __init__(self, scorer) -> None:
        self.scorer, self.seconds = scorer, 0.0

    def score(self, questions, steps):
        t0 = time.perf_counter()
        try:
            return self.scorer.score(questions, steps)
        finally:
            self.seconds += time.perf_counter() - t0

    def __getattr__(self, name):  # acquire, release: the wrapped scorer's
        return getattr(self.scorer, name)


def search_side_by_side(policy: Path, prm: Path, args: argparse.Namespace) -> list[dict]:
    from mathprm.data.problems import load_problems
    from mathprm.models.gen_hf import HFGenerator
    from mathprm.models.published import QwenPRMScorer
    from mathprm.search import SearchConfig, run_searches
    from mathprm.steps import StepFormat

    problems = load_problems("math500", limit=args.problems + 1)
    warm, problems = problems[-1], problems[:-1]
    rows = []
    for name, settings in STRATEGIES:
        cfg = SearchConfig(max_steps=args.max_steps, max_step_tokens=args.step_tokens, temperature=1.0,
                           max_solution_tokens=args.max_steps * args.step_tokens, seed=0, **settings)
        runs = {}
        for cache in ("off", "on"):
            tokens = args.cache_tokens if cache == "on" else 0
            gen = HFGenerator(str(policy), StepFormat("\n\n"), device="cpu", prefix_cache_tokens=tokens)
            scorer = TimedScorer(QwenPRMScorer(prm, device="cpu", batch_size=16, prefix_cache_tokens=tokens))
            # Untimed: a one-step search on another question (first calls allocate), then only
            # what the timed run adds to the counters counts.
            run_searches(name, gen, scorer, [warm], dataclasses.replace(cfg, max_steps=1))
            scorer.seconds, prm_before, gen_before = 0.0, scorer.scorer.cache_stats(), gen.cache_stats()
            t0 = time.perf_counter()
            results = run_searches(name, gen, scorer, problems, cfg)
            wall = time.perf_counter() - t0
            decisions = sum(r.usage.prm_calls for r in results)
            prm_stats, gen_stats = scorer.scorer.cache_stats(), gen.cache_stats()
            for stats, before in ((prm_stats, prm_before), (gen_stats, gen_before)):
                for key in ("tokens_computed", "tokens_full", "hits", "misses"):
                    stats[key] -= before[key]
            runs[cache] = {"decisions": decisions, "seconds_per_problem": wall / len(problems),
                           "prm_tokens_per_decision": prm_stats["tokens_computed"] / decisions,
                           "prm_seconds_per_decision": scorer.seconds / decisions,
                           "policy_tokens_per_decision": gen_stats["tokens_computed"] / decisions,
                           "longest_solution_steps": max(len(r.steps) for r in results),
                           "prm_cache": prm_stats, "policy_cache": gen_stats,
                           "steps": [[s.text for s in r.steps] for r in results]}
            print(f"{name} cache {cache}: {json.dumps({k: v for k, v in runs[cache].items() if k != 'steps'})[:400]}",
                  flush=True)
        off, on = runs["off"], runs["on"]
        rows.append({"strategy": f"{name}@{settings['n']}", "off": {k: v for k, v in off.items() if k != "steps"},
                     "on": {k: v for k, v in on.items() if k != "steps"}, "same_steps": off["steps"] == on["steps"],
                     "prm_fewer_tokens": off["prm_tokens_per_decision"] / on["prm_tokens_per_decision"],
                     "prm_faster": off["prm_seconds_per_decision"] / on["prm_seconds_per_decision"],
                     "policy_fewer_tokens": off["policy_tokens_per_decision"] / on["policy_tokens_per_decision"],
                     "end_to_end_faster": off["seconds_per_problem"] / on["seconds_per_problem"]})
    return rows


def demo_side_by_side(args: argparse.Namespace, tmp: str) -> dict | None:
    """The demo's guided@8 on 50 arith:hard problems, caches off vs on (None without the demo's models)."""
    from mathprm.eval.evaluate import EvalConfig, run_evaluation

    policy, prm = REPO / "runs" / "arith" / "policy", REPO / "runs" / "arith" / "prm"
    if not (policy / "config.json").is_file() or not (prm / "prm_config.json").is_file():
        print("no demo models (runs/arith/policy, runs/arith/prm): `make demo` first; the demo comparison is skipped")
        return None
    out = {}
    for cache in ("off", "on"):
        tokens = args.cache_tokens if cache == "on" else 0
        cfg = EvalConfig(policy=str(policy), prm=str(prm), dataset="arith:hard", limit=50, strategies=["guided@8"],
                         temperature=0.85, device="cpu", out=f"{tmp}/demo_{cache}.json",
                         prm_prefix_cache_tokens=tokens, policy_prefix_cache_tokens=tokens)
        t0 = time.perf_counter()
        report = run_evaluation(cfg)
        lines = Path(f"{tmp}/demo_{cache}.problems.jsonl").read_text().splitlines()
        records = [{k: v for k, v in json.loads(line).items() if "seconds" not in k} for line in lines]
        out[cache] = {"accuracy": report["strategies"]["guided@8"]["accuracy"], "seconds": time.perf_counter() - t0,
                      "records": records, "prefix_cache": report.get("prefix_cache")}
    floats, others = differences(out["off"]["records"], out["on"]["records"])
    return {"accuracy_off": out["off"]["accuracy"], "accuracy_on": out["on"]["accuracy"],
            "seconds_off": out["off"]["seconds"], "seconds_on": out["on"]["seconds"],
            "same_records": not others, "largest_float_difference": max(floats, default=0.0),
            "differences": others[:10], "prefix_cache": out["on"]["prefix_cache"]}


def differences(a, b, where: str = "") -> tuple[list[float], list[str]]:
    """(every |difference| of two floats at the same place, the places where anything else
    differs: a text, an answer, a count, a key) of two JSON values."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [], [f"{where}: keys"]
        parts = [differences(a[k], b[k], f"{where}.{k}") for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [], [f"{where}: length"]
        parts = [differences(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))]
    elif isinstance(a, float) and isinstance(b, float):
        return [abs(a - b)], []
    else:
        return [], [] if a == b else [where]
    return [f for fs, _ in parts for f in fs], [o for _, os in parts for o in os]


def table(rows: list[dict], demo: dict | None, args: argparse.Namespace) -> str:
    lines = ["| strategy | PRM tokens / decision | PRM s / decision | policy tokens / decision | s / problem | "
             "same steps |", "|---|---:|---:|---:|---:|:---:|"]
    for r in rows:
        off, on = r["off"], r["on"]
        lines.append(f"| {r['strategy']} | {off['prm_tokens_per_decision']:.0f} -> {on['prm_tokens_per_decision']:.0f} "
                     f"({r['prm_fewer_tokens']:.1f}x fewer) | {off['prm_seconds_per_decision']:.3f} -> "
                     f"{on['prm_seconds_per_decision']:.3f} ({r['prm_faster']:.1f}x) | "
                     f"{off['policy_tokens_per_decision']:.0f} -> {on['policy_tokens_per_decision']:.0f} "
                     f"({r['policy_fewer_tokens']:.1f}x fewer) | {off['seconds_per_problem']:.1f} -> "
                     f"{on['seconds_per_problem']:.1f} ({r['end_to_end_faster']:.2f}x) | "
                     f"{'yes' if r['same_steps'] else 'no'} |")
    lines += ["", f"Cache off -> on, {args.problems} MATH-500 questions in lockstep, random-weight ~20M Qwen2 policy "
              f"and Qwen2.5-Math-PRM-layout PRM (BPE), steps of {args.step_tokens} tokens, {args.max_steps} steps "
              f"(solutions to ~{args.max_steps * args.step_tokens} tokens), temperature 1.0, seed 0; both caches "
              f"{args.cache_tokens} tokens. A decision is one PRM call of one search (one round).",
              "", "What the caches cannot shorten is decoding: beam@4 samples 16 candidates of a step's tokens a "
              "round. Both runs read a grouped-query model's keys and values in place on CPU "
              "(`mathprm.models.attention`), so decoding costs the same with the caches off and on."]
    if demo:
        lines += ["", f"The demo's guided@8 on 50 arith:hard problems (runs/arith models), caches off -> on: accuracy "
                  f"{demo['accuracy_off']:.1%} -> {demo['accuracy_on']:.1%}; per-problem records (chosen steps, answers) "
                  f"{'identical' if demo['same_records'] else 'DIFFERENT at ' + ', '.join(demo['differences'])}, "
                  f"PRM scores within {demo['largest_float_difference']:.1e}; {demo['seconds_off']:.0f} s -> "
                  f"{demo['seconds_on']:.0f} s."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--step-tokens", type=int, default=60)
    parser.add_argument("--cache-tokens", type=int, default=65536)
    parser.add_argument("--demo", action="store_true", help="also the demo's guided@8 (needs make demo's models)")
    parser.add_argument("--rows-from", help="take the MATH-length rows from this JSON of an earlier run (then only "
                                                "the demo comparison runs)")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    from tests.tiny_models import build_qwen_policy, build_qwen_prm

    with tempfile.TemporaryDirectory(prefix="bench_search_speed_") as tmp:
        if args.rows_from:
            earlier = json.loads(Path(args.rows_from).read_text())
            rows = earlier["rows"]
            for key in ("problems", "max_steps", "step_tokens", "cache_tokens"):
                setattr(args, key, earlier["args"][key])
        else:
            policy = build_qwen_policy(Path(tmp) / "policy", seed=0, **SIZES)
            steady_policy(policy)
            prm = build_qwen_prm(Path(tmp) / "prm", seed=1, **SIZES)
            rows = search_side_by_side(policy, prm, args)
        demo = demo_side_by_side(args, tmp) if args.demo or args.write else None
    text = table(rows, demo, args)
    print(text)
    out = REPO / "runs" / "bench" / "search_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, {"rows": rows, "demo": demo, "args": vars(args)})
    if args.write:
        command = command_line("bench_search_speed.py", parser, args, ("demo", "rows_from"))
        figures = [(f"Search at MATH length, prefix caches off vs on ({r['strategy']}, ~20M Qwen2 policy + PRM)",
                    f"PRM tokens/decision {r['prm_fewer_tokens']:.1f}x fewer, PRM s/decision {r['prm_faster']:.1f}x "
                    f"lower, policy tokens/decision {r['policy_fewer_tokens']:.1f}x fewer, end to end "
                    f"{r['end_to_end_faster']:.2f}x faster; same steps: {'yes' if r['same_steps'] else 'no'}")
                   for r in rows]
        write_section("Search speed: prefix caches off vs on", command, text, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
