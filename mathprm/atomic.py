"""Atomic outputs: a reader sees a finished file or directory, or nothing.

Every stage writes into a temporary sibling and renames it into place at the end, so a
killed run never leaves a half-written file that a later reader (or a resumed run) would
take for a finished one. Renames are atomic on one POSIX filesystem, which is why the
temporary always lives beside its target and not in /tmp. A file damaged anyway (a disk
fault, a copy cut short) reads back through `read_json` as one line naming it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def file(path: str | Path, mode: str = "wb") -> Iterator[Any]:
    """Yield a file open on a temporary sibling of `path` that becomes `path` (fsync + rename)
    only if the block finishes; e.g. `with file(p) as f: pyarrow.parquet.write_table(t, f)`.
    Temporaries are named `.<name>.tmp-<hex>`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (temp file + fsync + rename)."""
    with file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, fix: str) -> dict[str, Any]:
    """The JSON object in `path`, a stage's own earlier output read back; a ConfigError naming
    the file, the reason and `fix` (what to do) when it is truncated, empty or not an object."""
    from mathprm.config import ConfigError

    try:
        value = json.loads(Path(path).read_text())
        if not isinstance(value, dict):
            raise ValueError(f"a JSON {type(value).__name__}, not an object")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable JSON object ({e}); {fix}") from None
    return value


def check_not_a_file(path: str | Path, field: str) -> None:
    """A ConfigError naming `field` when the output directory `path` exists as a file."""
    from mathprm.config import ConfigError

    if Path(path).exists() and not Path(path).is_dir():
        raise ConfigError(f"{field}: {path} is a file, not a directory; move it aside or use another {field}")


@contextlib.contextmanager
def directory(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block finishes.

    Ray's `write_parquet` and HF's `save_pretrained` write many files; wrapping them here
    makes the whole directory appear at once. An existing `path` is an error unless
    `overwrite` (then it is replaced only after the new one is complete).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists (pass overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
