"""PRM training data: labelled solution paths from tree-search step tables or TRL stepwise rows.

`data` is a tree-search output directory (its `labels/`), step-score Parquet files
(`mathprm.labels.steptable.SCHEMA`), or a TRL stepwise-supervision dataset (Parquet or JSONL with
`prompt`, `completions`, `labels`, bool or float labels). It is read as a Ray Dataset and turned
into labelled solutions, one row per root-to-leaf path of each problem's labelled states
(`solutions_of_problem`, run by `groupby("problem_id").map_groups`). A state shared by several
paths (the root solutions of a tree share their first steps) carries its label in one path only,
so every label weighs the same in the loss. Problems go to validation by a hash of their id
(`is_validation`), never by row, so no problem is on both sides. `EpochBatches` serves one
worker's shard epoch by epoch.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mathprm import atomic
from mathprm.config import ConfigError
from mathprm.models.prm import PRMExample, encode_solution_spans
from mathprm.prompts import Prompter
from mathprm.steps import StepFormat, step_format_for

SOLUTIONS = pa.schema([
    pa.field("problem_id", pa.string()),
    pa.field("question", pa.string()),
    pa.field("steps", pa.list_(pa.string())),  # the path's steps, without separators
    pa.field("targets", pa.list_(pa.float64())),  # per step: its soft label, NaN where unlabelled
])


def solutions_of_problem(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One problem's labelled states -> its labelled paths (rows of `SOLUTIONS`).

    A state is `prefix + (step,)`; the same state labelled twice (two sampled solutions that
    share a first step) is merged by pooling its rollouts. Each leaf (a state no other state
    extends) becomes one path; each state's label goes to the first path, in sorted order,
    that passes through it, and is NaN in the others."""
    pooled: dict[tuple[str, ...], list[int]] = {}
    first = rows[0]
    for r in rows:
        state = (*r["prefix"], r["step"])
        n, c = pooled.setdefault(state, [0, 0])
        pooled[state] = [n + int(r["n_rollouts"]), c + int(r["n_correct"])]
    inner = {s[:i] for s in pooled for i in range(len(s))}
    out, given = [], set()
    for leaf in sorted(s for s in pooled if s not in inner):
        targets = []
        for end in range(1, len(leaf) + 1):
            state = leaf[:end]
            if state in pooled and state not in given:
                n, c = pooled[state]
                targets.append(c / n)
                given.add(state)
            else:
                targets.append(math.nan)
        out.append({"problem_id": first["problem_id"], "question": first["question"], "steps": list(leaf),
                    "targets": targets})
    return out


def solution_of_trl_row(row: dict[str, Any], fmt: StepFormat) -> dict[str, Any]:
    """A TRL stepwise row -> a labelled path. The question is `prompt` without its trailing
    separator; a completion holding the separator is several steps, the label going to the last."""
    prompt, completions, labels = row["prompt"], row["completions"], row["labels"]
    if not isinstance(prompt, str) or len(completions) != len(labels):
        raise ValueError(f"TRL row {str(prompt)[:60]!r}: needs a string prompt and one label per completion "
                         f"({len(completions)} completions, {len(labels)} labels)")
    question = prompt[: -len(fmt.separator)] if prompt.endswith(fmt.separator) else prompt
    steps, targets = [], []
    for completion, label in zip(completions, labels):
        pieces = completion.split(fmt.separator)
        steps += pieces
        targets += [math.nan] * (len(pieces) - 1) + [float(label)]
    for t in targets:
        if not (math.isnan(t) or 0.0 <= t <= 1.0):
            raise ValueError(f"TRL row {question[:60]!r}: label {t} is outside [0, 1]")
    pid = "trl:" + hashlib.sha256(question.encode()).hexdigest()[:12]
    return {"problem_id": pid, "question": question, "steps": steps, "targets": targets}


