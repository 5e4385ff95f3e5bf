"""Loaders on the real data files (skipped without them) and on small malformed files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mathprm.data import problems as P
from mathprm.data.problems import BadRecordError, Problem, ProcessBenchItem

COUNTS = {
    "gsm8k": 1319,
    "gsm8k:train": 7473,
    "math500": 500,
    "math": 5000,
    "math_hard": 1324,
    "processbench:gsm8k": 400,
    "processbench:math": 1000,
    "processbench:olympiadbench": 1000,
    "processbench:omnimath": 1000,
}


@pytest.fixture(scope="module")
def real(data_dir: Path) -> dict[str, list]:
    return {name: P.load_problems(name, data_dir=data_dir) for name in COUNTS}


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


GSM = {"question": "Two plus two?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"}
MATH_FULL = {"problem": "One plus one?", "solution": "It is $\\boxed{2}$.", "level": "Level 1", "type": "Algebra"}
PB = {"id": "t-0", "generator": "m", "problem": "p?", "steps": ["a", "b"], "final_answer_correct": True, "label": -1}


# ------------------------------------------------------------------ the real files


def test_counts_and_unique_ids(real):
    for name, count in COUNTS.items():
        records = real[name]
        assert len(records) == count, name
        assert len({r.id for r in records}) == count, name


def test_gsm8k_records(real):
    first = real["gsm8k"][0]
    assert (first.id, first.answer, first.source) == ("gsm8k_test-0", "18", "gsm8k")
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    # Calculator annotations gone, final line kept.
    assert first.solution == (
        "Janet sells 16 - 3 - 4 = 9 duck eggs a day.\n"
        "She makes 9 * 2 = $18 every day at the farmer’s market.\n#### 18"
    )
    by_id = {p.id: p for p in real["gsm8k"]}
    assert by_id["gsm8k_test-146"].answer == "2125"  # "#### 2,125" in the file
    assert by_id["gsm8k_test-611"].answer == "1450000"
    for p in real["gsm8k:train"]:
        assert "<<" not in p.solution and ">>" not in p.solution
        assert p.solution.rsplit("\n", 1)[1].replace(",", "") == "#### " + p.answer
    assert real["gsm8k:train"][0].id == "gsm8k_train-0"


def test_math500_records(real):
    first = real["math500"][0]
    assert first.id == "test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.source == "math500"
    assert first.metadata == {"level": 2, "subject": "Precalculus", "unique_id": "test/precalculus/807.json"}
    levels = [p.metadata["level"] for p in real["math500"]]
    assert all(type(level) is int for level in levels)
    assert [levels.count(k) for k in range(1, 6)] == [43, 90, 105, 128, 134]


def test_full_math_answers_come_from_the_last_box(real):
    first = real["math"][0]
    assert (first.id, first.answer, first.metadata) == ("math_test-0", "2", {"level": 3, "subject": "Algebra"})
    levels = [p.metadata["level"] for p in real["math"]]
    assert all(type(level) is int for level in levels)
    assert [levels.count(k) for k in range(1, 6)] == [437, 894, 1131, 1214, 1324]
    # MATH-500 states its answers; the same problems in the full set must box the same text.
    full = {p.question: p.answer for p in real["math"]}
    assert all(full[p.question] == p.answer for p in real["math500"])


def test_math_hard_is_level_5_with_the_ids_of_math(real):
    hard, full = real["math_hard"], {p.id: p for p in real["math"]}
    assert all(p.source == "math_hard" and p.metadata["level"] == 5 for p in hard)
    assert hard[0].id == "math_test-3" and hard[0].answer == "i"
    assert all(full[p.id].question == p.question and full[p.id].answer == p.answer for p in hard)


def test_processbench_records(real):
    first = real["processbench:gsm8k"][0]
    assert (first.id, first.subset, first.label, first.final_answer_correct) == ("gsm8k-0", "gsm8k", 1, False)
    assert first.generator == "Qwen2-7B-Instruct" and len(first.steps) == 4
    assert isinstance(first.steps, tuple)
    all_right = {"gsm8k": 193, "math": 406, "olympiadbench": 339, "omnimath": 241}
    for subset, count in all_right.items():
        items = real[f"processbench:{subset}"]
        assert sum(x.label == -1 for x in items) == count
        assert all(x.subset == subset and x.id.startswith(subset + "-") for x in items)


def test_limit_keeps_ids(data_dir):
    full = P.load_problems("math_hard", data_dir=data_dir)
    assert [p.id for p in P.load_problems("math_hard", data_dir=data_dir, limit=7)] == [p.id for p in full[:7]]
    assert P.load_problems("gsm8k", data_dir=data_dir, limit=0) == []


def test_rows_survive_arrow(real):
    # One table mixing sources whose metadata differ; Ray Data stores rows the same way.
    problems = real["gsm8k"][:3] + real["math500"][:3] + real["math"][:3]
    rows = pa.Table.from_pylist([p.to_dict() for p in problems]).to_pylist()
    assert [Problem.from_dict(r) for r in rows] == problems
    items = real["processbench:math"][:5]
    rows = pa.Table.from_pylist([x.to_dict() for x in items]).to_pylist()
    assert [ProcessBenchItem.from_dict(r) for r in rows] == items


def test_samples_are_the_first_lines_of_the_real_files(real):
    sample = P.load_problems("sample:gsm8k")
    assert [(p.question, p.answer) for p in sample] == [(p.question, p.answer) for p in real["gsm8k"][:30]]
    assert P.load_problems("sample:math500") == real["math500"][:30]


# ------------------------------------------------------------------ names and the data folder


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown dataset 'gsm9k'.*gsm8k:train.*processbench:omnimath"):
        P.load_problems("gsm9k")


def test_names_resolve_in_a_given_data_dir(tmp_path):
    _write_jsonl(tmp_path / "gsm8k_train.jsonl", [GSM, GSM | {"question": "Three?"}])
    (tmp_path / "processbench").mkdir()
    (tmp_path / "processbench" / "math.json").write_text(json.dumps([PB]))
    assert [p.id for p in P.load_problems("gsm8k:train", data_dir=tmp_path)] == ["gsm8k_train-0", "gsm8k_train-1"]
    assert P.load_problems("processbench:math", data_dir=str(tmp_path))[0].subset == "math"
    with pytest.raises(FileNotFoundError, match="math500_test.jsonl"):
        P.load_problems("math500", data_dir=tmp_path)


def test_data_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path))
    assert P.data_dir() == tmp_path
    monkeypatch.setenv("MATHPRM_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="MATHPRM_DATA_DIR"):
        P.data_dir()


def test_a_path_loads_with_default_columns(tmp_path):
    path = _write_jsonl(tmp_path / "mine.jsonl", [{"question": "q?", "answer": 7, "extra": 1}])
    assert P.load_problems(str(path)) == [Problem("mine-0", "q?", "7", "table")]
    got = P.load_problems(str(path), columns={"question": "question", "level": "extra"}, source="mine")
    assert got == [Problem("mine-0", "q?", None, "mine", metadata={"level": 1})]


# ------------------------------------------------------------------ bad records


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        P.load_gsm8k(tmp_path / "nope.jsonl", limit=0)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        P.load_processbench(tmp_path / "nope.json")


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ('{"question": "q", "answer": ', r"bad.jsonl:3: invalid JSON"),
        ("[1, 2]", r"bad.jsonl:3: expected a JSON object"),
        ({"answer": "#### 1"}, r"bad.jsonl:3: field 'question': missing"),
        ({"question": 5, "answer": "#### 1"}, r"bad.jsonl:3: field 'question': expected a string, got int"),
        ({"question": "q", "answer": " "}, r"bad.jsonl:3: field 'answer': empty"),
        ({"question": "q", "answer": "it is 4"}, r"bad.jsonl:3: field 'answer': no '#### <answer>' line"),
        ({"question": "q", "answer": "it is 4\n####"}, r"bad.jsonl:3: field 'answer': the '####' line has no answer"),
    ],
)
def test_gsm8k_bad_records_name_file_line_and_field(tmp_path, record, match):
    # Line 2 is blank: line numbers count the file's lines, not its records.
    path = _write_jsonl(tmp_path / "bad.jsonl", [GSM, "", record, GSM])
    with pytest.raises(BadRecordError, match=match):
        P.load_gsm8k(path)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"solution": "It is 2."}, r"field 'solution': no \\boxed"),
        ({"solution": "It is $\\boxed{2$."}, r"field 'solution': no \\boxed"),
        ({"level": "Level ?"}, r"field 'level': expected 1-5"),
        ({"level": 7}, r"field 'level'"),
        ({"type": None}, r"field 'type': missing"),
    ],
)
def test_math_bad_records(tmp_path, change, match):
    path = _write_jsonl(tmp_path / "m.jsonl", [MATH_FULL, MATH_FULL | change])
    with pytest.raises(BadRecordError, match="m.jsonl:2: " + match):
        P.load_math(path)


def test_boxed_answers_nest_and_take_the_last_box(tmp_path):
    solutions = [
        r"First $\boxed{1}$, then $\boxed{\frac{1}{\sqrt{2}}}$.",
        r"$\boxed{x \in \left\{ 1 \right.}$",  # an escaped brace neither opens nor closes
        r"$\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}$",
    ]
    path = _write_jsonl(tmp_path / "m.jsonl", [MATH_FULL | {"solution": s} for s in solutions])
    answers = [p.answer for p in P.load_math(path)]
    assert answers == [r"\frac{1}{\sqrt{2}}", r"x \in \left\{ 1 \right.", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"]


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"label": 2}, r"field 'label': expected -1 or a step index 0-1, got 2"),
        ({"label": -2}, r"field 'label'"),
        ({"label": True}, r"field 'label'"),
        ({"steps": []}, r"field 'steps'"),
        ({"steps": ["a", 1]}, r"field 'steps': step 1 is a int"),
        ({"final_answer_correct": "yes"}, r"field 'final_answer_correct'"),
        ({"id": "t-0"}, r"field 'id': 't-0' repeats the id of .*pb.json: record 0"),
    ],
)
def test_processbench_bad_records_name_the_record(tmp_path, change, match):
    path = tmp_path / "pb.json"
    path.write_text(json.dumps([PB, PB | {"id": "t-1"} | change], indent=2))
    with pytest.raises(BadRecordError, match=r"pb.json: record 1: " + match):
        P.load_processbench(path)


def test_processbench_file_that_is_not_an_array(tmp_path):
    path = tmp_path / "pb.json"
    path.write_text(json.dumps(PB))
    with pytest.raises(BadRecordError, match="pb.json: expected a JSON array"):
        P.load_processbench(path, skip_bad=True)
    path.write_text("[{")
    with pytest.raises(BadRecordError, match="pb.json: invalid JSON"):
        P.load_processbench(path)


def test_skip_bad_skips_collects_and_warns_once(tmp_path, caplog):
    path = _write_jsonl(tmp_path / "bad.jsonl", [GSM, "{", {"question": "q"}, GSM | {"question": "Again?"}])
    errors: list[BadRecordError] = []
    with caplog.at_level(logging.WARNING, logger="mathprm.data.problems"):
        got = P.load_gsm8k(path, skip_bad=True, errors=errors)
    assert [p.id for p in got] == ["bad-0", "bad-3"]
    assert [(e.where.rsplit(":", 1)[1], e.field) for e in errors] == [("2", None), ("3", "answer")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 bad record(s)" in warnings[0] and "bad.jsonl" in warnings[0]


def test_limit_counts_good_records_and_stops_reading(tmp_path):
    path = _write_jsonl(tmp_path / "g.jsonl", [GSM, "{", GSM | {"question": "b"}, GSM | {"question": "c"}, "{"])
    assert [p.id for p in P.load_gsm8k(path, skip_bad=True, limit=2)] == ["g-0", "g-2"]
    assert len(P.load_gsm8k(path, limit=1)) == 1  # the bad line 2 is never read
    with pytest.raises(ValueError, match="limit"):
        P.load_gsm8k(path, limit=-1)


# ------------------------------------------------------------------ tables and datasets

ROWS = [
    {"prompt": "What is 2+2?", "gold": 4, "uid": "a", "hardness": 1, "worked": "2+2=4"},
    {"prompt": "What is 3+3?", "gold": "6", "uid": "b", "hardness": 2, "worked": "3+3=6"},
]
MAPPING = {"question": "prompt", "answer": "gold", "id": "uid", "solution": "worked", "level": "hardness"}
EXPECTED = [
    Problem("a", "What is 2+2?", "4", "toy", "2+2=4", {"level": 1}),
    Problem("b", "What is 3+3?", "6", "toy", "3+3=6", {"level": 2}),
]


def test_load_table_jsonl_with_mapping(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", ROWS)
    assert P.load_table(path, MAPPING, source="toy") == EXPECTED
    assert [p.id for p in P.load_table(path, {"question": "prompt"})] == ["t-0", "t-1"]
    with pytest.raises(BadRecordError, match=r"t.jsonl:1: field 'answer': missing \(mapped to 'answer'\)"):
        P.load_table(path, {"question": "prompt", "answer": "answer"})


def test_load_table_parquet_with_mapping(tmp_path):
    path = tmp_path / "t.parquet"
    rows = [r | {"gold": str(r["gold"])} for r in ROWS]  # Parquet columns have one type
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert P.load_table(path, MAPPING, source="toy") == EXPECTED
    with pytest.raises(BadRecordError, match=r"t.parquet: field 'answer': no such column"):
        P.load_table(path, {"question": "prompt", "answer": "answer"})
    bad = tmp_path / "null.parquet"
    pq.write_table(pa.Table.from_pylist([{"q": "x"}, {"q": None}]), bad)
    with pytest.raises(BadRecordError, match=r"null.parquet: row 1: field 'q': missing"):
        P.load_table(bad, {"question": "q"})


def test_load_table_rejects_bad_mappings_and_files(tmp_path):
    path = _write_jsonl(tmp_path / "t.jsonl", ROWS)
    with pytest.raises(ValueError, match="columns: must map 'question'"):
        P.load_table(path, {"answer": "gold"})
    with pytest.raises(ValueError, match="columns: 'source'"):
        P.load_table(path, {"question": "prompt", "source": "uid"})
    with pytest.raises(ValueError, match="expected a .parquet"):
        P.load_table(tmp_path / "t.csv", {"question": "prompt"})


def test_load_hf_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([r | {"gold": str(r["gold"])} for r in ROWS])
    assert P.load_hf_dataset(ds, MAPPING, source="toy") == EXPECTED
    plain = datasets.Dataset.from_list([{"question": "q?", "answer": "1"}, {"question": "r?", "answer": "2"}])
    assert [p.id for p in P.load_hf_dataset(plain, limit=1)] == ["hf-0"]
    with pytest.raises(TypeError, match="one datasets.Dataset split"):
        P.load_hf_dataset(datasets.DatasetDict({"test": plain}))


def test_round_trip_through_dicts():
    problem = Problem("x", "q", None, "hf", None, {"level": 3, "tags": ["a", "ü"], "nested": {"k": 1.5}})
    row = problem.to_dict()
    assert isinstance(row["metadata"], str)
    assert Problem.from_dict(row) == problem
    item = ProcessBenchItem("gsm8k-1", "gsm8k", "p", ("s1", "s2"), 0, False, "gen")
    assert item.to_dict()["steps"] == ["s1", "s2"]
    assert ProcessBenchItem.from_dict(item.to_dict()) == item
