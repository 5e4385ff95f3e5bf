"""Math problems from the public benchmark files, as plain records.

`load_problems("gsm8k")` (or "gsm8k:train", "math500", "math", "math_hard",
"processbench:<subset>", "sample:gsm8k", a .jsonl/.parquet path) returns `Problem`s, or
`ProcessBenchItem`s for ProcessBench. Files live in `data_dir()`; their schemas are in
`shared/data/SOURCES.md`. What each loader takes from its source:

- GSM8K: `answer` is the text after the last `#### ` line, thousands commas removed
  ("1,200" -> "1200"). `solution` is the worked answer without its `<<48/2=24>>` calculator
  annotations and keeps its final `#### 18` line, so that a reference solution, like a
  MATH one, carries its own final answer (the data check extracts it from there).
- MATH: the full test set has no `answer` field; it is the last `\\boxed{}` of the solution.
  `metadata` holds `level` (an int; the file says "Level 5") and `subject` (from
  `subject`, or `type` in the full set); MATH-500 adds `unique_id`.
- MATH Hard is the Level 5 part of the full MATH test set (1324 problems, as in the Open
  LLM Leaderboard).

Ids are stable across runs, `limit`s and subsets: the source's own id where it has one
(MATH-500 `unique_id`, ProcessBench `id`, a table's mapped `id` column), else
`"<file stem>-<0-based line>"`, e.g. "gsm8k_test-0" (for math_test.jsonl that line index is
the `idx` field the upstream copy had). So a MATH Hard problem has the id it has in MATH,
and an id leads straight back to its line. Ids are checked unique within each load.

A malformed record raises `BadRecordError` naming file, line (1-based; record or row index,
0-based, for JSON arrays, Parquet and datasets) and field. With `skip_bad=True` bad
records are left out instead, collected in `errors` when given, and one warning says how
many. `limit` keeps the first `limit` good records and stops reading there.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

from mathprm.data.grading import matching_brace
from mathprm.data.records import (
    BadRecordError,
    Problem,
    ProcessBenchItem,
    collect_records,
    existing_file,
    jsonl_rows,
    text_field,
    text_or_number_field,
)

DATA_DIR_ENV = "MATHPRM_DATA_DIR"
DEFAULT_COLUMNS = {"question": "question", "answer": "answer"}  # a file loaded by path alone
PROBLEM_FILES = (".jsonl", ".json", ".parquet")  # the suffixes `load_problems` reads as a path
_SAMPLES = Path(__file__).resolve().parent / "samples"


# ------------------------------------------------------------------ reading records


# ------------------------------------------------------------------ GSM8K and MATH

_GSM8K_FINAL = re.compile(r"^####(.*)$", re.MULTILINE)
_CALCULATOR = re.compile(r"<<[^<>]*>>")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_LEVEL = re.compile(r"Level ([1-5])")
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _parse_gsm8k(rec: dict, where: str, default_id: str) -> Problem:
    question = text_field(rec, where, "question")
    worked = text_field(rec, where, "answer")
    finals = _GSM8K_FINAL.findall(worked)
    if not finals:
        raise BadRecordError(where, "answer", "no '#### <answer>' line")
    gold = finals[-1].strip()
    if not gold:
        raise BadRecordError(where, "answer", "the '####' line has no answer")
    if _THOUSANDS.fullmatch(gold):
        gold = gold.replace(",", "")
    return Problem(
        id=default_id, question=question, answer=gold, source="gsm8k", solution=_CALCULATOR.sub("", worked)
    )


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` / `\\fbox{...}`, braces nested; None if none or unclosed.

    Which box, and what counts as one, is read here rather than borrowed from
    `mathprm.data.grading.extract_answer`, so the data check compares two independent readings
    of the same solution; only the brace matching is shared.
    """
    boxes = list(_BOX.finditer(text))
    if not boxes:
        return None
    start = boxes[-1].end()  # just after the box's "{"
    end = matching_brace(text, start - 1)
    return None if end is None else text[start:end].strip() or None


def _level(rec: dict, where: str) -> int:
    value = rec.get("level")
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 5:
        return value
    if isinstance(value, str) and (m := _LEVEL.fullmatch(value.strip())):
        return int(m.group(1))
    raise BadRecordError(where, "level", f"expected 1-5 or 'Level 1'-'Level 5', got {value!r}")


