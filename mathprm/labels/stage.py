"""The tree-search stage on Ray: problems -> expander actors -> the step-score Parquet table.

    python jobs/mcts.py --config mathprm/configs/mcts_arith.yaml method=omegaprm
    ray job submit --working-dir . -- python jobs/mcts.py --config mathprm/configs/mcts_arith.yaml

The shape is plain Ray Data: the problems become a Dataset, `map_batches` runs `Expander`, a
stateful class (one `Generator` engine per actor, an actor pool of `num_actors`, with
`cpus_per_actor` / `gpus_per_actor` each), and `write_datasink` commits the result. Inside an
actor, `treesearch.label_problems` runs the batch's problems in lockstep, so each generator
call carries the rollout requests of every problem in the batch. Ray Data restarts an actor
that dies and retries its batch; since a batch's output only exists once the batch is done,
every problem appears exactly once.

Output (`out_dir`):

    run.json                  the config that started this output; a rerun must match it
    labels/part-*.parquet     `steptable.SCHEMA`, one row per labelled step; each file's
                              Parquet metadata lists the problems it holds and their costs
    summary.json              written last: counts (problems without labels by reason:
                              `no_labels`), rates, and label quality on arith
    trl/soft.parquet, trl/hard.parquet   TRL stepwise supervision (prompt, completions, labels)

Every file is written under a temporary name and renamed into place, so a reader never sees
half a file; a file holds whole problems. Resume: a rerun with the same `out_dir` reads which
problems the committed files hold and searches only the others. A part file that cannot be
read (a disk fault, a copy cut short, a stranger's file) stops the run with its name;
`repair=true` moves such files into `corrupt/` and labels their problems again. Files are
written on the driver's node (`supports_distributed_writes = False`), so a local `out_dir`
works on a multi-node cluster.

Problems without a usable gold answer cannot be graded: they are skipped and counted, and if
none is usable the stage stops before starting Ray. Ray metrics (`mathprm_mcts_*`: problems,
rollouts, labelled steps, generated tokens; tag `method`) are on the dashboard's Prometheus
endpoint, and the driver prints a progress line every `progress_every_s` seconds.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mathprm import atomic
from mathprm.config import ConfigError
from mathprm.data import arith
from mathprm.data.answers import judge_grader
from mathprm.data.problems import PROBLEM_FILES, BadRecordError, Problem, load_problems, token_caps
from mathprm.generation import GENERATORS, Prefix
from mathprm.labels import steptable
from mathprm.labels.parts import (
    PROBLEM_FIELDS,
    committed_problems,
    no_label_reasons,
    problems_block,
    read_labels,
    trl_schema,
    write_labels_file,
)
from mathprm.labels.steptable import StepLabel
from mathprm.labels.treesearch import TOO_LONG, SearchStats, TreeSearchConfig, to_trl
from mathprm.stats import auroc
from mathprm.steps import StepFormat, step_format_for

TRL_FORMATS = ("soft", "hard")
# The fields that make two runs' labels the same experiment: a rerun must match them.
_IDENTITY = ("policy", "dataset", "split", "columns", "separator", "method", "num_solutions", "rollouts_per_step",
             "rollout_budget", "c_puct", "alpha", "beta", "length_scale", "temperature", "rollout_temperature", "top_p",
             "max_solution_tokens", "seed", "reuse_rollouts")


@dataclasses.dataclass
class MCTSConfig(TreeSearchConfig):
    """The tree-search stage: the search's own fields (`TreeSearchConfig`: method,
    num_solutions, rollouts_per_step, rollout_budget, c_puct, alpha, beta, length_scale,
    temperature, top_p, max_solution_tokens, seed, reuse_rollouts) plus the data, the policy and the Ray shape."""

    policy: str = "runs/arith/policy"  # any Hugging Face causal-LM directory
    dataset: str = "arith:hard"  # a name load_problems knows (arith:*, gsm8k, math500, ...) or a .jsonl/.parquet
    split: str = "train"  # arith:* only: label training-split problems (seed picks which)
    limit: int | None = 200  # first N problems
    columns: dict[str, str] | None = None  # table files: Problem field -> file column
    separator: str | None = None  # step separator; None: "\n" for arith:*, "\n\n" otherwise
    backend: str = "hf"  # a key of mathprm.generation.GENERATORS
    generator_options: dict[str, Any] = dataclasses.field(default_factory=dict)  # to the backend, e.g. {device: cuda}
    # A longer completion is cut (and is wrong unless it has the answer); None: the dataset's
    # (mathprm.data.problems.token_caps: arith 384, GSM8K 1024, MATH-length 2048).
    max_solution_tokens: int | None = None
    num_actors: int = 1  # expander actors, each with its own generator engine
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0  # e.g. 1 for vLLM on a GPU
    # Ray custom resources each actor needs (pins expanders to a node pool), e.g. {labeller: 1}
    resources_per_actor: dict[str, float] = dataclasses.field(default_factory=dict)
    batch_problems: int = 8  # problems an actor searches in lockstep; also problems per output file
    out_dir: str = "runs/arith/mcts"
    trl_export: list[str] = dataclasses.field(default_factory=lambda: list(TRL_FORMATS))
    overwrite: bool = False  # start over instead of resuming
    # Move unreadable part files aside (into <out_dir>/corrupt/, never deleted) and label their
    # problems again, instead of stopping at the first one.
    repair: bool = False
    progress_every_s: float = 10.0
    ray_address: str | None = None  # None: RAY_ADDRESS or a local loopback cluster
    num_cpus: int | None = None  # CPUs of a local cluster started by this run

    def __post_init__(self) -> None:
        if self.max_solution_tokens is None:
            self.max_solution_tokens = token_caps(self.dataset)[1]
        super().__post_init__()
        if self.backend not in GENERATORS:
            raise ValueError(f"backend: unknown {self.backend!r}; backends: {', '.join(GENERATORS)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.split not in arith.SPLITS:
            raise ValueError(f"split: must be one of {', '.join(arith.SPLITS)}, got {self.split!r}")
        for name in ("num_actors", "batch_problems"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor / gpus_per_actor: must be >= 0")
        for name, amount in self.resources_per_actor.items():
            if not isinstance(amount, (int, float)) or isinstance(amount, bool) or amount <= 0:
                raise ValueError(f"resources_per_actor.{name}: must be a number > 0, got {amount!r}")
        bad = [f for f in self.trl_export if f not in TRL_FORMATS]
        if bad:
            raise ValueError(f"trl_export: unknown format(s) {bad}; formats: {', '.join(TRL_FORMATS)}")
        if self.progress_every_s <= 0:
            raise ValueError(f"progress_every_s: must be > 0, got {self.progress_every_s}")

    @property
    def step_format(self) -> StepFormat:
        return step_format_for(self.dataset, self.separator)

    @property
    def generator_name(self) -> str:
        return f"{self.backend}:{self.policy}"

    def identity(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _IDENTITY}


# ----------------------------------------------------------------------------- problems


def usable(problem: Problem) -> bool:
    """Whether rollouts of `problem` can be graded: it has a non-empty gold answer."""
    return problem.answer is not None and str(problem.answer).strip() != ""


def load_stage_problems(cfg: MCTSConfig) -> tuple[list[Problem], int]:
    """(the usable problems, how many were skipped for lack of a gold answer); ConfigError if
    none is usable."""
    no_gold = 0
    if cfg.dataset.startswith("arith:"):
        problems = load_problems(cfg.dataset, limit=cfg.limit, seed=cfg.seed, split=cfg.split)
    else:
        extra = {"columns": cfg.columns} if cfg.columns else {}
        errors: list[BadRecordError] = []
        problems = load_problems(cfg.dataset, limit=cfg.limit, skip_bad=True, errors=errors, **extra)
        answer_column = (cfg.columns or {}).get("answer", "answer")
        other = [e for e in errors if e.field != answer_column]
        if other:  # a record broken otherwise than by its gold answer is an error in the data
            raise other[0]
        no_gold = len(errors)
    if problems and not isinstance(problems[0], Problem):
        raise ConfigError(f"dataset: {cfg.dataset!r} holds step labels, not problems with gold answers")
    keep = [p for p in problems if usable(p)]
    no_gold += len(problems) - len(keep)
    if not keep:
        raise ConfigError(f"dataset: {cfg.dataset!r}: none of its {len(keep) + no_gold} problems has a usable gold "
                          "answer")
    ids = [p.id for p in keep]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"dataset: {cfg.dataset!r}: problem id {dup!r} appears more than once")
    return keep, no_gold


# ----------------------------------------------------------------------------- actors


class Expander:
    """Ray Data callable class: one generator engine per actor; each batch of problems is
    searched in lockstep and returned as a `problems_block`."""

    def __init__(self, cfg: MCTSConfig) -> None:
        from mathprm.generation import load_generator
        from mathprm.metrics import create

        self.cfg = cfg
        self.generator = load_generator(cfg.backend, cfg.policy, cfg.step_format, **cfg.generator_options)
        self.metrics = {key: create(f"mathprm_mcts_{name}") for key, name in
                        (("problems", "problems"), ("rollouts", "rollouts"), ("labels", "steps_labelled"),
                         ("tokens", "tokens"))}

    def __call__(self, batch: dict[str, Any]) -> pa.Table:
        from mathprm.data.ray_data import rows_to_problems
        from mathprm.labels.treesearch import label_problems

        problems = rows_to_problems(batch)
        tags = {"method": self.cfg.method}
        started = time.monotonic()
        seconds: dict[int, float] = {}

        def done(i: int, labels: list[StepLabel], stats: SearchStats) -> None:
            seconds[index[i]] = time.monotonic() - started  # i counts the searched problems
            for name, value in (("problems", 1), ("rollouts", stats.n_rollouts), ("labels", len(labels)),
                                ("tokens", stats.n_tokens)):
                if value > 0:  # Ray's Counter refuses 0
                    self.metrics[name].inc(value, tags)

        # A rollout cut by the end of the context would count as wrong: a problem whose prompt
        # leaves less than max_solution_tokens is not searched (one line, counted).
        fits = [self.generator.room(Prefix(p.question)) >= self.cfg.max_solution_tokens for p in problems]
        for p, ok in zip(problems, fits):
            if not ok:
                print(f"[mcts] skipped {p.id}: its prompt leaves less than max_solution_tokens "
                      f"({self.cfg.max_solution_tokens}) of the policy's {self.generator.context_length} tokens",
                      flush=True)
        index = [i for i, ok in enumerate(fits) if ok]
        searched = [problems[i] for i in index]
        results = iter(label_problems(searched, self.generator, judge_grader, self.cfg, on_done=done) if searched
                       else [])
        skip = ([], SearchStats(skipped_too_long=1, no_labels=TOO_LONG))
        return problems_block(
            ((p, *(next(results) if ok else skip), seconds.get(i, 0.0))
             for i, (p, ok) in enumerate(zip(problems, fits))),
            self.cfg.generator_name, self.cfg.seed,
        )


# ----------------------------------------------------------------------------- output


def _make_sink(labels_dir: Path, run_id: str):
    from ray.data import Datasink
    from ray.data.block import BlockAccessor

    class StepTableDatasink(Datasink):
        """One Parquet file per block, committed by rename; names are stable per (run, task,
        block), so a retried write task replaces its own files instead of adding copies."""

        def write(self, blocks, ctx) -> list[tuple[int, int]]:
            written = []
            for i, block in enumerate(blocks):
                table = BlockAccessor.for_block(block).to_arrow()
                if table.num_rows:
                    name = f"part-{run_id}-{ctx.task_idx:05d}-{i:03d}.parquet"
                    written.append(write_labels_file(table, labels_dir / name))
            return written

        @property
        def supports_distributed_writes(self) -> bool:
            return False  # files land on the driver's node: a local out_dir works on any cluster

    return StepTableDatasink()


class _Progress:
    """A driver thread that prints what the committed files hold every `every` seconds."""

    def __init__(self, labels_dir: Path, total: int, resumed: int, every: float) -> None:
        self.labels_dir, self.total, self.resumed, self.every = labels_dir, total, resumed, every
        self.started = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def line(self) -> str:
        try:
            done = committed_problems(self.labels_dir)
        except (OSError, ValueError):  # a file being renamed in; the next tick reads it
            return ""
        new = len(done) - self.resumed
        elapsed = time.monotonic() - self.started
        labels = sum(r["n_labels"] for r in done.values())
        rollouts = sum(r["n_rollouts"] for r in done.values())
        eta = f", eta {elapsed / new * (self.total - len(done)):.0f}s" if new > 0 else ""
        return (f"[mcts] {len(done)}/{self.total} problems ({self.resumed} resumed), {labels:,} steps labelled, "
                f"{rollouts:,} rollouts, {elapsed:.0f}s{eta}{_unlabelled(done.values())}")

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            if text := self.line():
                print(text, flush=True)

    def __enter__(self) -> _Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _unlabelled(rows) -> str:
    """The progress line's count of problems without labels, by reason ("" when none)."""
    reasons = no_label_reasons(rows)
    if not reasons:
        return ""
    return f"; {sum(reasons.values())} without labels ({', '.join(f'{n} {why}' for why, n in reasons.items())})"


