"""Problems through a real local Ray: loaders -> Ray Dataset -> map_batches -> Problem again."""

from __future__ import annotations

import pytest

from mathprm.data.problems import BadRecordError, Problem, load_problems
from mathprm.data.ray_data import problems_dataset, rows_to_problems

pytestmark = pytest.mark.ray


def _ids_and_questions(batch):
    problems = rows_to_problems(batch)
    return {"id": [p.id for p in problems], "n_meta": [len(p.metadata) for p in problems]}


def test_math500_dataset_round_trips_through_workers(ray_cluster, data_dir):
    expected = load_problems("math500")
    ds = problems_dataset("math500", override_num_blocks=4)
    assert ds.count() == 500
    back = {p.id: p for p in rows_to_problems_all(ds)}
    assert back == {p.id: p for p in expected}  # every field, metadata included
    # And inside Ray workers, batch by batch.
    out = ds.map_batches(_ids_and_questions, batch_size=64).take_all()
    assert sorted(r["id"] for r in out) == sorted(p.id for p in expected)
    assert all(r["n_meta"] >= 2 for r in out)  # level and subject survived the trip


def rows_to_problems_all(ds) -> list[Problem]:
    problems: list[Problem] = []
    for batch in ds.iter_batches(batch_size=100):
        problems.extend(rows_to_problems(batch))
    return problems


def test_processbench_and_arith_datasets(ray_cluster, data_dir):
    pb = problems_dataset("processbench:gsm8k", limit=25)
    rows = pb.take_all()
    assert len(rows) == 25 and all(isinstance(r["steps"], list) or hasattr(r["steps"], "tolist") for r in rows)
    arith = problems_dataset("arith:hard", limit=40, seed=3)
    assert arith.count() == 40
    assert {p.id for p in rows_to_problems_all(arith)} == {p.id for p in load_problems("arith:hard", limit=40, seed=3)}


def test_bundled_sample_needs_no_data_dir(ray_cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path / "nowhere"))
    assert problems_dataset("sample:gsm8k").count() == 30


def test_bad_records_fail_on_the_driver_or_are_counted(ray_cluster, tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n{"question": "", "answer": "3"}\n{"question": "2+2?", "answer": "4"}\n')
    with pytest.raises(BadRecordError, match=r"mine.jsonl:2: field 'question'"):
        problems_dataset(str(path))
    errors: list = []
    ds = problems_dataset(str(path), skip_bad=True, errors=errors)
    assert ds.count() == 2 and len(errors) == 1


def test_empty_source_is_refused(ray_cluster):
    with pytest.raises(ValueError, match="no problems"):
        problems_dataset([])
