"""The data-check stage on a real local Ray: grades reference answers, writes Parquet atomically, resumes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from mathprm.config import ConfigError, load_config
from mathprm.data.check import DataCheckConfig, run_data_check

pytestmark = pytest.mark.ray


def test_checks_real_math500_and_writes_parquet(ray_cluster, data_dir, tmp_path, capsys):
    cfg = DataCheckConfig(datasets=["math500", "gsm8k"], limit=120, out_dir=str(tmp_path))
    results = run_data_check(cfg)
    for name in ("math500", "gsm8k"):
        s = results[name]
        assert s["problems"] == 120 and s["extracted"] == 120 and s["equivalent"] == 120
        table = pq.read_table(tmp_path / name / "rows")
        assert table.num_rows == 120
        assert set(table.column_names) >= {"id", "gold", "extracted", "equivalent"}
        assert json.loads((tmp_path / name / "summary.json").read_text())["equivalent"] == 120
    assert "120/120 reference answers agree" in capsys.readouterr().out


def test_wrong_gold_is_reported(ray_cluster, tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"question": "q1", "answer": "4", "solution": "2+2 = \\boxed{4}"},
        {"question": "q2", "answer": "5", "solution": "2+2 = \\boxed{4}"},
        {"question": "q3", "answer": "1/2", "solution": "so it is \\boxed{\\dfrac{1}{2}}"},
        {"question": "q4", "answer": "7", "solution": "no final answer here"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(DataCheckConfig, None, [f"datasets=[{path}]", f"out_dir={tmp_path / 'out'}",
                                             "columns={question: question, answer: answer, solution: solution}"])
    s = run_data_check(cfg)[str(path)]
    assert (s["problems"], s["extracted"], s["equivalent"]) == (4, 3, 2)
    assert sorted(f["gold"] for f in s["failures"]) == ["5", "7"]


def test_reuses_finished_output_unless_overwrite(ray_cluster, tmp_path, capsys):
    cfg = DataCheckConfig(datasets=["sample:math500"], limit=5, out_dir=str(tmp_path))
    run_data_check(cfg)
    summary = tmp_path / "sample_math500" / "summary.json"
    first = summary.stat().st_mtime_ns
    run_data_check(cfg)
    assert summary.stat().st_mtime_ns == first
    assert "reused" in capsys.readouterr().out
    cfg.overwrite = True
    run_data_check(cfg)
    assert summary.stat().st_mtime_ns != first
    assert [p.name for p in tmp_path.iterdir()] == ["sample_math500"]  # no temp dirs left


@pytest.mark.parametrize(
    "override, needle",
    [("datasets=[processbench:math]", "step labels"), ("limit=0", "limit"), ("datasets=[]", "datasets"),
     ("batch_size=-1", "batch_size")],
)
def test_config_validation_names_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(DataCheckConfig, None, [override])