def _prepare_out_dir(cfg: MCTSConfig) -> Path:
    """Create `out_dir` (or clear it with overwrite) and check that a rerun continues the same
    experiment; removes temporary files a killed run left behind."""
    out = Path(cfg.out_dir)
    if cfg.overwrite and out.exists():
        shutil.rmtree(out)
    labels_dir = out / "labels"
    for d in (out, labels_dir):
        atomic.check_not_a_file(d, "out_dir")
    labels_dir.mkdir(parents=True, exist_ok=True)
    for tmp in labels_dir.glob(".part-*.tmp-*"):  # atomic.file's temporaries of a killed run
        tmp.unlink()
    run_file = out / "run.json"
    identity = json.loads(json.dumps(cfg.identity()))  # as it reads back from JSON
    if run_file.exists():
        previous = atomic.read_json(run_file, "move it aside to resume the labels there as this run's, or use "
                                    "overwrite=true")
        diff = [k for k in _IDENTITY if previous.get(k) != identity.get(k)]
        if diff:
            k = diff[0]
            raise ConfigError(
                f"out_dir: {out} holds labels of another run ({k}: {previous.get(k)!r} there, {identity.get(k)!r} "
                "now); use another out_dir or overwrite=true"
            )
    else:
        atomic.write_json(run_file, identity)
    return out


