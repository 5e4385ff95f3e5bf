"""Problems as Ray Datasets: the loaders of `mathprm.data.problems`, one row per problem.

The loaders run on the driver (files of a few thousand records; they need whole-file
context for line numbers in errors and for stable ids) and the rows then flow through
Ray Data. Rows are `Problem.to_dict()`; `Problem.from_dict(row)` rebuilds a record inside
a `map_batches` stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mathprm.data.problems import BadRecordError, Problem, ProcessBenchItem, load_problems

if TYPE_CHECKING:
    import ray.data


def problems_dataset(
    source: str | list[Problem] | list[ProcessBenchItem],
    *,
    limit: int | None = None,
    skip_bad: bool = False,
    errors: list[BadRecordError] | None = None,
    override_num_blocks: int | None = None,
    **load_kwargs: Any,
) -> ray.data.Dataset:
    """A Ray Dataset of problems from a dataset name / file path (see `load_problems`) or records.

    Requires Ray to be initialised (`mathprm.ray_utils.init_ray`).
    """
    import ray.data

    if isinstance(source, str):
        records = load_problems(source, limit=limit, skip_bad=skip_bad, errors=errors, **load_kwargs)
    else:
        records = list(source)[:limit] if limit is not None else list(source)
    if not records:
        raise ValueError(f"no problems to put in a dataset from {source if isinstance(source, str) else 'records'}")
    return ray.data.from_items([r.to_dict() for r in records], override_num_blocks=override_num_blocks)


def rows_to_problems(batch: dict[str, Any]) -> list[Problem]:
    """Rebuild `Problem`s from a `map_batches` batch in the default (numpy) format."""
    columns = list(batch)
    n = len(batch[columns[0]]) if columns else 0
    return [Problem.from_dict({c: _plain(batch[c][i]) for c in columns}) for i in range(n)]


def _plain(value: Any) -> Any:
    """numpy scalars / arrays from a batch back to Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def records_on_actor_pool(worker: type, constructor_args: tuple, chunks: list[list[Problem]], num_actors: int,
                          progress: str | None = None) -> list[dict[str, Any]]:
    """Per-problem records (JSON-able dicts) from a Ray Data actor pool, in problem order.

    `worker(*constructor_args)` is built once per actor (its models load there); each call
    gets a batch `{"id": [problem ids], "chunk": [index of the chunk]}` of up to one chunk's
    size and returns `{"record": [one JSON string per problem]}`. With `progress`, a line
    `[progress] done/total problems, seconds` is printed after every chunk's worth."""
    import json
    import time

    import ray.data

    problems = [p for chunk in chunks for p in chunk]
    size = max(len(c) for c in chunks)
    rows = [{"id": p.id, "chunk": c} for c, chunk in enumerate(chunks) for p in chunk]
    ds = ray.data.from_items(rows).map_batches(worker, fn_constructor_args=constructor_args, batch_size=size,
                                                 compute=ray.data.ActorPoolStrategy(size=num_actors))
    started, records = time.monotonic(), []
    for row in ds.iter_rows():
        records.append(json.loads(row["record"]))
        if progress and (len(records) % size == 0 or len(records) == len(problems)):
            print(f"[{progress}] {len(records)}/{len(problems)} problems, {time.monotonic() - started:.0f}s",
                  flush=True)
    order = {p.id: i for i, p in enumerate(problems)}
    return sorted(records, key=lambda r: order[r["id"]])
