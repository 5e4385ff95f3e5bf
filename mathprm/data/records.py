"""Records of math data and the strict reading they share: `Problem`, `ProcessBenchItem`,
`BadRecordError` (file, line, field), and the row readers every loader in `problems` uses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

logger = logging.getLogger("mathprm.data.problems")  # the loaders' warnings, under the name users filter on


R = TypeVar("R", "Problem", "ProcessBenchItem")


class BadRecordError(ValueError):
    """A malformed record; the message reads `WHERE: field 'NAME': what is wrong`."""

    def __init__(self, where: str, field: str | None, reason: str) -> None:
        self.where, self.field, self.reason = where, field, reason
        super().__init__(f"{where}: field {field!r}: {reason}" if field else f"{where}: {reason}")


@dataclass(frozen=True)
class Problem:
    """One problem with its gold answer; the unit every stage (search, labelling, scoring) works on."""

    id: str  # stable and unique within a load (module docstring)
    question: str
    answer: str | None  # gold final answer text; None only where the source has none
    source: str  # "gsm8k", "math500", "math", "math_hard", "table", "hf", ...
    solution: str | None = None  # reference solution, when the source has one
    metadata: dict = field(default_factory=dict)  # level (int), subject, unique_id, ...

    def to_dict(self) -> dict[str, Any]:
        """A flat row for Arrow / Ray Data: metadata becomes a JSON string, so no column
        holds dicts whose keys differ from row to row."""
        return asdict(self) | {"metadata": json.dumps(self.metadata, ensure_ascii=False)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> Problem:
        """The inverse of `to_dict`."""
        return cls(**(row | {"metadata": json.loads(row["metadata"])}))


@dataclass(frozen=True)
class ProcessBenchItem:
    """One ProcessBench solution with its human step label (Zheng et al. 2024)."""

    id: str  # "gsm8k-0"
    subset: str  # gsm8k, math, olympiadbench, omnimath
    problem: str
    steps: tuple[str, ...]
    label: int  # 0-based index of the earliest wrong step; -1 if every step is right
    final_answer_correct: bool
    generator: str  # the model that wrote the solution

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"steps": list(self.steps)}

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> ProcessBenchItem:
        """The inverse of `to_dict`."""
        return cls(**(row | {"steps": tuple(row["steps"])}))


def jsonl_rows(path: Path) -> Iterator[tuple[str, int, Any]]:
    """(where, 0-based line, line text) for each non-blank line, read lazily (so `limit`
    stops reading early); a missing file raises now, not at the first row."""
    existing_file(path)

    def rows() -> Iterator[tuple[str, int, Any]]:
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield f"{path}:{i + 1}", i, line

    return rows()


def existing_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"no such data file: {path}")
    return path


def collect_records(
    rows: Iterable[tuple[str, int, Any]],
    parse: Callable[[dict, str, str], R | None],
    id_prefix: str,
    what: str,
    skip_bad: bool,
    errors: list[BadRecordError] | None,
    limit: int | None,
) -> list[R]:
    """Parse `rows` (where, index, raw) into records; `parse(record, where, default_id)` returns
    None to drop one; the default id is f"{id_prefix}-{index}"; `what` names the file in logs."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit: must be >= 0 or None, got {limit}")
    out: list[R] = []
    bad: list[BadRecordError] = []
    seen: dict[str, str] = {}  # id -> where it was first seen
    for where, index, raw in rows:
        if limit is not None and len(out) >= limit:
            break
        try:
            rec = as_object(raw, where)
            item = parse(rec, where, f"{id_prefix}-{index}")
            if item is None:
                continue
            if item.id in seen:
                raise BadRecordError(where, "id", f"{item.id!r} repeats the id of {seen[item.id]}")
        except BadRecordError as e:
            if not skip_bad:
                raise
            bad.append(e)
            continue
        seen[item.id] = where
        out.append(item)
    if bad:
        logger.warning("skipped %d bad record(s) in %s; the first: %s", len(bad), what, bad[0])
        if errors is not None:
            errors.extend(bad)
    return out


def as_object(raw: Any, where: str) -> dict:
    if isinstance(raw, str):  # a JSON line
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as e:
            raise BadRecordError(where, None, f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(raw, dict):
        raise BadRecordError(where, None, f"expected a JSON object, got {type(raw).__name__}")
    return raw


def text_field(rec: dict, where: str, name: str) -> str:
    """A required, non-empty string field."""
    if name not in rec or rec[name] is None:
        raise BadRecordError(where, name, "missing")
    value = rec[name]
    if not isinstance(value, str):
        raise BadRecordError(where, name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRecordError(where, name, "empty")
    return value


def text_or_number_field(rec: dict, where: str, name: str) -> str:
    """A table's answer or id: a string, or a number written as one (gold answers often are)."""
    value = rec.get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return text_field(rec, where, name)
