"""The `mathprm` command: one subcommand per stage, each taking `[--config FILE] [key=value ...]`.

    mathprm demo                         run the pipeline on its embedded default
    mathprm check-data [--config F] ...  gold answers vs reference solutions, on Ray
    mathprm sft [--config F] ...         fine-tune the arithmetic policy, on Ray Train
    mathprm evaluate --policy DIR --dataset arith:hard --limit N --seed S \
        --strategies greedy,majority@16,pass@16 --out FILE.json
                                         accuracy of a policy per decoding strategy
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


def _evaluate(argv: list[str]) -> int:
    from mathprm.evaluate import EvalConfig, format_table, run_evaluation

    if (cfg := _config(EvalConfig, argv)) is not None:
        report = run_evaluation(cfg)
        print(format_table(report))
        print(f"[evaluate] wrote {cfg.out_path}")
    return 0


def _demo(argv: list[str]) -> int:
    """The pipeline so far, on the embedded default: data check, base policy, its evaluation.

    1. the data check over the real data (or the bundled samples without it);
    2. the arithmetic policy from jobs/configs/sft_arith.yaml: trained (~15 min on 2 cores)
       into runs/arith/policy, or reused when a finished one is there;
    3. its greedy / majority@16 / pass@16 accuracy on fresh arith:hard test problems
       (jobs/configs/eval_arith.yaml).
    Arguments override one stage's fields, prefixed by the stage: `data.limit=20`,
    `sft.time_budget_min=5`, `eval.limit=50`. Later stages extend it.
    """
    from mathprm.config import load_config
    from mathprm.datacheck import DataCheckConfig, format_table, run_data_check
    from mathprm.evaluate import EvalConfig, run_evaluation
    from mathprm.evaluate import format_table as eval_table
    from mathprm.problems import data_dir
    from mathprm.sft import SFTConfig, train_sft

    stages: dict[str, list[str]] = {"data": [], "sft": [], "eval": []}
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
    print("[demo] 1/3 data check", flush=True)
    print(format_table(run_data_check(data_cfg)))
    print("[demo] 2/3 base policy (trained once, then reused)", flush=True)
    policy = train_sft(sft_cfg)
    print(f"[demo] 3/3 evaluating {policy} on {eval_cfg.dataset}", flush=True)
    eval_cfg.policy = str(policy)
    print(eval_table(run_evaluation(eval_cfg)))
    print(f"[demo] report: {eval_cfg.out_path}")
    return 0


def _grade(argv: list[str]) -> int:
    from mathprm.grading import is_equivalent

    if len(argv) != 2:
        raise ConfigError("usage: mathprm grade PRED GOLD")
    equal = is_equivalent(argv[0], argv[1])
    print("equivalent" if equal else "not equivalent")
    return 0 if equal else 1


COMMANDS = {"demo": _demo, "check-data": _check_data, "sft": _sft, "evaluate": _evaluate, "grade": _grade}

if __name__ == "__main__":
    sys.exit(main())