def _parse_math(rec: dict, where: str, default_id: str, source: str) -> Problem:
    question = text_field(rec, where, "problem")
    solution = text_field(rec, where, "solution")
    if "answer" in rec:  # MATH-500 states it; the full set leaves it in the solution
        answer = text_field(rec, where, "answer")
    elif (answer := _last_boxed(solution)) is None:
        raise BadRecordError(where, "solution", "no \\boxed{...} answer (and no 'answer' field)")
    metadata: dict[str, Any] = {
        "level": _level(rec, where),
        "subject": text_field(rec, where, "subject" if "subject" in rec else "type"),
    }
    if "unique_id" in rec:
        metadata["unique_id"] = text_field(rec, where, "unique_id")
    return Problem(
        id=metadata.get("unique_id", default_id),
        question=question,
        answer=answer,
        source=source,
        solution=solution,
        metadata=metadata,
    )


def load_gsm8k(
    path: str | Path, *, skip_bad: bool = False, errors: list[BadRecordError] | None = None, limit: int | None = None
) -> list[Problem]:
    """GSM8K JSON Lines ({"question", "answer"}); source "gsm8k"."""
    path = Path(path)
    return collect_records(jsonl_rows(path), _parse_gsm8k, path.stem, str(path), skip_bad, errors, limit)


