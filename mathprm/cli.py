"""The `mathprm` command: one subcommand per stage, each taking `[--config FILE] [key=value ...]`.

    mathprm demo                         run the pipeline on its embedded default
    mathprm check-data [--config F] ...  gold answers vs reference solutions, on Ray
    mathprm sft [--config F] ...         fine-tune the arithmetic policy, on Ray Train
    mathprm mcts [--config F] ...        step labels by tree search, on Ray Data actors
    mathprm evaluate --policy DIR [--prm DIR] --dataset arith:hard --limit N --seed S \
        --strategies greedy,majority@8,best_of_n@8,guided@8,beam@8,dvts@8 --out FILE.json
                                         accuracy per decoding strategy, PRM-guided search
                                         included, + an accuracy-vs-N PNG
    mathprm train-prm [--config F] ...   train a process reward model on step labels, on Ray Train
    mathprm train-ppo [--config F] ...   PPO with per-step PRM reward, on Ray Train
    mathprm evaluate-prm --prm DIR --policy DIR --dataset arith:hard --limit N --seed S --out F.json
                                         step AUROC, first-error F1, best-of-n of a PRM
    mathprm processbench --prm DIR [--threshold T] ...
                                         a scorer on ProcessBench's four subsets (official metric)
    mathprm grade PRED GOLD              are two answers mathematically equivalent?

Every stage also takes its fields GNU-style (`--max-steps 10`); `mathprm CMD --help` lists them.
Errors in input (a bad config field, a malformed record, a missing file) print one line
naming what is wrong and exit with status 2, never a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mathprm.config import ConfigError, describe, parse_args

USAGE = __doc__
JOB_CONFIGS = Path(__file__).resolve().parents[1] / "jobs" / "configs"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        print(f"mathprm: unknown command {command!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    from mathprm.problems import BadRecordError

    try:
        return handler(rest)
    except (ConfigError, BadRecordError, FileNotFoundError) as e:
        print(f"mathprm {command}: {e}", file=sys.stderr)
        return 2


def _config(cls: type, argv: list[str]):
    """The stage's config from `[--config F] key=value ...`, or None after printing --help."""
    if "-h" in argv or "--help" in argv:
        print(describe(cls))
        return None
    return parse_args(cls, argv)


def _check_data(argv: list[str]) -> int:
    from mathprm.datacheck import DataCheckConfig, format_table, run_data_check

    if (cfg := _config(DataCheckConfig, argv)) is not None:
        print(format_table(run_data_check(cfg)))
    return 0


def _sft(argv: list[str]) -> int:
    from mathprm.sft import SFTConfig, train_sft

    if (cfg := _config(SFTConfig, argv)) is not None:
        print(f"[sft] policy: {train_sft(cfg)}")
    return 0


def _mcts(argv: list[str]) -> int:
    from mathprm.mcts import MCTSConfig, run_mcts

    if (cfg := _config(MCTSConfig, argv)) is not None:
        run_mcts(cfg)
    return 0


def _evaluate(argv: list[str]) -> int:
    from mathprm.evaluate import EvalConfig, format_table, run_evaluation

    if (cfg := _config(EvalConfig, argv)) is not None:
        report = run_evaluation(cfg)
        print(format_table(report))
        print(f"[evaluate] wrote {cfg.out_path}")
    return 0


def _train_prm(argv: list[str]) -> int:
    from mathprm.train_prm import TrainPRMConfig, train_prm

    if (cfg := _config(TrainPRMConfig, argv)) is not None:
        print(f"[train-prm] PRM: {train_prm(cfg)}")
    return 0


def _train_ppo(argv: list[str]) -> int:
    from mathprm.train_ppo import PPOConfig, train_ppo

    if (cfg := _config(PPOConfig, argv)) is not None:
        print(f"[ppo] policy: {train_ppo(cfg)}")
    return 0


def _evaluate_prm(argv: list[str]) -> int:
    from mathprm.evaluate_prm import PRMEvalConfig, format_report, run_prm_evaluation

    if (cfg := _config(PRMEvalConfig, argv)) is not None:
        print(format_report(run_prm_evaluation(cfg)))
        print(f"[evaluate-prm] wrote {cfg.out}")
    return 0


def _processbench(argv: list[str]) -> int:
    from mathprm.processbench import ProcessBenchConfig, format_table, run_processbench

    if (cfg := _config(ProcessBenchConfig, argv)) is not None:
        print(format_table(run_processbench(cfg)))
        print(f"[processbench] wrote {cfg.out}")
    return 0


