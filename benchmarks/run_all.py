"""`make bench`: run every benchmarks/bench_*.py with --write, which records its figures in docs/BENCHMARKS.md.

Accuracy and speed targets live here, not in the unit tests: each script prints its table,
and writes it (with the command, the date and the machine) into its own section of the doc.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    failed = []
    for script in sorted(HERE.glob("bench_*.py")):
        print(f"== {script.name}", flush=True)
        if subprocess.run([sys.executable, str(script), "--write"], cwd=HERE.parent).returncode != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
