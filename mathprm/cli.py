"""The `mathprm` command: one subcommand per stage, each taking `[--config FILE] [key=value ...]`.

    mathprm demo                         run the pipeline on its embedded default
    mathprm check-data [--config F] ...  gold answers vs reference solutions, on Ray
    mathprm sft [--config F] ...         fine-tune the arithmetic policy, on Ray Train
    mathprm grade PRED GOLD              are two answers mathematically equivalent?

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


def _demo(argv: list[str]) -> int:
    """Today the demo is the data check over the real data (or the bundled samples without it).

    Later stages (arithmetic world, tree search, PRM, guided search, PPO) extend it.
    """
    from mathprm.datacheck import DataCheckConfig, format_table, run_data_check
    from mathprm.problems import data_dir

    try:
        data_dir()
        datasets = ["math500", "gsm8k", "math_hard", "arith:hard"]
    except FileNotFoundError as e:
        print(f"[demo] {e}\n[demo] using the samples bundled with mathprm instead", flush=True)
        datasets = ["sample:math500", "sample:gsm8k", "arith:hard"]
    cfg = parse_args(DataCheckConfig, [f"datasets={datasets}", "out_dir=runs/demo/data_check", *argv])
    print(format_table(run_data_check(cfg)))
    return 0


def _grade(argv: list[str]) -> int:
    from mathprm.grading import is_equivalent

    if len(argv) != 2:
        raise ConfigError("usage: mathprm grade PRED GOLD")
    equal = is_equivalent(argv[0], argv[1])
    print("equivalent" if equal else "not equivalent")
    return 0 if equal else 1


COMMANDS = {"demo": _demo, "check-data": _check_data, "sft": _sft, "grade": _grade}

if __name__ == "__main__":
    sys.exit(main())
