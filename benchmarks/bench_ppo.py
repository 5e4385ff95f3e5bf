"""PPO with per-step reward against issue 7's targets, on fresh arith test problems.

    python benchmarks/bench_ppo.py [--policy runs/arith/policy] [--prm runs/arith/prm|oracle|none] \
        [--minutes 20] [--variants one_step:gae,one_step:grpo,full_solution:gae,full_solution:grpo] \
        [--limit 200] [--guided 0] [--tag NAME] [--reuse] [--write] [key=value ...]

For each variant (episode mode x advantage estimator) this trains a PPO policy from
mathprm/configs/ppo_arith.yaml for at most `--minutes` (extra `key=value` go to every run) into
runs/bench/ppo/<prm>/<mode>_<advantage>[_<tag>], then measures greedy accuracy of the base policy and of
each PPO policy on `--limit` fresh arith:hard and arith:easy test problems (`mathprm
evaluate`, seed 0). Targets: arith:hard greedy at least 20 % higher (relative) than the
base's, arith:easy not more than 1 point lower. `--guided N` also compares guided@8 of the
base and the PPO policies (with the same PRM) on N hard problems. Each run's curves go to
docs/img/ppo_<prm>_<mode>_<advantage>[_<tag>].png; with --write the table replaces the
"PPO with per-step reward (<prm>[, <tag>])" section of docs/BENCHMARKS.md. `--tag` names a
recipe (the extra key=value) so that its runs, plots and section sit beside the default's.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import repo_relative, write_section  # noqa: E402

from mathprm.config import load_config  # noqa: E402
from mathprm.eval.evaluate import EvalConfig, run_evaluation  # noqa: E402
from mathprm.scorer import parse_prm  # noqa: E402
from mathprm.train.ppo import PPO_STAGE, PPOConfig, train_ppo  # noqa: E402

SUMMARY_FILE = PPO_STAGE.summary_file


def greedy(policy: Path, dataset: str, limit: int, tag: str) -> float:
    cfg = EvalConfig(policy=str(policy), dataset=dataset, limit=limit, seed=0, strategies=["greedy"],
                     out=str(REPO / "runs" / "bench" / "ppo" / f"eval_{tag}_{dataset.replace(':', '_')}.json"))
    return run_evaluation(cfg)["strategies"]["greedy"]["accuracy"]


def guided(policy: Path, prm: str, limit: int, tag: str) -> float:
    cfg = EvalConfig(policy=str(policy), prm=prm, dataset="arith:hard", limit=limit, seed=0,
                     strategies=["guided@8"], out=str(REPO / "runs" / "bench" / "ppo" / f"guided_{tag}.json"))
    return run_evaluation(cfg)["strategies"]["guided@8"]["accuracy"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="runs/arith/policy")
    ap.add_argument("--prm", default="runs/arith/prm")
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--variants", default="one_step:gae,one_step:grpo,full_solution:gae,full_solution:grpo")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--guided", type=int, default=0)
    ap.add_argument("--tag", default="", help="a name for this recipe: kept apart in runs/, docs/img and the docs")
    ap.add_argument("--reuse", action="store_true", help="keep finished PPO policies instead of retraining")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    policy = (REPO / args.policy).resolve()
    named = parse_prm(args.prm).path is None  # no directory: the exact checker, or no step reward at all
    prm = args.prm if named else str((REPO / args.prm).resolve())
    prm_name = args.prm if named else "prm"
    base = {d: greedy(policy, d, args.limit, "base") for d in ("arith:hard", "arith:easy")}
    base_guided = guided(policy, prm, args.guided, "base") if args.guided and not named else None
    rows = []
    for variant in args.variants.split(","):
        mode, advantage = variant.split(":")
        run_name = f"{mode}_{advantage}" + (f"_{args.tag}" if args.tag else "")
        out = REPO / "runs" / "bench" / "ppo" / prm_name / run_name
        cfg = load_config(PPOConfig, REPO / "mathprm" / "configs" / "ppo_arith.yaml", [
            f"policy={policy}", f"prm={prm}", f"mode={mode}", f"advantage={advantage}",
            f"time_budget_min={args.minutes}", f"out_dir={out}", f"overwrite={not args.reuse}", *args.overrides])
        if not (args.reuse and (out / SUMMARY_FILE).is_file()):
            train_ppo(cfg)
        summary = json.loads((out / SUMMARY_FILE).read_text())
        history = [json.loads(line) for line in (out / "ppo_metrics.jsonl").read_text().splitlines()]
        img = REPO / "docs" / "img" / f"ppo_{prm_name}_{run_name}.png"
        shutil.copyfile(out / "ppo_curves.png", img)
        after = {d: greedy(out, d, args.limit, f"{prm_name}_{run_name}") for d in ("arith:hard", "arith:easy")}
        trained = [h for h in history if "reward" in h]
        k = max(1, len(trained) // 5)
        row = {
            "variant": f"{mode} / {advantage}", "updates": summary["updates"],
            "minutes": summary["elapsed_s"] / 60,
            "reward_first": sum(h["reward"] for h in trained[:k]) / k,
            "reward_last": sum(h["reward"] for h in trained[-k:]) / k,
            "kl_last": trained[-1]["kl"], "hard": after["arith:hard"], "easy": after["arith:easy"],
            "hard_rel": after["arith:hard"] / base["arith:hard"] - 1 if base["arith:hard"] else float("nan"),
            "easy_drop": base["arith:easy"] - after["arith:easy"],
            "plot": str(repo_relative(img)),
        }
        if base_guided is not None:
            row["guided"] = guided(out, prm, args.guided, f"{prm_name}_{run_name}")
        row["targets"] = row["hard_rel"] >= 0.20 and row["easy_drop"] <= 0.01
        rows.append(row)
        print(json.dumps(row), flush=True)

    lines = [
        f"Base policy `{repo_relative(policy)}`: greedy {100 * base['arith:hard']:.1f} % on arith:hard, "
        f"{100 * base['arith:easy']:.1f} % on arith:easy ({args.limit} fresh test problems each, seed 0). "
        f"Reward: {'none per step, only the outcome bonus' if args.prm == 'none' else f'`{args.prm}`'}; "
        f"each run at most {args.minutes:g} minutes "
        f"(mathprm/configs/ppo_arith.yaml{', ' + ' '.join(args.overrides) if args.overrides else ''}).",
        "",
        "| mode / advantage | updates | min | reward first -> last 20 % | KL (last) | hard greedy | "
        "rel. change | easy greedy | easy drop | targets |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['updates']} | {r['minutes']:.1f} | {r['reward_first']:.3f} -> "
                     f"{r['reward_last']:.3f} | {r['kl_last']:.3f} | {100 * r['hard']:.1f} % | "
                     f"{100 * r['hard_rel']:+.0f} % | {100 * r['easy']:.1f} % | {100 * r['easy_drop']:+.1f} | "
                     f"{'met' if r['targets'] else 'not met'} |")
    if base_guided is not None:
        lines += ["", f"guided@8 on {args.guided} arith:hard problems with the same PRM: base policy "
                  f"{100 * base_guided:.1f} %; " + ", ".join(f"{r['variant']} {100 * r['guided']:.1f} %" for r in rows)]
    lines += ["", "Curves (reward, held-out accuracy, KL, clip fraction, entropy, value loss per update): "
              + ", ".join(f"[{r['variant']}]({Path(r['plot']).relative_to('docs')})" for r in rows)]
    body = "\n".join(lines)
    print(body)
    if args.write:
        command = "python benchmarks/bench_ppo.py " + " ".join(sys.argv[1:])
        inner = f"{prm_name}{', ' + args.tag if args.tag else ''}"
        # Its row of the doc's figures table: greedy before -> after per variant.
        value = "; ".join(
            f"{r['variant']}: {100 * base['arith:hard']:.1f} % -> {100 * r['hard']:.1f} % "
            f"({100 * r['hard_rel']:+.0f} %), "
            f"arith:easy {100 * base['arith:easy']:.1f} % -> {100 * r['easy']:.1f} %, "
            f"{r['updates']} updates in {r['minutes']:.1f} min"
            + (f", guided@8 {100 * base_guided:.1f} % -> {100 * r['guided']:.1f} % ({args.guided} problems)"
               if base_guided is not None else "") for r in rows)
        write_section(f"PPO with per-step reward ({inner})", command.replace(" --write", ""), body,
                      [(f"PPO greedy on arith:hard, before -> after ({inner})", value)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
