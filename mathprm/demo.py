"""`mathprm demo` (`make demo`): the whole arithmetic-world pipeline on a local Ray, with a report.

1. the data check over the real data (or the bundled samples without it);
2. the base policy (mathprm/configs/sft_arith.yaml);
3. the checker, the PRM's backbone: the base policy trained on, annealed (checker_arith.yaml);
4. the base policy's greedy / majority@16 / pass@16 on fresh arith:hard problems (eval_arith.yaml);
5. step labels by tree search (mcts_arith.yaml, DEMO_MCTS_LIMIT problems);
6. a PRM on those labels over the checker (prm_arith.yaml), then its step AUROC / first-error F1 /
   best-of-n (eval_prm_arith.yaml);
7. PRM-guided search against sampling at N = 1..16 (eval_guided_arith.yaml, DEMO_SEARCH_LIMIT
   problems): the accuracy-vs-N table and PNG;
8. PPO of the policy with the PRM's per-step reward (ppo_arith.yaml, DEMO_PPO_UPDATES updates; a rollout
   engine and a reward worker as Ray actors beside the learner, weights synced after every update),
   then the PPO policy's greedy accuracy on stage 4's problems.

Finished stages are reused: the policy, the labels, the PRM and the PPO policy by their own
"finished" markers, and each evaluation report while it was made with the same settings from
the same models (a stamp beside the report). So a second run skips the work already done. The
run ends with a table of stage times and writes `<root>/report.md` with every table and the
PNG plots.
`--quick` runs every stage tiny under runs/quick/ (QUICK; what the integration test runs).
Arguments `<stage>.<field>=<value>` override one stage's config (`eval.limit=50`).
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from mathprm import atomic
from mathprm.config import ConfigError, load_config, parse_args, to_dict

# The stage configs ship inside the package (package data: pyproject.toml), so an installed wheel
# has them too; never found through the repository's layout.
STAGE_CONFIGS = resources.files("mathprm") / "configs"
STAGES = ("data", "sft", "checker", "eval", "mcts", "prm", "prm_eval", "search", "ppo", "ppo_eval")
DEMO_MCTS_LIMIT = 50  # problems the demo labels (the job's config says 200)
DEMO_SEARCH_LIMIT = 50  # problems the demo searches (the job's config says 100; PRM scoring dominates)
# PPO's length in the demo counts updates, not minutes, so a second run on any machine trains the same
# weights (the job's config says 200 updates or 20 min). The clock is only a cap.
DEMO_PPO_UPDATES = 36
DEMO_PPO_MAX_MINUTES = 15

# Every stage tiny: a 2-layer policy trained 10 steps, a handful of problems per stage. It shows
# that every stage runs and hands its output to the next, not how good anything is. One SFT worker
# (the policy and the checker): a second one costs a process start and gloo on a 2-core box, and
# two DDP workers are the SFT test's (tests/test_sft.py).
QUICK: dict[str, list[str]] = {
    "data": ["limit=10"],
    "sft": ["preset=test", "num_problems=64", "batch_size=8", "max_steps=10", "log_every=5", "checkpoint_every=10",
            "time_budget_min=null", "stop_at_accuracy=null", "num_workers=1"],
    "checker": ["num_problems=64", "batch_size=8", "max_steps=10", "log_every=5", "checkpoint_every=10",
                "time_budget_min=null", "num_workers=1"],
    "eval": ["limit=3", "strategies=[greedy, majority@2, pass@2]", "max_solution_tokens=24"],
    "mcts": ["limit=2", "num_solutions=2", "rollouts_per_step=2", "max_solution_tokens=24", "num_actors=1"],
    "prm": ["epochs=1", "batch_size=1", "num_workers=1", "val_fraction=0", "log_every=1", "eval_every=1",
            "checkpoint_every=1"],
    "prm_eval": ["limit=2", "n=2", "max_solution_tokens=24"],
    "search": ["limit=2", "max_solution_tokens=24", "max_steps=3", "max_step_tokens=12",
               "strategies=[greedy, majority@1, majority@2, best_of_n@2, guided@1, guided@2, beam@2, dvts@2]"],
    "ppo": ["updates=2", "num_problems=20", "prompts_per_update=2", "group_size=2", "minibatch_size=4",
            "eval_problems=2", "max_step_tokens=12", "max_solution_tokens=24", "cpus_per_worker=1"],
    "ppo_eval": [],
}


_C = TypeVar("_C")


def stage_config(cls: type[_C], name: str, overrides: list[str]) -> _C:
    """`cls` from the bundled config `name` (mathprm/configs/name), then `key=value` overrides."""
    with resources.as_file(STAGE_CONFIGS / name) as path:  # a real file even from a zipped install
        return load_config(cls, path, overrides)


def stage_args(argv: list[str]) -> tuple[bool, dict[str, list[str]]]:
    """(quick, the overrides of each stage) from the command line; ConfigError for anything else."""
    quick = "--quick" in argv
    stages: dict[str, list[str]] = {s: [] for s in STAGES}
    for arg in (a for a in argv if a != "--quick"):
        stage, dot, rest = arg.partition(".")
        if not dot or stage not in stages or "=" not in rest:
            raise ConfigError(f"demo argument {arg!r}: use --quick or <stage>.<field>=<value> with stage one of "
                              f"{', '.join(STAGES)} (e.g. eval.limit=50)")
        stages[stage].append(rest)
    return quick, stages


def _paths(root: Path) -> dict[str, list[str]]:
    """Every stage's outputs under `root` (runs/arith for the real demo, runs/quick for --quick)."""
    return {
        "data": [f"out_dir={root / 'data_check'}"],
        "sft": [f"out_dir={root / 'policy'}"],
        "checker": [f"out_dir={root / 'checker'}"],
        "eval": [f"out={root / 'eval' / 'policy_arith_hard.json'}"],
        "mcts": [f"out_dir={root / 'mcts'}"],
        "prm": [f"out_dir={root / 'prm'}"],
        "prm_eval": [f"out={root / 'prm_eval.json'}"],
        "search": [f"out={root / 'eval.json'}", f"plot={root / 'accuracy_vs_n.png'}"],
        "ppo": [f"out_dir={root / 'policy-ppo'}"],
        "ppo_eval": [f"out={root / 'eval' / 'policy_ppo_arith_hard.json'}"],
    }


