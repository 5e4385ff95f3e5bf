"""Data check stage: do a dataset's gold answers agree with its own reference solutions?

Reads problems as a Ray Dataset, extracts the final answer of every reference solution with
the project's grader and compares it with the gold answer, in parallel Ray tasks, and
writes one Parquet table plus a JSON summary per dataset. It is the first thing to run on
a new dataset (a loader or a grader that disagrees with the data shows up here) and the
demo's first stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from mathprm import atomic
from mathprm.data.grading import extract_answer, is_equivalent

_PROCESSBENCH_PREFIX = "processbench"


@dataclasses.dataclass
class DataCheckConfig:
    datasets: list[str] = dataclasses.field(default_factory=lambda: ["math500", "gsm8k"])
    limit: int | None = None  # problems per dataset; None = all
    # For dataset paths (.jsonl/.parquet): Problem field -> file column, e.g. {question: prompt}.
    columns: dict[str, str] | None = None
    out_dir: str = "runs/data_check"
    batch_size: int = 64
    skip_bad: bool = False  # skip malformed records (counted in the summary) instead of failing
    overwrite: bool = False  # recompute datasets whose summary already exists
    ray_address: str | None = None  # None: RAY_ADDRESS or a local loopback cluster
    num_cpus: int | None = None  # CPUs of a local cluster started by this run

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ValueError("datasets: give at least one dataset name or path")
        for name in self.datasets:
            if name.startswith(_PROCESSBENCH_PREFIX):
                raise ValueError(f"datasets: {name!r} has step labels, not gold answers; it cannot be checked here")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be >= 1 or null, got {self.limit}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")


def grade_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data UDF: extract each reference solution's answer and compare it with the gold answer."""
    golds = batch["answer"].tolist()
    solutions = batch["solution"].tolist()
    extracted = [extract_answer(s) if s else None for s in solutions]
    equivalent = [
        bool(e is not None and g is not None and is_equivalent(e, g)) for e, g in zip(extracted, golds)
    ]
    return {
        "id": batch["id"],
        "source": batch["source"],
        "gold": np.array(golds, dtype=object),
        "extracted": np.array(extracted, dtype=object),
        "has_answer": np.array([e is not None for e in extracted], dtype=bool),
        "equivalent": np.array(equivalent, dtype=bool),
    }


def run_data_check(cfg: DataCheckConfig) -> dict[str, Any]:
    """Check every dataset of `cfg`; returns {dataset: summary}. Finished datasets are reused."""
    from mathprm.data.ray_data import problems_dataset
    from mathprm.ray_utils import check_job_paths, init_ray

    check_job_paths(out_dir=cfg.out_dir)
    init_ray(cfg.ray_address, cfg.num_cpus)
    results: dict[str, Any] = {}
    for name in cfg.datasets:
        out = Path(cfg.out_dir) / name.replace(":", "_").replace("/", "_")
        summary_path = out / "summary.json"
        if summary_path.exists() and not cfg.overwrite:
            results[name] = json.loads(summary_path.read_text())
            print(f"[data-check] {name}: reused {summary_path}", flush=True)
            continue
        start = time.perf_counter()
        errors: list = []
        extra = {"columns": cfg.columns} if cfg.columns else {}
        ds = problems_dataset(name, limit=cfg.limit, skip_bad=cfg.skip_bad, errors=errors, **extra)
        graded = ds.map_batches(grade_batch, batch_size=cfg.batch_size).materialize()
        # One pass over the materialized blocks; each Ray Data aggregate would be a new execution.
        n = n_equal = n_extracted = 0
        failures: list[dict[str, Any]] = []
        for batch in graded.iter_batches(batch_size=1024, batch_format="pyarrow"):
            rows = batch.select(["id", "gold", "extracted", "has_answer", "equivalent"]).to_pylist()
            n += len(rows)
            n_equal += sum(r["equivalent"] for r in rows)
            n_extracted += sum(r["has_answer"] for r in rows)
            failures += [{k: r[k] for k in ("id", "gold", "extracted")} for r in rows if not r["equivalent"]]
        with atomic.directory(out, overwrite=True) as tmp:
            graded.write_parquet(str(tmp / "rows"))
            summary = {
                "dataset": name,
                "problems": n,
                "extracted": n_extracted,
                "equivalent": n_equal,
                "skipped_bad_records": len(errors),
                "seconds": round(time.perf_counter() - start, 2),
                "failures": failures[:50],
            }
            atomic.write_json(tmp / "summary.json", summary)
        results[name] = summary
        print(
            f"[data-check] {name}: {n_equal}/{n} reference answers agree with gold "
            f"({summary['seconds']} s) -> {out}",
            flush=True,
        )
    return results


def format_check(results: dict[str, Any]) -> str:
    lines = ["| dataset | problems | gold == extracted | skipped | seconds |", "|---|---:|---:|---:|---:|"]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s['problems']} | {s['equivalent']} | {s['skipped_bad_records']} | {s['seconds']} |"
        )
    return "\n".join(lines)
