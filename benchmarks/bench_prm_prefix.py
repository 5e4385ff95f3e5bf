"""PRM prefix reuse (issue 35): tokens and seconds per search decision with the prefix cache on and off.

    .venv/bin/python benchmarks/bench_prm_prefix.py [--rounds 24] [--n 8] [--searches 1]
        [--device cpu] [--cache-tokens 65536] [--write]

The PRM: a random-weight Qwen2.5-Math-PRM-layout model (`tests.tiny_models.build_qwen_prm`, the
published kind `qwen`) of ~20M parameters with its BPE tokenizer, built in a temporary directory
(speed does not depend on the weights). The rounds are a guided search's: each decision scores
`--n` candidate steps of ~60 tokens after the solution so far, then the first candidate is kept,
so the prefix grows by a step a round (~1.5k tokens after 24 rounds, a long MATH solution).
`--searches` searches run in lockstep, each round one `score` call holding all their candidates
(as the lockstep driver or the Serve PRM deployment's batch merges them).

Both scorers see the same calls. Per decision: the tokens the PRM computed (`cache_stats()`) and
the seconds of the `score` call; the JSON (runs/bench/prm_prefix.json) holds every round and the
totals, their ratios (the issue's targets: >= 5x fewer tokens and >= 3x fewer seconds at MATH
length), the cache's memory at the end and the largest score difference between the two; with
--write the section "## PRM prefix cache: a search's scoring, cache on vs off" of
docs/BENCHMARKS.md and its figures row.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import command_line, write_section  # noqa: E402

from mathprm import atomic  # noqa: E402
from mathprm.models.published import QwenPRMScorer  # noqa: E402
from tests.tiny_models import build_qwen_prm, math_lines  # noqa: E402

# ~20M parameters: 6 layers of hidden 512 (8 query heads, 2 key-value heads), a 4k context.
SIZES = {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 6, "num_attention_heads": 8,
         "num_key_value_heads": 2, "max_position_embeddings": 4096, "initializer_range": 0.02}
STEP_TOKENS = 60


def steps_pool(tokenizer, count: int, rng: random.Random) -> list[str]:
    """`count` steps of ~STEP_TOKENS tokens each: windows of STEP_TOKENS tokens of the bundled math
    text (shuffled lines), decoded (a window re-encodes to about as many tokens)."""
    lines = [line.strip() for line in math_lines() if line.strip()]
    out = []
    while len(out) < count:
        rng.shuffle(lines)
        ids = tokenizer.encode(" ".join(lines), add_special_tokens=False)
        out += [tokenizer.decode(ids[lo : lo + STEP_TOKENS]).strip()
                for lo in range(0, len(ids) - STEP_TOKENS, STEP_TOKENS)]
    return out[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=24)
    parser.add_argument("--n", type=int, default=8, help="candidates per decision")
    parser.add_argument("--searches", type=int, default=1, help="searches in lockstep, one call a round")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-tokens", type=int, default=65536)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = build_qwen_prm(Path(tmp) / "prm", seed=0, **SIZES)
        off = QwenPRMScorer(path, device=args.device, batch_size=args.batch_size)
        on = QwenPRMScorer(path, device=args.device, batch_size=args.batch_size, prefix_cache_tokens=args.cache_tokens)
    params = sum(p.numel() for p in off.model.parameters())
    rng = random.Random(0)
    questions = [line for line in math_lines() if line.rstrip().endswith("?")][: args.searches]
    pool = steps_pool(off.tokenizer, args.rounds * args.n * args.searches, rng)
    solutions: list[list[str]] = [[] for _ in questions]
    warm = [questions[0]], [[pool[0]]]
    off.score(*warm), on.score(*warm)  # first calls allocate
    rounds, worst = [], 0.0
    for r in range(args.rounds):
        qs, steps = [], []
        for s, question in enumerate(questions):
            for c in range(args.n):
                qs.append(question)
                steps.append(solutions[s] + [pool[(r * args.searches + s) * args.n + c]])
        row = {"round": r, "candidate_tokens": len(off.encode(qs[0], steps[0])[0])}
        for name, scorer in (("off", off), ("on", on)):
            before = scorer.cache_stats()["tokens_computed"]
            t0 = time.perf_counter()
            got = scorer.score(qs, steps)
            row[f"seconds_{name}"] = time.perf_counter() - t0
            row[f"tokens_{name}"] = scorer.cache_stats()["tokens_computed"] - before
            row[f"scores_{name}"] = got
        worst = max(worst, max(abs(a - b) for x, y in zip(row.pop("scores_off"), row.pop("scores_on"))
                               for a, b in zip(x, y)))
        rounds.append(row)
        print(f"round {r:2d}: candidates of {row['candidate_tokens']:5d} tokens  tokens off {row['tokens_off']:6d} on "
              f"{row['tokens_on']:5d}  seconds off {row['seconds_off']:.3f} on {row['seconds_on']:.3f}", flush=True)
        for s in range(len(questions)):
            solutions[s] = steps[s * args.n]  # the first candidate is chosen
    decisions = args.rounds * args.searches
    total = {k: sum(row[k] for row in rounds) for k in ("tokens_off", "tokens_on", "seconds_off", "seconds_on")}
    last = rounds[-max(1, args.rounds // 4):]  # the last quarter of the search: MATH-length solutions
    tail = {k: sum(row[k] for row in last) for k in total}
    result = {
        "prm": f"random Qwen2.5-Math-PRM layout, {params / 1e6:.1f}M parameters, BPE vocabulary {len(off.tokenizer)}",
        "device": str(off.device), "rounds": args.rounds, "n": args.n, "searches": args.searches,
        "batch_size": args.batch_size, "cache_tokens": args.cache_tokens,
        "per_decision": {"tokens_off": total["tokens_off"] / decisions, "tokens_on": total["tokens_on"] / decisions,
                         "seconds_off": total["seconds_off"] / decisions, "seconds_on": total["seconds_on"] / decisions},
        "fewer_tokens": total["tokens_off"] / total["tokens_on"],
        "faster": total["seconds_off"] / total["seconds_on"],
        "last_quarter": {"candidate_tokens": [last[0]["candidate_tokens"], last[-1]["candidate_tokens"]],
                         "fewer_tokens": tail["tokens_off"] / tail["tokens_on"],
                         "faster": tail["seconds_off"] / tail["seconds_on"]},
        "max_score_difference": worst, "cache": on.cache_stats(), "rounds_detail": rounds,
    }
    out = REPO / "runs" / "bench" / "prm_prefix.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, result)
    print({k: v for k, v in result.items() if k != "rounds_detail"})
    print(f"wrote {out}")
    if args.write:
        per, tail = result["per_decision"], result["last_quarter"]
        text = "\n".join([
            "| PRM scoring per decision | cache off | cache on | ratio |", "|---|---:|---:|---:|",
            f"| tokens computed | {per['tokens_off']:.0f} | {per['tokens_on']:.0f} | {result['fewer_tokens']:.1f}x fewer |",
            f"| seconds | {per['seconds_off']:.3f} | {per['seconds_on']:.3f} | {result['faster']:.1f}x faster |",
            "",
            f"Last quarter of the search (candidates of {tail['candidate_tokens'][0]}-{tail['candidate_tokens'][1]} "
            f"tokens): {tail['fewer_tokens']:.1f}x fewer tokens, {tail['faster']:.1f}x faster. Largest score difference "
            f"on vs off: {result['max_score_difference']:.1e}. Cache at the end: {result['cache']['held_tokens']} "
            f"tokens, {result['cache']['held_bytes'] / 2**20:.1f} MiB.",
            "",
            f"{result['prm']} on {result['device']}; {args.rounds} rounds of a guided search ({args.searches} in "
            f"lockstep), {args.n} candidates of ~{STEP_TOKENS} tokens per decision, the first kept, so the solution "
            "grows a step a round; both scorers get the same calls (`mathprm.models.prefix`)."])
        command = command_line("bench_prm_prefix.py", parser, args)
        write_section("PRM prefix cache: a search's scoring, cache on vs off", command, text, [
            ("PRM prefix cache at MATH length (guided@8 rounds, ~20M Qwen2 PRM)",
             f"{result['fewer_tokens']:.1f}x fewer PRM tokens, {result['faster']:.1f}x fewer PRM seconds per decision "
             f"(last quarter: {tail['fewer_tokens']:.1f}x / {tail['faster']:.1f}x)")])


if __name__ == "__main__":
    main()
