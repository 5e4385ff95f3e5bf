"""The `mathprm` command: one subcommand per stage, each taking `[--config FILE] [key=value ...]`.

    mathprm demo [--quick] [stage.field=value ...]
                                         the whole pipeline on its embedded default + report
    mathprm check-data [--config F] ...  gold answers vs reference solutions, on Ray
    mathprm sft [--config F] ...         fine-tune the arithmetic policy, on Ray Train
    mathprm mcts [--config F] ...        step labels by tree search, on Ray Data actors
    mathprm evaluate --policy DIR [--prm DIR] --dataset arith:hard --limit N --seed S \
        --strategies greedy,majority@8,best_of_n@8,guided@8,beam@8,dvts@8 --out FILE.json
                                         accuracy per decoding strategy, PRM-guided search
                                         included, + an accuracy-vs-N PNG
    mathprm train-prm [--config F] ...   train a process reward model on step labels, on Ray Train
    mathprm prm-prior base=DIR out_dir=DIR [separator=...]
                                         a PRM with no training: an LM's lowest step log-prob so far
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

from mathprm.config import ConfigError, describe, parse_args

USAGE = __doc__


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
    from mathprm.data.problems import BadRecordError

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
    from mathprm.data.check import DataCheckConfig, format_table, run_data_check

    if (cfg := _config(DataCheckConfig, argv)) is not None:
        print(format_table(run_data_check(cfg)))
    return 0


def _sft(argv: list[str]) -> int:
    from mathprm.train.sft import SFTConfig, train_sft

    if (cfg := _config(SFTConfig, argv)) is not None:
        print(f"[sft] policy: {train_sft(cfg)}")
    return 0


def _mcts(argv: list[str]) -> int:
    from mathprm.labels.stage import MCTSConfig, run_mcts

    if (cfg := _config(MCTSConfig, argv)) is not None:
        run_mcts(cfg)
    return 0


def _evaluate(argv: list[str]) -> int:
    from mathprm.eval.evaluate import EvalConfig, format_table, run_evaluation

    if (cfg := _config(EvalConfig, argv)) is not None:
        report = run_evaluation(cfg)
        print(format_table(report))
        print(f"[evaluate] wrote {cfg.out_path}")
    return 0


def _train_prm(argv: list[str]) -> int:
    from mathprm.train.prm import TrainPRMConfig, train_prm

    if (cfg := _config(TrainPRMConfig, argv)) is not None:
        print(f"[train-prm] PRM: {train_prm(cfg)}")
    return 0


def _prm_prior(argv: list[str]) -> int:
    from mathprm.train.prm import PriorPRMConfig, save_prior_prm

    if (cfg := _config(PriorPRMConfig, argv)) is not None:
        print(f"[prm-prior] PRM: {save_prior_prm(cfg)}")
    return 0


def _train_ppo(argv: list[str]) -> int:
    from mathprm.train.ppo import PPOConfig, train_ppo

    if (cfg := _config(PPOConfig, argv)) is not None:
        print(f"[ppo] policy: {train_ppo(cfg)}")
    return 0


def _evaluate_prm(argv: list[str]) -> int:
    from mathprm.eval.prm import PRMEvalConfig, format_report, run_prm_evaluation

    if (cfg := _config(PRMEvalConfig, argv)) is not None:
        print(format_report(run_prm_evaluation(cfg)))
        print(f"[evaluate-prm] wrote {cfg.out}")
    return 0


def _processbench(argv: list[str]) -> int:
    from mathprm.eval.processbench import (
        ProcessBenchConfig,
        format_table,
        run_processbench,
    )

    if (cfg := _config(ProcessBenchConfig, argv)) is not None:
        print(format_table(run_processbench(cfg)))
        print(f"[processbench] wrote {cfg.out}")
    return 0


def _demo(argv: list[str]) -> int:
    from mathprm.demo import run_demo

    return run_demo(argv)


def _grade(argv: list[str]) -> int:
    from mathprm.data.grading import is_equivalent

    if len(argv) != 2:
        raise ConfigError("usage: mathprm grade PRED GOLD")
    equal = is_equivalent(argv[0], argv[1])
    print("equivalent" if equal else "not equivalent")
    return 0 if equal else 1


COMMANDS = {"demo": _demo, "check-data": _check_data, "sft": _sft, "mcts": _mcts, "evaluate": _evaluate,
            "train-prm": _train_prm, "prm-prior": _prm_prior, "train-ppo": _train_ppo, "evaluate-prm": _evaluate_prm,
            "processbench": _processbench, "grade": _grade}

if __name__ == "__main__":
    sys.exit(main())
