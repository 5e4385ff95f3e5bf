"""The step-score table: one row per labelled step, declared once as a pyarrow schema.

This is the contract between step labelling (`mathprm.labels.treesearch`, run over many problems by
the tree-search job) and PRM training: a Parquet dataset with exactly `SCHEMA`. Every column
is documented in `COLUMNS`; `to_table` builds a table from `StepLabel`s and refuses a score
outside [0, 1] or counts that do not add up, naming the row and the column, so a bad label
never reaches a file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pyarrow as pa


@dataclasses.dataclass(frozen=True)
class StepLabel:
    """One scored step: `prefix + (step,)` is a state whose completions were graded."""

    problem_id: str
    question: str
    prefix: tuple[str, ...]  # the steps before `step`, as the policy wrote them
    step: str  # the step being scored
    score: float  # in [0, 1]: fraction of completions from prefix + step that reach the gold answer
    n_rollouts: int  # completions behind `score`, reused ones included (1: a finished solution graded directly)
    n_correct: int  # of those, the ones that reach the gold answer
    depth: int  # len(prefix): the step's 0-based index in the solution
    method: str  # "math_shepherd" or "omegaprm"


COLUMNS: dict[str, tuple[pa.DataType, str]] = {
    "problem_id": (pa.string(), "the problem's id (e.g. arith:hard:3f0ddfff75c0, gsm8k:17)"),
    "question": (pa.string(), "the problem text the policy was prompted with"),
    "prefix": (pa.list_(pa.string()), "the solution steps before `step`, as the policy wrote them"),
    "step": (pa.string(), "the step being scored (no separator)"),
    "score": (pa.float64(), "in [0, 1]: share of rollouts from prefix + step that reach the gold answer"),
    "n_rollouts": (pa.int32(), "rollouts behind `score`: its own plus the earlier states' that passed through it "
                                "(reuse_rollouts); 1: a finished solution graded directly"),
    "n_correct": (pa.int32(), "of those, the ones that reach the gold answer"),
    "depth": (pa.int32(), "len(prefix): the step's 0-based index in the solution"),
    "method": (pa.string(), "math_shepherd | omegaprm"),
    "generator": (pa.string(), "backend:model directory of the policy that wrote and completed the steps"),
    "seed": (pa.int64(), "the run's seed; with problem_id it fixes every sampling call"),
}
# The columns that are StepLabel fields; the others (generator, seed) describe the run.
_LABEL_FIELDS = [f.name for f in dataclasses.fields(StepLabel)]
SCHEMA = pa.schema([pa.field(name, dtype, nullable=False) for name, (dtype, _) in COLUMNS.items()])


def to_table(labels: Sequence[StepLabel], generator: str, seed: int) -> pa.Table:
    """`labels` as a table with `SCHEMA`; ValueError naming the row and column of a bad label."""
    for i, lab in enumerate(labels):
        if not 0.0 <= lab.score <= 1.0:
            raise ValueError(f"row {i} ({lab.problem_id}): score must be in [0, 1], got {lab.score}")
        if not 0 <= lab.n_correct <= lab.n_rollouts or lab.n_rollouts < 1:
            raise ValueError(
                f"row {i} ({lab.problem_id}): n_correct ({lab.n_correct}) must lie in [0, n_rollouts "
                f"({lab.n_rollouts})] and n_rollouts must be >= 1"
            )
        if lab.depth != len(lab.prefix):
            raise ValueError(f"row {i} ({lab.problem_id}): depth {lab.depth} != len(prefix) {len(lab.prefix)}")
    columns = {name: [getattr(lab, name) for lab in labels] for name in _LABEL_FIELDS}
    columns["prefix"] = [list(lab.prefix) for lab in labels]
    columns["score"] = [float(lab.score) for lab in labels]
    columns["generator"] = [generator] * len(labels)
    columns["seed"] = [seed] * len(labels)
    return pa.table(columns, schema=SCHEMA)


def from_table(table: pa.Table) -> list[StepLabel]:
    """The `StepLabel`s of a table read back; ValueError naming what differs from `SCHEMA`."""
    missing = [name for name in SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"not a step-score table: missing column(s) {', '.join(missing)}")
    table = table.select(SCHEMA.names).cast(SCHEMA)
    rows = table.to_pylist()
    return [StepLabel(**{**{name: r[name] for name in _LABEL_FIELDS}, "prefix": tuple(r["prefix"])}) for r in rows]