def _demo(argv: list[str]) -> int:
    """The pipeline so far, on the embedded default: data check, base policy, its evaluation.

    1. the data check over the real data (or the bundled samples without it);
    2. the arithmetic policy from jobs/configs/sft_arith.yaml: trained (~15 min on 2 cores)
       into runs/arith/policy, or reused when a finished one is there;
    3. its greedy / majority@16 / pass@16 accuracy on fresh arith:hard test problems
       (jobs/configs/eval_arith.yaml);
    4. step labels by tree search on arith:hard training problems with that policy
       (jobs/configs/mcts_arith.yaml, DEMO_MCTS_LIMIT problems; a finished output is reused);
    5. a PRM trained on those labels from the policy's backbone (jobs/configs/prm_arith.yaml,
       reused when finished), then its step AUROC / first-error F1 / best-of-n on fresh
       arith:hard problems (jobs/configs/eval_prm_arith.yaml);
    6. PRM-guided search (guided, beam, dvts, best_of_n, weighted_majority) against greedy and
       majority at N = 1..16 on DEMO_SEARCH_LIMIT fresh arith:hard problems
       (jobs/configs/eval_guided_arith.yaml):
       the accuracy-vs-N table, runs/arith/eval.json and runs/arith/accuracy_vs_n.png;
    7. PPO of the policy with the PRM's per-step reward (jobs/configs/ppo_arith.yaml, at most
       DEMO_PPO_MINUTES, reused when finished) into runs/arith/policy-ppo, then the greedy
       accuracy of the PPO policy on stage 3's problems next to the base policy's.
    Arguments override one stage's fields, prefixed by the stage: `data.limit=20`,
    `sft.time_budget_min=5`, `eval.limit=50`, `mcts.method=omegaprm`, `prm.epochs=5`,
    `prm_eval.limit=50`, `search.limit=20`, `ppo.updates=10`, `ppo_eval.limit=50`.
    """
    from mathprm.config import load_config
    from mathprm.datacheck import DataCheckConfig, format_table, run_data_check
    from mathprm.evaluate import EvalConfig, run_evaluation
    from mathprm.evaluate import format_table as eval_table
    from mathprm.mcts import MCTSConfig, run_mcts
    from mathprm.problems import data_dir
    from mathprm.evaluate_prm import PRMEvalConfig, format_report, run_prm_evaluation
    from mathprm.sft import SFTConfig, train_sft
    from mathprm.train_ppo import PPOConfig, train_ppo
    from mathprm.train_prm import TrainPRMConfig, train_prm

    stages: dict[str, list[str]] = {"data": [], "sft": [], "eval": [], "mcts": [], "prm": [], "prm_eval": [],
                                   "search": [], "ppo": [], "ppo_eval": []}
    for arg in argv:
        stage, dot, rest = arg.partition(".")
        if not dot or stage not in stages or "=" not in rest:
            raise ConfigError(f"demo argument {arg!r}: use <stage>.<field>=<value> with stage one of "
                              f"{', '.join(stages)} (e.g. eval.limit=50)")
        stages[stage].append(rest)
    try:
        data_dir()
        datasets = ["math500", "gsm8k", "math_hard", "arith:hard"]
    except FileNotFoundError as e:
        print(f"[demo] {e}\n[demo] using the samples bundled with mathprm instead", flush=True)
        datasets = ["sample:math500", "sample:gsm8k", "arith:hard"]
    # Every config is read before any work starts, so a bad field fails in the first second.
    data_cfg = parse_args(DataCheckConfig, [f"datasets={datasets}", "out_dir=runs/demo/data_check", *stages["data"]])
    sft_cfg = load_config(SFTConfig, JOB_CONFIGS / "sft_arith.yaml", stages["sft"])
    eval_cfg = load_config(EvalConfig, JOB_CONFIGS / "eval_arith.yaml", stages["eval"])
    mcts_cfg = load_config(MCTSConfig, JOB_CONFIGS / "mcts_arith.yaml", [f"limit={DEMO_MCTS_LIMIT}", *stages["mcts"]])
    prm_cfg = load_config(TrainPRMConfig, JOB_CONFIGS / "prm_arith.yaml", stages["prm"])
    prm_eval_cfg = load_config(PRMEvalConfig, JOB_CONFIGS / "eval_prm_arith.yaml", stages["prm_eval"])
    search_cfg = load_config(EvalConfig, JOB_CONFIGS / "eval_guided_arith.yaml",
                             [f"limit={DEMO_SEARCH_LIMIT}", *stages["search"]])
    ppo_cfg = load_config(PPOConfig, JOB_CONFIGS / "ppo_arith.yaml",
                          [f"time_budget_min={DEMO_PPO_MINUTES}", *stages["ppo"]])
    ppo_eval_cfg = load_config(EvalConfig, JOB_CONFIGS / "eval_arith.yaml",
                               ["strategies=[greedy]", "out=runs/arith/eval/policy_ppo_arith_hard.json",
                                *stages["eval"], *stages["ppo_eval"]])
    print("[demo] 1/7 data check", flush=True)
    print(format_table(run_data_check(data_cfg)))
    print("[demo] 2/7 base policy (trained once, then reused)", flush=True)
    policy = train_sft(sft_cfg)
    print(f"[demo] 3/7 evaluating {policy} on {eval_cfg.dataset}", flush=True)
    eval_cfg.policy = str(policy)
    base_report = run_evaluation(eval_cfg)
    print(eval_table(base_report))
    print(f"[demo] report: {eval_cfg.out_path}")
    print(f"[demo] 4/7 step labels by tree search ({mcts_cfg.method}) on {mcts_cfg.limit} {mcts_cfg.dataset} "
          "training problems", flush=True)
    mcts_cfg.policy = str(policy)
    summary = run_mcts(mcts_cfg)
    quality = summary.get("quality") or {}
    print(f"[demo] {summary['labels']:,} labelled steps, {summary['n_rollouts']:,} rollouts; AUROC of the scores "
          f"against the exact step truth: {quality.get('auroc')}; right steps scored 0: "
          f"{quality.get('right_states_scored_0')} -> {mcts_cfg.out_dir}")
    print(f"[demo] 5/7 the PRM: trained on {mcts_cfg.out_dir}, evaluated on {prm_eval_cfg.limit} fresh "
          f"{prm_eval_cfg.dataset} problems", flush=True)
    prm_cfg.data, prm_cfg.base = mcts_cfg.out_dir, str(policy)
    prm = train_prm(prm_cfg)
    prm_eval_cfg.prm, prm_eval_cfg.policy = str(prm), str(policy)
    print(format_report(run_prm_evaluation(prm_eval_cfg)))
    print(f"[demo] PRM report: {prm_eval_cfg.out}")
    print(f"[demo] 6/7 PRM-guided search vs sampling on {search_cfg.limit} fresh {search_cfg.dataset} problems",
          flush=True)
    search_cfg.policy, search_cfg.prm = str(policy), str(prm)
    report = run_evaluation(search_cfg)
    print(eval_table(report))
    print(f"[demo] report: {search_cfg.out_path}; accuracy vs N: {report['plot']}")
    print(f"[demo] 7/7 PPO with the PRM's per-step reward ({ppo_cfg.mode}, {ppo_cfg.advantage}), then greedy "
          f"accuracy of the PPO policy on stage 3's problems", flush=True)
    ppo_cfg.policy, ppo_cfg.prm = str(policy), str(prm)
    ppo_policy = train_ppo(ppo_cfg)
    ppo_eval_cfg.policy = str(ppo_policy)
    ppo_report = run_evaluation(ppo_eval_cfg)
    base, after = (r["strategies"]["greedy"]["accuracy"] for r in (base_report, ppo_report))
    print(f"[demo] greedy accuracy on {ppo_eval_cfg.limit} {ppo_eval_cfg.dataset} problems: base policy "
          f"{100 * base:.1f} %, PPO policy {100 * after:.1f} % ({ppo_policy}; curves: {ppo_policy / 'ppo_curves.png'})")
    return 0


DEMO_MCTS_LIMIT = 50  # problems the demo labels (the job's config says 200)
DEMO_PPO_MINUTES = 10  # PPO's time budget in the demo (the job's config says 20)
DEMO_SEARCH_LIMIT = 50  # problems the demo searches (the job's config says 100; ~2 s of PRM scoring per
#                         problem and strategy on 2 cores)


def _grade(argv: list[str]) -> int:
    from mathprm.grading import is_equivalent

    if len(argv) != 2:
        raise ConfigError("usage: mathprm grade PRED GOLD")
    equal = is_equivalent(argv[0], argv[1])
    print("equivalent" if equal else "not equivalent")
    return 0 if equal else 1


COMMANDS = {"demo": _demo, "check-data": _check_data, "sft": _sft, "mcts": _mcts, "evaluate": _evaluate,
            "train-prm": _train_prm, "train-ppo": _train_ppo, "evaluate-prm": _evaluate_prm, "processbench": _processbench, "grade": _grade}

if __name__ == "__main__":
    sys.exit(main())
