"""What the web page (mathprm/serve/static/) reads besides the search, with no HTTP and no Ray in
it: a few problems of the server's dataset with their gold answers, and the tree-search label
datasets under `labels_dir` (`runs/.../mcts/labels/part-*.parquet`, `steptable.SCHEMA` rows).

Every path a client names is relative to `labels_dir` and refused (`RequestError` naming
`path`) when it leaves it: absolute, with `..`, or through a symbolic link that points out.
Only the metadata footers are read to list a dataset's problems, and only the one part file
that holds a problem to show its labels, so a large run answers as fast as a small one.
"""

import os
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from mathprm.config import ConfigError
from mathprm.data.problems import load_problems
from mathprm.labels import steptable
from mathprm.labels.parts import PART_FILES, REPAIR, committed_problems, unreadable
from mathprm.serve.solver import RequestError

ARITH_LEVELS = ("easy", "medium", "hard")


def sample_problems(dataset: str, limit: int) -> list[dict[str, Any]]:
    """The first `limit` problems of `dataset` as `{id, question, answer}` (the gold answer;
    None where the source has none). "arith" (any arithmetic world) takes them from each level
    in turn. A dataset whose files are not on this machine is a 404 that names it."""
    try:
        if dataset == "arith":
            levels = [load_problems(f"arith:{level}", limit=limit) for level in ARITH_LEVELS]
            problems = [p for row in zip(*levels) for p in row][:limit]
        else:
            problems = load_problems(dataset, limit=limit)
    except FileNotFoundError:
        raise RequestError(None, f"the dataset {Path(dataset).name!r} is not on this server; set the app's "
                                 "`problems` arg to one that is, e.g. sample:math500", status=404) from None
    return [{"id": p.id, "question": p.question, "answer": getattr(p, "answer", None)} for p in problems]


# ----------------------------------------------------------------------------- label datasets


def _root(labels_dir: str | None) -> Path:
    if labels_dir is None:
        raise RequestError(None, "the labels view is off on this server (its labels_dir is null)", status=404)
    return Path(labels_dir).resolve()


def label_datasets(labels_dir: str | None) -> list[dict[str, Any]]:
    """Every folder under `labels_dir` holding part files, as `{path, files}` (`path` relative
    to labels_dir, the name the other calls take), sorted by path. Links to folders are not
    followed, and hidden folders (".git", a run's temporaries) are skipped."""
    root = _root(labels_dir)
    found = []
    for folder, dirs, _ in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        parts = list(Path(folder).glob(PART_FILES))
        if parts:
            found.append({"path": Path(folder).relative_to(root).as_posix(), "files": len(parts)})
    return sorted(found, key=lambda d: d["path"])


def _folder(labels_dir: str | None, path: str) -> tuple[Path, Path]:
    """(labels_dir, the label dataset `path` names in it), or a RequestError naming `path`: 400
    for a path that leaves labels_dir, 404 for one that holds no part files."""
    root = _root(labels_dir)
    rel = PurePosixPath(path)
    if not path or "\x00" in path or "\\" in path or rel.is_absolute() or ".." in rel.parts:
        raise RequestError("path", f"path: {path!r} must be a relative path inside labels_dir, without '..'",
                           status=400)
    folder = root / rel
    # Resolving follows every link, in the folder's path and in its files' names: none may lead out.
    targets = [folder, *folder.glob(PART_FILES)] if folder.is_dir() else [folder]
    if not all(t.resolve().is_relative_to(root) for t in targets):
        raise RequestError("path", f"path: {path!r} links outside labels_dir", status=400)
    if len(targets) == 1:
        raise RequestError("path", f"path: {path!r} is not a label dataset (a folder of {PART_FILES}) under "
                                   "labels_dir; GET /v1/labels lists them", status=404)
    return root, folder


def _committed(root: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """`committed_problems` of `folder`, its error (a part file it cannot read) a 422 naming
    `path`, with paths in it relative to labels_dir as the client names them."""
    try:
        return committed_problems(folder)
    except ConfigError as e:
        raise RequestError("path", "path: " + str(e).replace(f"{root}{os.sep}", ""), status=422) from None


def label_problems(labels_dir: str | None, path: str) -> list[dict[str, Any]]:
    """The problems of the label dataset `path`, as `{id, n_labels, n_rollouts}` in file order
    (from the files' metadata: no label is read)."""
    root, folder = _folder(labels_dir, path)
    return [{"id": pid, "n_labels": row["n_labels"], "n_rollouts": row["n_rollouts"]}
            for pid, row in _committed(root, folder).items()]


def label_problem(labels_dir: str | None, path: str, problem_id: str) -> dict[str, Any]:
    """One problem of the label dataset `path`: `{id, question, labels}`, its labelled steps
    (prefix, step, score, n_rollouts, n_correct, depth, method) by depth, in the search's order
    within a depth; a 404 naming `id` when the dataset does not hold it."""
    root, folder = _folder(labels_dir, path)
    row = _committed(root, folder).get(problem_id)
    if row is None:
        raise RequestError("id", f"id: no problem {problem_id!r} in {path}; GET /v1/labels/problems lists them",
                           status=404)
    file = folder / row["file"]
    try:
        table = pq.read_table(file, schema=steptable.SCHEMA, filters=[("problem_id", "=", problem_id)])
    except (OSError, pa.ArrowException) as e:
        raise RequestError("path", "path: " + str(unreadable(file.relative_to(root), e, REPAIR)), status=422) from None
    labels = sorted(steptable.from_table(table), key=lambda lab: lab.depth)
    return {"id": problem_id, "question": labels[0].question if labels else None,
            "labels": [{"prefix": list(lab.prefix), "step": lab.step, "score": lab.score, "n_rollouts": lab.n_rollouts,
                        "n_correct": lab.n_correct, "depth": lab.depth, "method": lab.method} for lab in labels]}
