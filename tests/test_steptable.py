"""The step-score table's schema: round trip through Parquet, and bad labels refused by name."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathprm.labels.steptable import COLUMNS, SCHEMA, StepLabel, from_table, to_table

LABELS = [
    StepLabel("arith:hard:1", "Start with 5. Add 3.", (), "5 + 3 = 8", 0.75, 8, 6, 0, "math_shepherd"),
    StepLabel("arith:hard:1", "Start with 5. Add 3.", ("5 + 3 = 8",), "The answer is 8", 1.0, 1, 1, 1,
              "math_shepherd"),
    StepLabel("arith:hard:2", "Start with 9. Add 1.", (), "9 + 1 = 11", 0.0, 4, 0, 0, "omegaprm"),
]


def test_every_column_is_documented_and_typed_once():
    assert SCHEMA.names == list(COLUMNS)
    assert all(doc for _, doc in COLUMNS.values())


def test_parquet_round_trip(tmp_path):
    table = to_table(LABELS, generator="hf:runs/arith/policy", seed=7)
    assert table.schema == SCHEMA
    pq.write_table(table, tmp_path / "labels.parquet")
    back = pq.read_table(tmp_path / "labels.parquet")
    assert back.schema.equals(SCHEMA)
    assert from_table(back) == LABELS
    assert back.column("generator").to_pylist() == ["hf:runs/arith/policy"] * 3
    assert back.column("seed").to_pylist() == [7] * 3


@pytest.mark.parametrize(
    ("change", "message"),
    [({"score": 1.5}, "score"), ({"n_correct": 9}, "n_correct"), ({"n_rollouts": 0, "n_correct": 0}, "n_rollouts"),
     ({"depth": 3}, "depth")],
)
def test_a_bad_label_is_refused_naming_row_and_column(change, message):
    bad = [LABELS[0], dataclasses.replace(LABELS[1], **change)]
    with pytest.raises(ValueError, match=rf"row 1 \(arith:hard:1\).*{message}"):
        to_table(bad, generator="hf:x", seed=0)


def test_reading_a_table_without_the_columns_names_them():
    with pytest.raises(ValueError, match="missing column.*score"):
        from_table(pa.table({"problem_id": ["a"], "step": ["x"]}))
