"""The part files of a labelling run (`runs/.../mcts/labels/part-*.parquet`): one file per batch of
problems, written atomically, holding the problems' step labels (`steptable.SCHEMA` rows) and, in
the file's metadata, which problems it holds and what each cost. A problem's labels never
straddle two files, so a killed run resumes by skipping the problems its files already hold.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mathprm import atomic
from mathprm.config import ConfigError
from mathprm.data.problems import Problem
from mathprm.labels import steptable
from mathprm.labels.steptable import StepLabel
from mathprm.labels.treesearch import SearchStats

PROBLEMS_KEY = b"mathprm.problems"  # Parquet metadata key: the problems a labels file holds (a format name)
PART_FILES = "part-*.parquet"  # the committed files in a labels folder (atomic.file's temporaries start with ".")


# Per-problem costs kept in a file's metadata and summed into summary.json.
PROBLEM_FIELDS = ("n_labels", "n_rollouts", "n_tokens", "n_calls", "n_all_failed", "n_searches", "skipped_too_long")


_LABEL_STRUCT = pa.struct(list(steptable.SCHEMA))


def problems_block(results: Iterable[tuple[Problem, list[StepLabel], SearchStats, float]], generator: str,
                   seed: int) -> pa.Table:
    """One row per searched problem: its id, costs and seconds, and its labels as a list of
    `steptable.SCHEMA` structs (so a problem's labels never straddle two blocks or files)."""
    rows = list(results)
    tables = [steptable.to_table(labels, generator, seed) for _, labels, _, _ in rows]
    offsets = [0]
    for t in tables:
        offsets.append(offsets[-1] + t.num_rows)
    flat = pa.concat_tables(tables) if tables else steptable.SCHEMA.empty_table()
    structs = pa.StructArray.from_arrays([flat.column(n).combine_chunks() for n in steptable.SCHEMA.names],
                                         fields=list(steptable.SCHEMA))
    # Counts the labels themselves give are taken from them; the rest from the search's stats.
    derived = {"n_labels": lambda labels: len(labels),
               "n_all_failed": lambda labels: sum(lab.n_correct == 0 for lab in labels)}
    columns: dict[str, Any] = {"problem_id": pa.array([p.id for p, *_ in rows], pa.string())}
    for name in PROBLEM_FIELDS:
        values = [derived[name](labels) if name in derived else getattr(stats, name) for _, labels, stats, _ in rows]
        columns[name] = pa.array(values, pa.int64())
    columns["no_labels"] = pa.array([stats.no_labels for _, _, stats, _ in rows], pa.string())
    columns["seconds"] = pa.array([s for *_, s in rows], pa.float64())
    columns["labels"] = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), structs,
                                                 type=pa.list_(pa.field("item", _LABEL_STRUCT, nullable=False)))
    return pa.table(columns)


REPAIR = "move it aside or rerun with repair=true"  # the fix a bad part file's error offers


def unreadable(path: Path, error: Exception, fix: str) -> ConfigError:
    """The one-line error for a Parquet file that cannot be read: it names the file, pyarrow's
    reason (its first line) and `fix`."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ConfigError(f"{path} is not a readable Parquet file ({reason}); {fix}")


def parquet_schema(path: Path, fix: str) -> pa.Schema:
    """The schema (and metadata) in `path`'s footer, or `unreadable`'s error: a truncated, empty
    or random file fails here, before any worker reads it."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as e:
        raise unreadable(path, e, fix) from None


def _problems_of(path: Path, whole: bool) -> list[dict[str, Any]]:
    """The problem rows in a part file's metadata; ConfigError naming the file when it is not a
    readable part file. `whole`: read its labels too (a broken page past the footer shows only then)."""
    meta = parquet_schema(path, REPAIR).metadata or {}
    if PROBLEMS_KEY not in meta:
        raise ConfigError(f"{path} was not written by the tree-search stage (no {PROBLEMS_KEY.decode()} metadata); "
                          f"{REPAIR}")
    try:
        rows = json.loads(meta[PROBLEMS_KEY])
        if not all(isinstance(r["problem_id"], str) for r in rows):
            raise TypeError("a problem id is not a string")
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"{path}: its {PROBLEMS_KEY.decode()} metadata is not a list of problems ({e}); "
                          f"{REPAIR}") from None
    if whole:
        try:
            pq.read_table(path, schema=steptable.SCHEMA)
        except (OSError, pa.ArrowException) as e:
            raise unreadable(path, e, REPAIR) from None
    return rows


def committed_problems(labels_dir: Path, repair: bool = False) -> dict[str, dict[str, Any]]:
    """problem id -> its costs, from the metadata of every committed labels file.

    A file that is not a readable part file (truncated, empty, random bytes, another program's
    Parquet) is a ConfigError naming it. With `repair` it is read whole and, if unreadable,
    moved aside into `<out_dir>/corrupt/` (never deleted), so its problems count as not done
    and a rerun labels them again."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(labels_dir.glob(PART_FILES)):
        try:
            rows = _problems_of(path, whole=repair)
        except ConfigError:
            if not repair:
                raise
            aside = labels_dir.parent / "corrupt" / path.name
            aside.parent.mkdir(exist_ok=True)
            while aside.exists():
                aside = aside.with_name(aside.name + "~")
            os.replace(path, aside)
            print(f"[mcts] repair: moved the unreadable {path} aside to {aside}; its problems are labelled again",
                  flush=True)
            continue
        for row in rows:
            if row["problem_id"] in out:
                raise ConfigError(f"{labels_dir}: problem {row['problem_id']!r} is in two files, {path.name} and "
                                  f"{out[row['problem_id']]['file']}; move one of them aside")
            out[row["problem_id"]] = {**row, "file": path.name}
    return out


def no_label_reasons(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """reason -> how many of the committed problems `rows` (`committed_problems`' values) have
    no label for it (`treesearch.NO_LABELS`), most frequent first."""
    counts: dict[str, int] = {}
    for r in rows:
        if r["n_labels"] == 0:
            why = r.get("no_labels") or "not recorded"  # files written before reasons were kept
            counts[why] = counts.get(why, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def write_labels_file(block: pa.Table, path: Path) -> tuple[int, int]:
    """Flatten a `problems_block` into `steptable.SCHEMA` rows and write them to `path`
    atomically, with the block's problems and costs in the file's metadata. Returns
    (problems, labels)."""
    labels = pa.Table.from_struct_array(block.column("labels").combine_chunks().flatten()).cast(steptable.SCHEMA)
    problems = block.drop_columns(["labels"]).to_pylist()
    labels = labels.replace_schema_metadata({PROBLEMS_KEY: json.dumps(problems).encode()})
    with atomic.file(path) as f:
        pq.write_table(labels, f)
    return len(problems), labels.num_rows


def read_labels(out_dir: str | Path) -> pa.Table:
    """The step-score table of a tree-search output directory (every committed file)."""
    files = sorted((Path(out_dir) / "labels").glob(PART_FILES))
    if not files:
        return steptable.SCHEMA.empty_table()
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, schema=steptable.SCHEMA))
        except (OSError, pa.ArrowException) as e:
            raise unreadable(f, e, REPAIR) from None
    return pa.concat_tables(tables).replace_schema_metadata(None)


def trl_schema(hard: bool) -> pa.Schema:
    return pa.schema([("prompt", pa.string()), ("completions", pa.list_(pa.string())),
                      ("labels", pa.list_(pa.bool_() if hard else pa.float64()))])
