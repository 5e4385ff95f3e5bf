"""Shared by the benchmarks: the machine line, writing one section of docs/BENCHMARKS.md and its
rows in the figures table at the top of that doc."""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
from collections.abc import Iterable
from pathlib import Path

from mathprm import atomic

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "BENCHMARKS.md"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{os.cpu_count()}-core CPU ({names[0] if names else cpu}), {gpu}, Python {platform.python_version()}"


def repo_relative(path: str | Path) -> Path:
    """`path` relative to the repository when it lies inside it (for the doc), else absolute."""
    path = Path(path).resolve()
    return path.relative_to(REPO) if path.is_relative_to(REPO) else path


def rollout_speed(gen, prefixes: list, n: int, sampling, repeats: int) -> dict:
    """Best generated tokens/s of `gen.rollouts(prefixes, n, ...)` over `repeats` timed calls
    (seeds `sampling.seed + 1 ...`) after one warm-up call with `sampling` itself."""
    import dataclasses
    import time

    gen.rollouts(prefixes, n, sampling)  # warm-up (allocations, vLLM's first-batch paths)
    best = None
    for r in range(repeats):
        t0 = time.perf_counter()
        out = gen.rollouts(prefixes, n, dataclasses.replace(sampling, seed=sampling.seed + r + 1))
        dt = time.perf_counter() - t0
        tokens = sum(roll.n_tokens for rolls in out for roll in rolls)
        if best is None or tokens / dt > best["tokens_per_s"]:
            best = {"tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1)}
    return best


# The table of figures that hold today, at the top of the doc: rows "| figure | value | command | date |
# machine |" between these markers. A script owns the rows whose figure names it passes to write_section.
FIGURES_START = "<!-- figures:start -->"
FIGURES_END = "<!-- figures:end -->"
_FIRST_CELL = re.compile(r"^\|\s*(.*?)\s*(?<!\\)\|")


def _cell(text: str) -> str:
    """`text` as one table cell: on one line, its pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def update_figures(doc: str, figures: Iterable[tuple[str, str]], command: str, date: str, where: str) -> str:
    """`doc` with the figures table's row of each (figure, value) in `figures` rewritten in place
    (value, command, date, machine); a figure without a row gets one at the table's end, a second
    row of the same figure goes, and every other row is kept as it is. No table: `doc` unchanged."""
    rows = {_cell(f): f"| {_cell(f)} | {_cell(v)} | `{_cell(command)}` | {date} | {_cell(where)} |"
            for f, v in figures}
    start, end = doc.find(FIGURES_START), doc.find(FIGURES_END)
    if not rows or start < 0 or end < start:
        if rows:
            print(f"no {FIGURES_START} ... {FIGURES_END} table in {DOC}: its figure rows not written")
        return doc
    start += len(FIGURES_START)
    kept, written, last_row = [], set(), 1  # 1: after the marker's own line
    for line in doc[start:end].split("\n"):
        m = _FIRST_CELL.match(line)
        name = m.group(1) if m else None
        if name in written:
            continue
        if name in rows:
            line = rows.pop(name)
            written.add(name)
        kept.append(line)
        if m:
            last_row = len(kept)
    kept[last_row:last_row] = list(rows.values())
    return doc[:start] + "\n".join(kept) + doc[end:]


def command_line(script: str, parser: argparse.ArgumentParser, args: argparse.Namespace,
                 leave_out: Iterable[str] = ()) -> str:
    """The command that reran this benchmark for the doc: `script` with the options that differ
    from their defaults (less `leave_out` and --write), then --write."""
    skip = {"write", *leave_out}
    return f"python benchmarks/{script}" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in skip and v != parser.get_default(k)) + " --write"


def write_section(title: str, command: str, body: str, figures: Iterable[tuple[str, str]] = ()) -> None:
    """Replace (or append) the `## title` section with the command, date, machine and `body`, and
    rewrite the figures table's rows of `figures`, (figure, value) pairs (`update_figures`)."""
    section = f"## {title}"
    date, where = datetime.date.today().isoformat(), machine()
    text = "\n".join([section, "", f"Command: `{command}`  ", f"Date: {date}  ",
                      f"Machine: {where}", "", body.strip("\n"), ""])
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    doc = pattern.sub(lambda _: text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    doc = update_figures(doc, figures, command, date, where)
    atomic.write_text(DOC, doc)
    print(f"wrote {section!r} in {DOC}")