def run_mcts(cfg: MCTSConfig) -> dict[str, Any]:
    """Label every problem of `cfg` (resuming what `out_dir` already holds); returns the summary."""
    import ray.data

    from mathprm.data.ray_data import problems_dataset
    from mathprm.models import check_model_dir
    from mathprm.ray_utils import check_job_paths, init_ray

    local_data = cfg.dataset if Path(cfg.dataset).suffix in PROBLEM_FILES else None
    check_job_paths(policy=cfg.policy, out_dir=cfg.out_dir, dataset=local_data)
    check_model_dir(cfg.policy, "policy")  # here, not in each actor
    # Actors and write tasks run in worker processes with their own working directory.
    cfg = dataclasses.replace(cfg, policy=str(Path(cfg.policy).resolve()), out_dir=str(Path(cfg.out_dir).resolve()))
    problems, skipped = load_stage_problems(cfg)
    out = _prepare_out_dir(cfg)
    labels_dir = out / "labels"
    done = committed_problems(labels_dir, repair=cfg.repair)
    extra = done.keys() - {p.id for p in problems}
    if extra:  # refused before any work, not after it
        raise ConfigError(f"out_dir: {out} holds labels of problems this config does not select, e.g. "
                          f"{sorted(extra)[0]!r} (limit changed?); use another out_dir or overwrite=true")
    todo = [p for p in problems if p.id not in done]
    print(f"[mcts] {cfg.dataset}: {len(problems)} problems ({skipped} skipped without a gold answer), "
          f"{len(problems) - len(todo)} already labelled in {out}; method {cfg.method}, {cfg.generator_name}",
          flush=True)
    started = time.monotonic()
    if todo:
        init_ray(cfg.ray_address, cfg.num_cpus)
        run_id = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
        ds = problems_dataset(todo, override_num_blocks=max(1, -(-len(todo) // cfg.batch_problems)))
        labelled = ds.map_batches(
            Expander,
            fn_constructor_kwargs={"cfg": cfg},
            batch_size=cfg.batch_problems,
            compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
            num_cpus=cfg.cpus_per_actor,
            num_gpus=cfg.gpus_per_actor,
            **({"resources": cfg.resources_per_actor} if cfg.resources_per_actor else {}),
        )
        with _Progress(labels_dir, len(problems), len(problems) - len(todo), cfg.progress_every_s) as progress:
            labelled.write_datasink(_make_sink(labels_dir, run_id), ray_remote_args={"num_cpus": 0})
        print(progress.line(), flush=True)
    elapsed = time.monotonic() - started
    return finish(cfg, problems, skipped, {p.id for p in todo}, elapsed)


def label_quality(problems: list[Problem], labels: list[StepLabel]) -> dict[str, Any]:
    """Arith only: `score` against the exact truth, three ways, each an AUROC:

    - `auroc`: "every step so far is right" (`arith.step_labels`, from `arith.check_step`):
      ProcessBench's first-error truth;
    - `auroc_reachable`: "finishing with exact arithmetic reaches the gold answer"
      (`arith.can_reach_gold`), what a Monte-Carlo score estimates with a perfect completer.
      It differs from the first when a wrong step lands back on the gold value
      (`wrong_states_reachable` says how often);
    - `auroc_local`: "this step is right given the steps before it as written" (`check_step`).

    Also how often a right state got no correct rollout (score 0), overall and by depth, and
    how often a state that cannot reach the answer scored above 0."""
    by_id = {p.id: p for p in problems}
    truth, reach, local = [], [], []
    for lab in labels:
        problem, steps = by_id[lab.problem_id], [*lab.prefix, lab.step]
        truth.append(arith.step_labels(problem, steps)[-1])
        reach.append(arith.can_reach_gold(problem, steps))
        local.append(arith.check_step(problem, list(lab.prefix), lab.step))
    scores = [lab.score for lab in labels]

    def area(y: list[bool]) -> float | None:
        return round(auroc(scores, y), 4) if 0 < sum(y) < len(y) else None

    def share(values: list[bool]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    right = [(lab.depth, s) for lab, s, t in zip(labels, scores, truth) if t]
    depths: dict[int, list[bool]] = {}
    for depth, s in right:
        depths.setdefault(depth, []).append(s == 0)
    return {
        "n_right_states": sum(truth), "n_wrong_states": len(truth) - sum(truth),
        "auroc": area(truth), "auroc_reachable": area(reach), "auroc_local": area(local),
        "right_states_scored_0": share([s == 0 for _, s in right]),
        "right_states_scored_0_by_depth": {str(d): round(sum(v) / len(v), 4) for d, v in sorted(depths.items())},
        "reachable_states_scored_0": share([s == 0 for s, r in zip(scores, reach) if r]),
        "unreachable_states_scored_above_0": share([s > 0 for s, r in zip(scores, reach) if not r]),
        "wrong_states_reachable": share([r for r, t in zip(reach, truth) if not t]),
    }


def finish(cfg: MCTSConfig, problems: list[Problem], skipped: int, searched: set[str],
           elapsed: float) -> dict[str, Any]:
    """Check the output against the problems, export TRL rows and write summary.json. Rates
    count the problems `searched` in this run only (not the resumed ones)."""
    out = Path(cfg.out_dir)
    done = committed_problems(out / "labels")
    wanted = {p.id for p in problems}
    missing = wanted - done.keys()
    if missing:
        raise RuntimeError(f"{len(missing)} problem(s) have no committed labels, e.g. {sorted(missing)[0]!r}")
    table = read_labels(out)
    labels = steptable.from_table(table)
    totals = {name: sum(r.get(name, 0) for r in done.values()) for name in PROBLEM_FIELDS}  # older files lack some
    this_run = [r for r in done.values() if r["problem_id"] in searched]
    rate = {}
    if searched and elapsed > 0:
        rate = {
            "problems_per_s": round(len(searched) / elapsed, 4),
            "steps_labelled_per_s": round(sum(r["n_labels"] for r in this_run) / elapsed, 3),
            "rollouts_per_s": round(sum(r["n_rollouts"] for r in this_run) / elapsed, 3),
            "rollout_tokens_per_s": round(sum(r["n_tokens"] for r in this_run) / elapsed, 1),
        }
    summary: dict[str, Any] = {
        "dataset": cfg.dataset,
        "method": cfg.method,
        "generator": cfg.generator_name,
        "problems": len(wanted),
        "skipped_without_gold": skipped,
        "searched_this_run": len(searched),
        "labels": table.num_rows,
        "no_labels": no_label_reasons(done.values()),  # reason -> problems committed without labels
        **totals,
        "seconds_this_run": round(elapsed, 1),
        **rate,
        "date": time.strftime("%Y-%m-%d"),
    }
    if cfg.dataset.startswith("arith:") and labels:
        summary["quality"] = label_quality(problems, labels)
    trl_dir = out / "trl"
    for fmt in cfg.trl_export:
        rows = to_trl(labels, hard=fmt == "hard", fmt=cfg.step_format)
        trl_dir.mkdir(exist_ok=True)
        with atomic.file(trl_dir / f"{fmt}.parquet") as f:
            pq.write_table(pa.Table.from_pylist(rows, schema=trl_schema(fmt == "hard")), f)
    atomic.write_json(out / "summary.json", summary)
    q = summary.get("quality") or {}
    extra = f", AUROC vs exact step truth {q['auroc']:.3f}" if q.get("auroc") is not None else ""
    print(f"[mcts] {summary['labels']:,} labelled steps for {len(wanted)} problems -> {out}{extra}"
          f"{_unlabelled(done.values())}", flush=True)
    return summary