def load_math(
    path: str | Path,
    *,
    source: str = "math",
    skip_bad: bool = False,
    errors: list[BadRecordError] | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """MATH JSON Lines: MATH-500 (`answer`, int `level`, `subject`, `unique_id`) or the full
    test set (`level` "Level N", `type`, answer boxed in the solution)."""
    path = Path(path)
    parse = partial(_parse_math, source=source)
    return collect_records(jsonl_rows(path), parse, path.stem, str(path), skip_bad, errors, limit)


def load_math_hard(
    path: str | Path, *, skip_bad: bool = False, errors: list[BadRecordError] | None = None, limit: int | None = None
) -> list[Problem]:
    """The Level 5 problems of the full MATH test file; source "math_hard", ids as in MATH."""

    def parse(rec: dict, where: str, default_id: str) -> Problem | None:
        problem = _parse_math(rec, where, default_id, "math_hard")
        return problem if problem.metadata["level"] == 5 else None

    path = Path(path)
    return collect_records(jsonl_rows(path), parse, path.stem, str(path), skip_bad, errors, limit)


# ------------------------------------------------------------------ ProcessBench


def _parse_processbench(rec: dict, where: str, default_id: str, subset: str) -> ProcessBenchItem:
    steps = rec.get("steps")
    if not isinstance(steps, list) or not steps:
        raise BadRecordError(where, "steps", f"expected a non-empty list of strings, got {steps!r:.60}")
    for i, step in enumerate(steps):
        if not isinstance(step, str):
            raise BadRecordError(where, "steps", f"step {i} is a {type(step).__name__}, not a string")
    label = rec.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or not -1 <= label < len(steps):
        raise BadRecordError(where, "label", f"expected -1 or a step index 0-{len(steps) - 1}, got {label!r}")
    correct = rec.get("final_answer_correct")
    if not isinstance(correct, bool):
        raise BadRecordError(where, "final_answer_correct", f"expected true or false, got {correct!r}")
    return ProcessBenchItem(
        id=text_field(rec, where, "id"),
        subset=subset,
        problem=text_field(rec, where, "problem"),
        steps=tuple(steps),
        label=label,
        final_answer_correct=correct,
        generator=text_field(rec, where, "generator"),
    )


def load_processbench(
    path: str | Path, *, skip_bad: bool = False, errors: list[BadRecordError] | None = None, limit: int | None = None
) -> list[ProcessBenchItem]:
    """One ProcessBench subset file (a JSON array); the subset is the file's stem.

    A file that is not a JSON array at all raises even with `skip_bad`: no record can be read.
    """
    path = Path(path)
    try:
        records = json.loads(existing_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise BadRecordError(str(path), None, f"invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(records, list):
        raise BadRecordError(str(path), None, f"expected a JSON array, got {type(records).__name__}")
    rows = ((f"{path}: record {i}", i, rec) for i, rec in enumerate(records))
    parse = partial(_parse_processbench, subset=path.stem)
    return collect_records(rows, parse, path.stem, str(path), skip_bad, errors, limit)


# ------------------------------------------------------------------ any table

_RECORD_FIELDS = ("id", "question", "answer", "solution")


def _parse_row(rec: dict, where: str, default_id: str, columns: dict[str, str], source: str) -> Problem:
    """A row under a column mapping: every mapped column is required; unmapped fields are None."""
    for key, column in columns.items():
        if column not in rec:
            raise BadRecordError(where, column, f"missing (mapped to {key!r})")
    metadata = {key: rec[column] for key, column in columns.items() if key not in _RECORD_FIELDS}
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise BadRecordError(where, None, f"metadata columns are not JSON-serialisable: {e}") from None
    return Problem(
        id=text_or_number_field(rec, where, columns["id"]) if "id" in columns else default_id,
        question=text_field(rec, where, columns["question"]),
        answer=text_or_number_field(rec, where, columns["answer"]) if "answer" in columns else None,
        source=source,
        solution=text_field(rec, where, columns["solution"]) if "solution" in columns else None,
        metadata=metadata,
    )


def _check_mapping(columns: dict[str, str], available: list[str] | None, where: str) -> None:
    """Errors in the mapping itself, and (when the columns are known up front) columns the data lacks."""
    if "question" not in columns:
        raise ValueError(f"columns: must map 'question' to a column, got {columns}")
    for key in ("source", "metadata"):
        if key in columns:
            raise ValueError(f"columns: {key!r} cannot come from a column (source is an argument)")
    if available is not None:
        for key, column in columns.items():
            if column not in available:
                raise BadRecordError(where, column, f"no such column (mapped to {key!r}); columns: {available}")


def load_table(
    path: str | Path,
    columns: dict[str, str],
    source: str = "table",
    *,
    skip_bad: bool = False,
    errors: list[BadRecordError] | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from a Parquet or JSON Lines (.jsonl/.json) file.

    `columns` maps Problem fields to the file's columns, e.g. {"question": "prompt",
    "answer": "gold"}; other keys become metadata ({"level": "difficulty"}). Without an
    `id` column, ids are "<file stem>-<row>".
    """
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(existing_file(path))
        _check_mapping(columns, table.column_names, str(path))
        rows: Iterable[tuple[str, int, Any]] = (
            (f"{path}: row {i}", i, rec) for i, rec in enumerate(table.to_pylist())
        )
    elif path.suffix in (".jsonl", ".json"):
        _check_mapping(columns, None, str(path))
        rows = jsonl_rows(path)
    else:
        raise ValueError(f"{path}: expected a .parquet, .jsonl or .json (JSON Lines) file")
    parse = partial(_parse_row, columns=columns, source=source)
    return collect_records(rows, parse, path.stem, str(path), skip_bad, errors, limit)


def load_hf_dataset(
    ds: datasets.Dataset,
    columns: dict[str, str] | None = None,
    source: str = "hf",
    *,
    skip_bad: bool = False,
    errors: list[BadRecordError] | None = None,
    limit: int | None = None,
) -> list[Problem]:
    """Problems from an already loaded Hugging Face `datasets.Dataset` (one split), mapped as
    in `load_table`; ids default to "<source>-<row>"."""
    if not isinstance(getattr(ds, "column_names", None), list):
        raise TypeError(f"expected one datasets.Dataset split (e.g. ds['test']), got {type(ds).__name__}")
    columns = DEFAULT_COLUMNS if columns is None else columns
    _check_mapping(columns, ds.column_names, f"{source} dataset")
    rows = ((f"{source} dataset: row {i}", i, rec) for i, rec in enumerate(ds))
    parse = partial(_parse_row, columns=columns, source=source)
    return collect_records(rows, parse, source, f"{source} dataset", skip_bad, errors, limit)


# ------------------------------------------------------------------ names


def data_dir() -> Path:
    """The math data folder: $MATHPRM_DATA_DIR, else `shared/data` beside the repository."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"{DATA_DIR_ENV}={env} is not a directory")
        return path
    default = Path(__file__).resolve().parents[3] / "shared" / "data"
    if default.is_dir():
        return default
    raise FileNotFoundError(
        f"no math data found at {default}: set {DATA_DIR_ENV} to the folder holding "
        "gsm8k_test.jsonl, math_test.jsonl and processbench/"
    )


Loader = Callable[..., list[Problem] | list[ProcessBenchItem]]


def _in_data_dir(loader: Loader, name: str) -> Loader:
    return lambda root, **kw: loader((root or data_dir()) / name, **kw)


def _bundled(loader: Loader, name: str) -> Loader:
    return lambda root, **kw: loader(_SAMPLES / name, **kw)


def _arith(spec: str) -> Loader:
    def load(root: Path | None, **kw: Any) -> list[Problem]:
        from mathprm.data.arith import load_arith  # lazy: arith imports this module

        return load_arith(spec, **kw)

    return load


# Dataset name -> loader(data_dir or None, **kw). Generated worlds register here too
# (arith:easy|medium|hard, from mathprm.data.arith, imported lazily: arith imports this module).
_DATASETS: dict[str, Loader] = {
    "gsm8k": _in_data_dir(load_gsm8k, "gsm8k_test.jsonl"),
    "gsm8k:test": _in_data_dir(load_gsm8k, "gsm8k_test.jsonl"),
    "gsm8k:train": _in_data_dir(load_gsm8k, "gsm8k_train.jsonl"),
    "math500": _in_data_dir(partial(load_math, source="math500"), "math500_test.jsonl"),
    "math": _in_data_dir(load_math, "math_test.jsonl"),
    "math_hard": _in_data_dir(load_math_hard, "math_test.jsonl"),
    **{
        f"processbench:{subset}": _in_data_dir(load_processbench, f"processbench/{subset}.json")
        for subset in ("gsm8k", "math", "olympiadbench", "omnimath")
    },
    # First 30 records of each, shipped in the package for machines without the data.
    "sample:gsm8k": _bundled(load_gsm8k, "gsm8k_sample.jsonl"),
    "sample:math500": _bundled(partial(load_math, source="math500"), "math500_sample.jsonl"),
    **{f"arith:{level}": _arith(f"arith:{level}") for level in ("easy", "medium", "hard")},
}


def _family(spec: str) -> str:
    """How a dataset (a name, a path or a `Problem.source`) writes its solutions: "arith" (the
    generated worlds, `arith:*`), "gsm8k" (any name holding it: a step per line) or "math"
    (MATH, ProcessBench and everything else: MATH-length, paragraphs)."""
    spec = str(spec)
    if spec.startswith("arith:"):
        return "arith"
    return "gsm8k" if "gsm8k" in spec.lower() else "math"


def default_separator(spec: str) -> str:
    """The step separator a dataset's solutions are written with: one operation per line in the
    generated arithmetic worlds (`arith:*`), a blank line between steps everywhere else (MATH,
    ProcessBench, Math-Shepherd's convention)."""
    return "\n" if _family(spec) == "arith" else "\n\n"


_TOKEN_CAPS = {"arith": (64, 384), "gsm8k": (256, 1024), "math": (512, 2048)}


def token_caps(spec: str) -> tuple[int, int]:
    """(max_step_tokens, max_solution_tokens) fit for a dataset's solutions, the default of every
    stage that samples: the arithmetic world's one-line steps (64, 384), GSM8K's short worked
    answers (256, 1024), MATH-length solutions everywhere else (512, 2048)."""
    return _TOKEN_CAPS[_family(spec)]


def reference_steps(problem: Problem) -> list[str]:
    """The steps of `problem`'s reference solution as its source writes them: GSM8K's worked
    answers one step per line (their final `#### N` line included), the arithmetic world's one
    operation per line, MATH's paragraphs; blank pieces left out, [] without a solution. These
    are the source's steps, which need not be cut the way a policy's steps are
    (`default_separator`): GSM8K references hold single newlines, a policy writes "\n\n"."""
    if not problem.solution:
        return []
    separator = "\n" if _family(problem.source) == "gsm8k" else default_separator(problem.source)
    return [s for s in problem.solution.split(separator) if s.strip()]


def load_problems(
    spec: str, *, data_dir: str | Path | None = None, **kw: Any
) -> list[Problem] | list[ProcessBenchItem]:
    """Records for a dataset name (see `_DATASETS`) or a .jsonl/.json/.parquet path.

    `kw` goes to the loader: skip_bad, errors, limit; for a path also columns (default
    question/answer columns of the same names) and source.
    """
    if spec in _DATASETS:
        return _DATASETS[spec](Path(data_dir) if data_dir is not None else None, **kw)
    if Path(spec).suffix in PROBLEM_FILES:
        columns = kw.pop("columns", None) or DEFAULT_COLUMNS
        return load_table(spec, columns, **kw)
    raise ValueError(
        f"unknown dataset {spec!r}; known names: {', '.join(_DATASETS)}, "
        "or a path to a .jsonl/.json/.parquet file"
    )
