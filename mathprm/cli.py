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

import dataclasses
import importlib
import re
import sys
from collections.abc import Callable
from typing import Any

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
    try:
        return handler(rest)
    except Exception as e:
        line = input_error(e)
        if line is None:
            raise
        print(f"mathprm {command}: {line}", file=sys.stderr)
        return 2


def input_error(e: BaseException) -> str | None:
    """The line to print for an error in the input (a config field, a record, a missing file, a
    damaged output or model directory: `ConfigError` and its kinds, `BadRecordError`,
    `FileNotFoundError`), also when a Ray worker raised it and Ray handed it back wrapped in its
    own error with the worker's traceback: the original is the error's `cause` (a task), the
    `__cause__` of Ray Data's error, or, when an actor died in its constructor, only the last
    line of the traceback text Ray kept. None for any other error: a bug, whose traceback is
    worth printing."""
    from mathprm.data.problems import BadRecordError

    kinds = (ConfigError, BadRecordError, FileNotFoundError)
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            e = cause
            continue
        if isinstance(e, kinds):
            return str(e)
        if getattr(e, "actor_init_failed", False):  # RayActorError: the cause survives as text only
            names = "|".join(re.escape(c.__name__) for kind in kinds for c in (kind, *_subclasses(kind)))
            lines = re.findall(rf"^(?:[\w.]+\.)?(?:{names}): (.+)$", str(e), re.MULTILINE)
            if lines:
                return lines[-1]
        e = e.__cause__
    return None


def _subclasses(cls: type) -> list[type]:
    return [c for sub in cls.__subclasses__() for c in (sub, *_subclasses(sub))]


def _config(cls: type, argv: list[str]):
    """The stage's config from `[--config F] key=value ...`, or None after printing --help."""
    if "-h" in argv or "--help" in argv:
        print(describe(cls))
        return None
    return parse_args(cls, argv)


def _load(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class StageCommand:
    """A stage run from the command line: its config dataclass and run function ("module:name",
    imported only when the command runs), and what to print with the run's result."""

    config: str
    run: str
    show: Callable[[Any, Any], str]  # (config, result) -> the lines printed after the run

    def __call__(self, argv: list[str]) -> int:
        if (cfg := _config(_load(self.config), argv)) is not None:
            result = _load(self.run)(cfg)
            if text := self.show(cfg, result):
                print(text)
        return 0


def _table(formatter: str, out_field: str, tag: str) -> Callable[[Any, Any], str]:
    """Show a report as `formatter`'s table, then where the run wrote it."""
    return lambda cfg, report: f"{_load(formatter)(report)}\n[{tag}] wrote {getattr(cfg, out_field)}"


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


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "demo": _demo,
    "check-data": StageCommand("mathprm.data.check:DataCheckConfig", "mathprm.data.check:run_data_check",
                               lambda cfg, results: _load("mathprm.data.check:format_check")(results)),
    "sft": StageCommand("mathprm.train.sft:SFTConfig", "mathprm.train.sft:train_sft",
                        lambda cfg, out: f"[sft] policy: {out}"),
    "mcts": StageCommand("mathprm.labels.stage:MCTSConfig", "mathprm.labels.stage:run_mcts", lambda cfg, _: ""),
    "evaluate": StageCommand("mathprm.eval.evaluate:EvalConfig", "mathprm.eval.evaluate:run_evaluation",
                             _table("mathprm.eval.evaluate:format_evaluation", "out_path", "evaluate")),
    "train-prm": StageCommand("mathprm.train.prm:TrainPRMConfig", "mathprm.train.prm:train_prm",
                              lambda cfg, out: f"[train-prm] PRM: {out}"),
    "prm-prior": StageCommand("mathprm.train.prm:PriorPRMConfig", "mathprm.train.prm:save_prior_prm",
                              lambda cfg, out: f"[prm-prior] PRM: {out}"),
    "train-ppo": StageCommand("mathprm.train.ppo:PPOConfig", "mathprm.train.ppo:train_ppo",
                              lambda cfg, out: f"[ppo] policy: {out}"),
    "evaluate-prm": StageCommand("mathprm.eval.prm:PRMEvalConfig", "mathprm.eval.prm:run_prm_evaluation",
                                 _table("mathprm.eval.prm:format_report", "out", "evaluate-prm")),
    "processbench": StageCommand("mathprm.eval.processbench:ProcessBenchConfig",
                                 "mathprm.eval.processbench:run_processbench",
                                 _table("mathprm.eval.processbench:format_processbench", "out", "processbench")),
    "grade": _grade,
}

if __name__ == "__main__":
    sys.exit(main())
