"""Shared by the benchmarks: the machine line and writing one section of docs/BENCHMARKS.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
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


def write_section(title: str, command: str, body: str) -> None:
    """Replace (or append) the `## title` section with the command, date, machine and `body`."""
    section = f"## {title}"
    text = "\n".join([section, "", f"Command: `{command}`  ", f"Date: {datetime.date.today().isoformat()}  ",
                      f"Machine: {machine()}", "", body.strip("\n"), ""])
    doc = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    doc = pattern.sub(lambda _: text + "\n", doc) if pattern.search(doc) else doc.rstrip("\n") + "\n\n" + text
    atomic.write_text(DOC, doc)
    print(f"wrote {section!r} in {DOC}")