def is_validation(problem_id: str, fraction: float) -> bool:
    """A stable, seed-free split by problem: the same problems are held out on every run."""
    h = int.from_bytes(hashlib.sha256(problem_id.encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def to_example(row: dict[str, Any], prompter: Prompter) -> PRMExample | None:
    """The training example of a labelled path (only labelled steps carry a target); None if
    no step is labelled."""
    ids, positions, prompt_length = encode_solution_spans(prompter, row["question"], row["steps"])
    keep = [(p, t) for p, t in zip(positions, row["targets"]) if t is not None and not math.isnan(t)]
    if not keep:
        return None
    return PRMExample(ids, [p for p, _ in keep], [t for _, t in keep], step_ends=positions, steps_from=prompt_length)


def usable_examples(rows: Sequence[dict[str, Any]], prompter: Prompter, max_length: int) -> list[PRMExample]:
    """The training examples of `rows` that have a labelled step and fit in `max_length` tokens."""
    return [ex for row in rows if (ex := to_example(row, prompter)) is not None and len(ex.input_ids) <= max_length]


def data_step_format(data: str, separator: str | None) -> StepFormat:
    """`separator`, else the labelling run's in `data` (its `run.json`: its separator, or its
    dataset's), else the default of real math (`step_format_for`)."""
    if separator is not None:
        return step_format_for("", separator)
    run = Path(data) / "run.json"
    identity = {}
    if run.is_file():
        identity = atomic.read_json(run, "pass separator=... or restore the labelling run's run.json")
    return step_format_for(identity.get("dataset", ""), identity.get("separator"))


def _materialize_with_sort_shuffle(ds):
    """`ds.materialize()` with Ray Data's sort-based shuffle for its groupby. Ray 2.60's default
    (SHUFFLE_V2) starts aggregator actors that hold the CPUs for a while after the shuffle and
    leaves many blocks; on a machine with few CPUs both slow the grouping and the split after
    it far more than the sort-based shuffle does."""
    import ray.data
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return ds.materialize()
    finally:
        ctx.shuffle_strategy = previous


def _table_to_solutions(table: pa.Table) -> pa.Table:
    return pa.Table.from_pylist(solutions_of_problem(table.to_pylist()), schema=SOLUTIONS)


def solutions_dataset(data: str, fmt: StepFormat):
    """The labelled paths of `data` as a materialised Ray Dataset (rows of `SOLUTIONS`)."""
    import ray.data

    from mathprm.labels import steptable
    from mathprm.labels.parts import parquet_schema

    path = Path(data).resolve()  # Ray Data reads in workers, whose working directory is not ours
    if path.is_dir() and (path / "labels").is_dir():
        path = path / "labels"
    if path.is_dir():
        files = sorted(str(f) for f in path.rglob("*.parquet") if not f.name.startswith("."))
    elif path.is_file():
        files = [str(path)]
    else:
        raise FileNotFoundError(f"data: {data} does not exist")
    if not files:
        raise ConfigError(f"data: {data} holds no Parquet files")
    if files[0].endswith((".jsonl", ".json")):
        names = {"prompt", "completions", "labels"}
        ds = ray.data.read_json(files)
    else:
        # Every footer is read here, so a truncated or foreign file is named before Ray Data reads it.
        fix = "move it aside (in a labelling out_dir, `mathprm mcts ... repair=true` does and relabels its problems)"
        schemas = [parquet_schema(Path(f), fix) for f in files]
        names = set(schemas[0].names)
        if not any(pq.ParquetFile(f).metadata.num_rows for f in files):  # nothing to train on (or to shuffle)
            raise ConfigError(f"data: {data} holds no labelled step (a labelling run that committed its problems "
                              "without labels: its summary.json says why, e.g. prompts too long for max_solution_tokens)")
        ds = ray.data.read_parquet(files)
    if set(steptable.SCHEMA.names) <= names:
        ds = ds.groupby("problem_id").map_groups(_table_to_solutions, batch_format="pyarrow")
        return _materialize_with_sort_shuffle(ds)
    elif {"prompt", "completions", "labels"} <= names:
        sep = fmt.separator
        ds = ds.map_batches(lambda t: pa.Table.from_pylist(
            [solution_of_trl_row(r, StepFormat(sep)) for r in t.to_pylist()], schema=SOLUTIONS), batch_format="pyarrow")
    else:
        raise ConfigError(f"data: {files[0]} is neither a step-score table (columns {', '.join(steptable.SCHEMA.names)}) "
                          "nor TRL stepwise rows (prompt, completions, labels)")
    return ds.materialize()


def rows_of(batch: pa.Table) -> list[dict[str, Any]]:
    return batch.to_pylist() if isinstance(batch, pa.Table) else pa.Table.from_pydict(batch).to_pylist()


class EpochBatches:
    """This worker's training batches (full batches only), one epoch at a time.

    Every pass over a Ray Data shard starts a new streaming execution, and the workers wait for
    each other at its start (a fixed cost per epoch that dominates a small run). So
    the first epoch reads the shard into memory, and if it fits in `max_bytes` that epoch and
    every later one shuffle those rows in memory, seeded by (seed, epoch, rank), without going
    back to Ray Data. A larger shard streams every epoch (Ray Data's local shuffle)."""

    def __init__(self, shard: Any, batch_size: int, seed: int, rank: int, max_bytes: int = 256 << 20) -> None:
        self.shard, self.batch_size, self.seed, self.rank, self.max_bytes = shard, batch_size, seed, rank, max_bytes
        self.rows: pa.Table | None = None  # the whole shard, once read and within max_bytes
        self.streaming = False  # the shard is larger than max_bytes

    def batches(self, epoch: int):
        if self.rows is None:
            # The first read keeps epoch 0's order whichever epoch asks first: a run resumed in a
            # later epoch then shuffles the same table, so it replays the batches (and skips the
            # ones already trained) of the run it continues. A streamed shard reshuffles per epoch.
            shuffle_epoch = epoch if self.streaming else 0
            stream = iter(self.shard.iter_batches(batch_size=self.batch_size, batch_format="pyarrow",
                                                  local_shuffle_buffer_size=self.batch_size * 8,
                                                  local_shuffle_seed=self.seed * 1000 + shuffle_epoch * 10 + self.rank))
            if self.streaming:
                yield from self._full(stream)
                return
            kept, size = [], 0
            for batch in stream:
                kept.append(batch)
                size += batch.nbytes
                if size > self.max_bytes:
                    self.streaming = True
                    yield from self._full(iter(kept))
                    yield from self._full(stream)
                    return
            if not kept:
                return
            self.rows = pa.concat_tables(kept)
        order = np.random.default_rng([self.seed, epoch, self.rank]).permutation(self.rows.num_rows)
        for lo in range(0, len(order) - self.batch_size + 1, self.batch_size):
            yield self.rows.take(order[lo : lo + self.batch_size])

    def _full(self, batches):
        return (b for b in batches if b.num_rows == self.batch_size)
