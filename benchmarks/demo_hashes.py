"""Fingerprints of `make demo QUICK=1`'s outputs, to show that a refactor changed no behaviour.

    .venv/bin/python benchmarks/demo_hashes.py --run --out runs/demo_hashes/after.json
    .venv/bin/python benchmarks/demo_hashes.py --compare runs/demo_hashes/before.json runs/demo_hashes/after.json

`--run` runs `mathprm demo --quick` in a fresh folder (so nothing is reused) and hashes what it
wrote; `--root DIR` hashes an existing `runs/quick`. The fingerprints cover the outputs each stage
hands to the next: the policy's and the checker's weights, the label table (its rows, in a fixed
order, whatever the part files), the PRM, every evaluation report with its per-problem records
(less timings and paths), and the PPO policy. Same seeds must give the same fingerprints; `--compare` exits 1 naming each one
that differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ("policy", "checker", "prm", "policy-ppo")
REPORTS = ("eval/policy_arith_hard.json", "prm_eval.json", "eval.json", "eval/policy_ppo_arith_hard.json")
# Report keys that measure the run or name its folders, not its results.
VOLATILE = ("seconds", "elapsed", "_s", "time", "date", "path", "dir", "prm", "policy", "out", "plot")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights(folder: Path) -> str:
    """One hash over every safetensors file of a model folder, by relative name."""
    files = sorted(folder.rglob("*.safetensors"))
    if not files:
        raise SystemExit(f"demo_hashes: no weights under {folder}")
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(folder)).encode() + b"\0" + _sha(f.read_bytes()).encode())
    return h.hexdigest()


def labels(folder: Path, root: Path) -> str:
    """The label table's rows, sorted, as canonical JSON (part files and row order may vary), the
    run folder's own path (in the `generator` column) written as `<root>`."""
    import pyarrow.parquet as pq

    rows = []
    for part in sorted(folder.rglob("*.parquet")):
        rows += pq.read_table(part).to_pylist()
    if not rows:
        raise SystemExit(f"demo_hashes: no label rows under {folder}")
    text = "\n".join(sorted(json.dumps(r, sort_keys=True, default=str) for r in rows))
    return _sha(text.replace(str(root.resolve()), "<root>").encode())


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in sorted(value.items())
                if not any(k == v_ or k.endswith(v_) for v_ in VOLATILE)}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def report(path: Path) -> str:
    """A report (less timings and paths) and its per-problem records (`<name>.problems.jsonl`:
    every strategy's chosen steps and scores), when it has them."""
    parts = [json.dumps(_strip(json.loads(path.read_text())), sort_keys=True)]
    records = path.with_suffix(".problems.jsonl")
    if records.is_file():
        parts += [json.dumps(_strip(json.loads(line)), sort_keys=True) for line in records.read_text().splitlines()]
    return _sha("\n".join(parts).encode())


def fingerprints(root: Path) -> dict[str, str]:
    out = {f"weights:{name}": weights(root / name) for name in WEIGHTS}
    out["labels:mcts"] = labels(root / "mcts", root)
    out |= {f"report:{name}": report(root / name) for name in REPORTS}
    return out


def run_quick_demo() -> Path:
    work = Path(tempfile.mkdtemp(prefix="demo-hashes-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "mathprm.cli", "demo", "--quick"], cwd=work, env=env, check=True)
    return work / "runs" / "quick"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true", help="run the quick demo in a fresh folder first")
    ap.add_argument("--root", type=Path, default=ROOT / "runs" / "quick", help="an existing runs/quick to hash")
    ap.add_argument("--out", type=Path, help="write the fingerprints here as JSON")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = ap.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        differ = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        for k in differ:
            print(f"differs: {k}")
        print(f"{len(before.keys() | after.keys()) - len(differ)} identical, {len(differ)} differ")
        return 1 if differ else 0
    prints = fingerprints(run_quick_demo() if args.run else args.root)
    text = json.dumps(prints, indent=2, sort_keys=True)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