def _reused_report(out: Path, cfg: Any, models: list[str], run: Callable[[], dict]) -> tuple[dict, bool]:
    """`run()`'s report, or the one at `out` when a stamp says it was made with the same config
    from the same model directories (their summary files unchanged)."""
    def mtimes() -> dict[str, float]:
        return {m: max((f.stat().st_mtime for f in Path(m).glob("*_summary.json")), default=0.0) for m in models
                if m and m != "oracle"}

    stamp = out.with_name(out.name + ".demo-stamp.json")
    want = {"config": json.loads(json.dumps(to_dict(cfg), default=str)), "models": mtimes()}
    if out.is_file() and stamp.is_file():
        try:  # a damaged report or stamp is named and made again: it is a cache
            if atomic.read_json(stamp, "evaluating again") == want:
                report = atomic.read_json(out, "evaluating again")
                print(f"[demo] reusing {out} (same settings and models)", flush=True)
                return report, True
        except ConfigError as e:
            print(f"[demo] {e}", flush=True)
    report = run()
    atomic.write_json(stamp, want)
    return report, False


def run_demo(argv: list[str]) -> int:
    from mathprm.data.check import DataCheckConfig, format_check, run_data_check
    from mathprm.data.problems import data_dir
    from mathprm.eval.evaluate import EvalConfig, run_evaluation
    from mathprm.eval.evaluate import format_evaluation as eval_table
    from mathprm.eval.prm import PRMEvalConfig, format_report, run_prm_evaluation
    from mathprm.labels.stage import MCTSConfig, run_mcts
    from mathprm.train import ppo, prm, sft
    from mathprm.train.ppo import PPOConfig, train_ppo
    from mathprm.train.prm import TrainPRMConfig, train_prm
    from mathprm.train.sft import SFTConfig, train_sft

    sft_finished, prm_finished = sft.SFT_STAGE.is_finished, prm.PRM_STAGE.is_finished
    ppo_finished = ppo.PPO_STAGE.is_finished

    quick, user = stage_args(argv)
    root = Path("runs/quick" if quick else "runs/arith")
    paths = _paths(root)
    args = {s: [*paths[s], *(QUICK[s] if quick else []), *user[s]] for s in STAGES}
    try:
        data_dir()
        datasets = ["math500", "gsm8k", "math_hard", "arith:hard"]
    except FileNotFoundError as e:
        print(f"[demo] {e}\n[demo] using the samples bundled with mathprm instead", flush=True)
        datasets = ["sample:math500", "sample:gsm8k", "arith:hard"]
    # Every config is read before any work starts, so a bad field fails in the first second.
    data_cfg = parse_args(DataCheckConfig, [f"datasets={datasets}", *args["data"]])
    sft_cfg = stage_config(SFTConfig, "sft_arith.yaml", args["sft"])
    checker_cfg = stage_config(SFTConfig, "checker_arith.yaml", args["checker"])
    eval_cfg = stage_config(EvalConfig, "eval_arith.yaml", args["eval"])
    mcts_cfg = stage_config(MCTSConfig, "mcts_arith.yaml", [f"limit={DEMO_MCTS_LIMIT}", *args["mcts"]])
    prm_cfg = stage_config(TrainPRMConfig, "prm_arith.yaml", args["prm"])
    prm_eval_cfg = stage_config(PRMEvalConfig, "eval_prm_arith.yaml", args["prm_eval"])
    search_cfg = stage_config(EvalConfig, "eval_guided_arith.yaml",
                              [f"limit={DEMO_SEARCH_LIMIT}", *args["search"]])
    ppo_cfg = stage_config(PPOConfig, "ppo_arith.yaml", [f"updates={DEMO_PPO_UPDATES}",
                                                         f"time_budget_min={DEMO_PPO_MAX_MINUTES}",
                                                         *args["ppo"]])
    # The PPO policy is judged on stage 4's problems with stage 4's settings, greedy only.
    ppo_eval_cfg = stage_config(EvalConfig, "eval_arith.yaml",
                                [*args["eval"], "strategies=[greedy]", *args["ppo_eval"]])

    times: list[tuple[str, float, bool]] = []
    sections: list[str] = []  # report.md's parts
    started = time.monotonic()

    def stage(title: str, body: Callable[[], bool]) -> None:
        print(f"[demo] {len(times) + 1}/8 {title}", flush=True)
        t0 = time.monotonic()
        reused = body()
        times.append((title, time.monotonic() - t0, reused))

    state: dict[str, Any] = {}

    def data() -> bool:
        table = format_check(run_data_check(data_cfg))
        print(table)
        sections.append(f"## 1. Data check\n\n{table}")
        return False

    def policy() -> bool:
        reused = sft_finished(sft_cfg.out_dir) and not sft_cfg.overwrite
        state["policy"] = train_sft(sft_cfg)
        return reused

    def checker() -> bool:
        reused = sft_finished(checker_cfg.out_dir) and not checker_cfg.overwrite
        checker_cfg.init_from = str(state["policy"])
        state["checker"] = train_sft(checker_cfg)
        return reused

    def base_eval() -> bool:
        eval_cfg.policy = str(state["policy"])
        report, again = _reused_report(eval_cfg.out_path, eval_cfg, [eval_cfg.policy], lambda: run_evaluation(eval_cfg))
        state["base_report"] = report
        table = eval_table(report)
        print(table)
        sections.append(f"## 2-4. The base policy `{state['policy']}` (checker `{state['checker']}`) and its "
                        f"accuracy\n\n```\n{table}\n```")
        return again

    def labels() -> bool:
        mcts_cfg.policy = str(state["policy"])
        summary = run_mcts(mcts_cfg)
        quality = summary.get("quality") or {}
        line = (f"{summary['labels']:,} labelled steps of {summary['problems']} {mcts_cfg.dataset} problems "
                f"({mcts_cfg.method}), {summary['n_rollouts']:,} rollouts; AUROC of the scores against the exact step "
                f"truth: {quality.get('auroc')}; right steps scored 0: {quality.get('right_states_scored_0')}")
        print(f"[demo] {line} -> {mcts_cfg.out_dir}")
        sections.append(f"## 5. Step labels by tree search\n\n{line} (`{mcts_cfg.out_dir}`)")
        return summary.get("searched_this_run", 1) == 0

    def prm() -> bool:
        reused = prm_finished(prm_cfg.out_dir) and not prm_cfg.overwrite
        prm_cfg.data, prm_cfg.base = mcts_cfg.out_dir, str(state["checker"])
        state["prm"] = prm_dir = train_prm(prm_cfg)
        prm_eval_cfg.prm, prm_eval_cfg.policy = str(prm_dir), str(state["policy"])
        report, again = _reused_report(Path(prm_eval_cfg.out), prm_eval_cfg, [prm_eval_cfg.prm, prm_eval_cfg.policy],
                                       lambda: run_prm_evaluation(prm_eval_cfg))
        text = format_report(report)
        print(text)
        sections.append(f"## 6. The PRM `{prm_dir}`\n\n```\n{text}\n```")
        return reused and again

    def search() -> bool:
        search_cfg.policy, search_cfg.prm = str(state["policy"]), str(state["prm"])
        report, again = _reused_report(search_cfg.out_path, search_cfg, [search_cfg.policy, search_cfg.prm],
                                       lambda: run_evaluation(search_cfg))
        table = eval_table(report)
        print(table)
        plot = Path(report["plot"]) if report.get("plot") else None
        image = f"\n\n![accuracy vs N]({_relative(plot, root)})" if plot else ""
        sections.append(f"## 7. PRM-guided search vs sampling\n\n```\n{table}\n```{image}")
        return again

    def rl() -> bool:
        reused = ppo_finished(ppo_cfg.out_dir) and not ppo_cfg.overwrite
        ppo_cfg.policy, ppo_cfg.prm = str(state["policy"]), str(state["prm"])
        ppo_dir = train_ppo(ppo_cfg)
        ppo_eval_cfg.policy = str(ppo_dir)
        report, again = _reused_report(ppo_eval_cfg.out_path, ppo_eval_cfg, [ppo_eval_cfg.policy],
                                       lambda: run_evaluation(ppo_eval_cfg))
        base, after = (r["strategies"]["greedy"]["accuracy"] for r in (state["base_report"], report))
        line = (f"greedy accuracy on {ppo_eval_cfg.limit} {ppo_eval_cfg.dataset} problems: base policy "
                f"{100 * base:.1f} %, PPO policy {100 * after:.1f} %")
        print(f"[demo] {line} ({ppo_dir}; curves: {ppo_dir / 'ppo_curves.png'})")
        curves = _relative(ppo_dir / "ppo_curves.png", root)
        sections.append(f"## 8. PPO with the PRM's per-step reward ({ppo_cfg.mode}, {ppo_cfg.advantage})\n\n"
                        f"{line.capitalize()}.\n\n![PPO curves]({curves})")
        return reused and again

    stage("data check", data)
    stage("base policy (trained once, then reused)", policy)
    stage("the checker: the base policy trained on and annealed, the PRM's backbone (trained once, then reused)",
          checker)
    stage(f"evaluating the base policy on {eval_cfg.limit} fresh {eval_cfg.dataset} problems", base_eval)
    stage(f"step labels by tree search ({mcts_cfg.method}) on {mcts_cfg.limit} {mcts_cfg.dataset} training problems",
          labels)
    stage(f"the PRM: trained on {mcts_cfg.out_dir}, evaluated on {prm_eval_cfg.limit} fresh {prm_eval_cfg.dataset} "
          "problems", prm)
    stage(f"PRM-guided search vs sampling on {search_cfg.limit} fresh {search_cfg.dataset} problems", search)
    stage(f"PPO with the PRM's per-step reward ({ppo_cfg.mode}, {ppo_cfg.advantage}), then the PPO policy's "
          "greedy accuracy", rl)
    total = time.monotonic() - started
    timing = ["| stage | minutes | |", "|---|---:|---|"]
    timing += [f"| {t} | {s / 60:.1f} | {'reused' if r else ''} |" for t, s, r in times]
    timing.append(f"| **total** | **{total / 60:.1f}** | |")
    print("\n".join(timing))
    report_md = root / "report.md"
    header = (f"# mathprm demo report{' (--quick: every stage tiny)' if quick else ''}\n\n"
              f"{datetime.datetime.now().isoformat(timespec='seconds')}; `mathprm demo {' '.join(argv)}`\n\n"
              "## Stage times\n\n" + "\n".join(timing))
    atomic.write_text(report_md, "\n\n".join([header, *sections]) + "\n")
    print(f"[demo] report: {report_md}", flush=True)
    return 0


def _relative(path: Path, root: Path) -> str:
    """`path` as a link from `root`/report.md."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(Path(path).resolve())
