"""PPO's two shapes side by side in one run: the learner sampling and scoring itself vs rollout
engines and reward workers as Ray actors (mathprm.train.ppo_roles), same config and seeds.

    python benchmarks/bench_ppo_scale.py [--policy runs/arith/policy] [--prm runs/arith/prm] \
        [--updates 12] [--limit 200] [--backend hf|vllm] [--write] [key=value ...]

Both runs train mathprm/configs/ppo_arith.yaml for `--updates` updates (extra `key=value` go to
all) into runs/bench/ppo_scale/<shape>: `in_learner`; `actors` (colocated, one engine of
`--backend` and one reward worker); `actors_separate_ahead` (the same roles placed by Ray, the next
update sampled while the learner trains: max_staleness 1). Per shape: episodes/s and generated tokens/s over the whole run, seconds
per update spent sampling, scoring and learning (and syncing weights), the peak resident memory
of each role's process, and greedy accuracy on `--limit` fresh arith:hard test problems after
training. The figures go to runs/bench/ppo_scale.json (read by benchmarks/scale_model.py) and,
with --write, to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import machine, write_section  # noqa: E402

from mathprm import atomic  # noqa: E402
from mathprm.config import load_config  # noqa: E402
from mathprm.eval.evaluate import EvalConfig, run_evaluation  # noqa: E402
from mathprm.train.ppo import METRICS_FILE, PPO_STAGE, PPOConfig, train_ppo  # noqa: E402

RESULT = REPO / "runs" / "bench" / "ppo_scale.json"
SHAPES = {
    "in_learner": ["rollout.replicas=0", "reward.replicas=0"],
    "actors": ["rollout.replicas=1", "reward.replicas=1", "placement=colocated"],
    # The cluster recipe on one box: Ray places the roles (SPREAD), the next update sampled ahead.
    "actors_separate_ahead": ["rollout.replicas=1", "reward.replicas=1", "placement=separate",
                              "rollout.max_staleness=1"],
}


def greedy(policy: Path, limit: int, tag: str) -> float:
    cfg = EvalConfig(policy=str(policy), dataset="arith:hard", limit=limit, seed=0, strategies=["greedy"],
                     out=str(REPO / "runs" / "bench" / "ppo_scale" / f"eval_{tag}.json"))
    return run_evaluation(cfg)["strategies"]["greedy"]["accuracy"]


def measure(out: Path, cfg: PPOConfig) -> dict:
    """One finished run's figures (its summary and per-update metrics)."""
    summary = json.loads((out / PPO_STAGE.summary_file).read_text())
    history = [h for h in (json.loads(x) for x in (out / METRICS_FILE).read_text().splitlines()) if "reward" in h]
    n = len(history)
    episodes = n * cfg.prompts_per_update * cfg.group_size * cfg.num_workers
    mean = lambda key: sum(h.get(key, 0.0) for h in history) / n  # noqa: E731
    waited, sample, reward, sync = mean("rollout_s"), mean("sample_s"), mean("reward_s"), mean("sync_s")
    update_s = summary["elapsed_s"] / n
    return {
        "updates": n, "seconds": summary["elapsed_s"], "episodes_per_s": episodes / summary["elapsed_s"],
        "tokens_per_s": mean("tokens_per_s"), "rollout_s_per_update": sample,
        "reward_s_per_update": reward, "sync_s_per_update": sync,
        "learner_s_per_update": max(update_s - waited - sync, 0.0),
        "peak_rss_mb": {role: max(h[f"rss_mb_{role}"] for h in history)
                        for role in ("learner", "rollout", "reward") if f"rss_mb_{role}" in history[-1]},
        "held_out_accuracy": summary["held_out_accuracy_end"], "reward_last": history[-1]["reward"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/arith/policy")
    ap.add_argument("--prm", default="runs/arith/prm")
    ap.add_argument("--updates", type=int, default=12)
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--backend", default="hf", choices=("hf", "vllm"))
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--from-json", action="store_true",
                    help="no training: report (and --write) the last run's runs/bench/ppo_scale.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.from_json:
        result = atomic.read_json(RESULT, "rerun without --from-json")
        return report(result, result["args"], args.write)
    policy = (REPO / args.policy).resolve()
    prm = args.prm if args.prm in ("oracle", "none") else str((REPO / args.prm).resolve())
    modes = {}
    for shape, extra in SHAPES.items():
        out = REPO / "runs" / "bench" / "ppo_scale" / shape
        extra = [*extra, f"rollout.backend={args.backend}"] if shape != "in_learner" else extra
        cfg = load_config(PPOConfig, REPO / "mathprm" / "configs" / "ppo_arith.yaml", [
            f"policy={policy}", f"prm={prm}", f"updates={args.updates}", "time_budget_min=null",
            f"eval_every={args.updates}", f"out_dir={out}", "overwrite=true", *extra, *args.overrides])
        train_ppo(cfg)
        modes[shape] = {**measure(out, cfg), "greedy_arith_hard": greedy(out, args.limit, shape)}
        print(json.dumps({shape: modes[shape]}), flush=True)
    result = {"machine": machine(), "date": datetime.date.today().isoformat(), "updates": args.updates,
              "backend": args.backend, "modes": modes,
              "args": {k: getattr(args, k) for k in ("policy", "prm", "updates", "limit", "backend", "overrides")}}
    atomic.write_json(RESULT, result)
    return report(result, result["args"], args.write)


def report(result: dict, args: dict, write: bool) -> int:
    """Print the side-by-side table of a run's `result` and, with `write`, record it in the doc."""
    args = argparse.Namespace(**args)
    modes = result["modes"]
    a, b = modes["in_learner"], modes["actors"]
    rss = lambda m: ", ".join(f"{k} {m['peak_rss_mb'][k]:.0f}" for k in ("learner", "rollout", "reward")  # noqa: E731
                              if k in m["peak_rss_mb"])
    lines = [
        f"mathprm/configs/ppo_arith.yaml, {args.updates} updates, the same seeds; policy `{args.policy}`, reward "
        f"`{args.prm}`; actors: one {args.backend} rollout engine and one reward worker (colocated; or "
        "separate, one update ahead)"
        f"{', ' + ' '.join(args.overrides) if args.overrides else ''}. Seconds are per update.",
        "",
        "| shape | episodes/s | tokens/s | sample s | score s | learn s | sync s | peak RSS MiB | "
        f"greedy arith:hard ({args.limit}) | held-out (run's own) |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name in SHAPES:
        m = modes[name]
        lines.append(f"| {name} | {m['episodes_per_s']:.2f} | {m['tokens_per_s']:.0f} | "
                     f"{m['rollout_s_per_update']:.2f} | {m['reward_s_per_update']:.2f} | "
                     f"{m['learner_s_per_update']:.2f} | {m['sync_s_per_update']:.3f} | {rss(m)} | "
                     f"{100 * m['greedy_arith_hard']:.1f} % | {100 * (m['held_out_accuracy'] or 0):.1f} % |")
    body = "\n".join(lines)
    print(body)
    if write:
        command = "python benchmarks/bench_ppo_scale.py " + " ".join(
            [f"--policy {args.policy} --prm {args.prm} --updates {args.updates} --limit {args.limit}",
             f"--backend {args.backend}", *args.overrides])
        value = (f"in-learner {a['episodes_per_s']:.2f} vs actors {b['episodes_per_s']:.2f} episodes/s; greedy after "
                 f"{args.updates} updates {100 * a['greedy_arith_hard']:.1f} % vs {100 * b['greedy_arith_hard']:.1f} %; "
                 f"peak RSS MiB in-learner ({rss(a)}) vs actors ({rss(b)})")
        write_section("PPO shapes: in-learner vs rollout + reward actors", command, body,
                      [("PPO shapes side by side (in-learner vs actors)", value)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
