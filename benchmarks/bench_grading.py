"""Answer grading on the real data: does `mathprm.data.grading` read and compare real answers?

    .venv/bin/python benchmarks/bench_grading.py [--write]

Reports, from the files in MATHPRM_DATA_DIR (default: <repo>/../shared/data):
- MATH-500: the answer extracted from each reference solution vs the `answer` field (and every failure);
- GSM8K test: how many `#### X` lines extract and normalise to a number;
- MATH test (5000): how many reference solutions yield an answer;
- ProcessBench math/gsm8k: real model outputs graded against the gold answer (joined by problem
  text), compared with ProcessBench's own `final_answer_correct` label. This is the workload
  that reaches sympy; MATH-500's reference answers are equal as strings after normalisation.
With --write, the table replaces the "## Answer grading on real data" section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from _doc import update_figures  # noqa: E402

from mathprm import atomic
from mathprm.data import grading  # noqa: E402
from mathprm.data.grading import extract_answer, grade, is_equivalent, normalize_answer  # noqa: E402

DOC = REPO / "docs" / "BENCHMARKS.md"
SECTION = "## Answer grading on real data"
COMMAND = ".venv/bin/python benchmarks/bench_grading.py --write"


def data_dir() -> Path:
    found = Path(os.environ.get("MATHPRM_DATA_DIR") or REPO.parent / "shared" / "data")
    if not found.is_dir():
        raise SystemExit(f"no real data at {found} (set MATHPRM_DATA_DIR)")
    return found


def jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{os.cpu_count()}-core CPU ({names[0] if names else cpu}), no GPU, Python {platform.python_version()}"


def processbench(data: Path, subset: str, golds: dict[str, str]) -> dict:
    """Grade ProcessBench's model outputs against the gold answer; agreement with its label."""
    rows = json.loads((data / "processbench" / f"{subset}.json").read_text(encoding="utf-8"))
    start = time.perf_counter()
    no_answer, disagree = 0, []
    for r in rows:
        answer = extract_answer("\n\n".join(r["steps"]))
        no_answer += answer is None
        ours = answer is not None and is_equivalent(answer, golds[r["problem"].strip()])
        if ours != r["final_answer_correct"] and answer is not None:
            disagree.append((r["id"], r["final_answer_correct"], answer, golds[r["problem"].strip()]))
    agree = len(rows) - no_answer - len(disagree)
    seconds = time.perf_counter() - start
    return {"n": len(rows), "agree": agree, "no_answer": no_answer, "disagree": disagree, "seconds": seconds}


def run() -> tuple[str, str, list[tuple[str, str]]]:
    data = data_dir()
    start = time.perf_counter()
    assert is_equivalent("x+1", "1+x")
    helper_start = time.perf_counter() - start
    grading._sympy_equal.cache_clear()

    math500 = jsonl(data / "math500_test.jsonl")
    start = time.perf_counter()
    failures = [
        (r["unique_id"], extract_answer(r["solution"]), r["answer"])
        for r in math500
        if not grade(r["solution"], r["answer"])
    ]
    math500_seconds = time.perf_counter() - start

    gsm8k = jsonl(data / "gsm8k_test.jsonl")
    gsm8k_answers = [extract_answer(r["answer"]) for r in gsm8k]
    gsm8k_ok = sum(a is not None and bool(re.fullmatch(r"-?\d+(\.\d+)?", normalize_answer(a))) for a in gsm8k_answers)
    math_all = jsonl(data / "math_test.jsonl")
    math_ok = sum(extract_answer(r["solution"]) is not None for r in math_all)

    # The cost if every MATH-500 pair needed sympy: each answer against itself, past the fast paths.
    start = time.perf_counter()
    self_equal = sum(grading._sympy_equal(a, a) for a in {normalize_answer(r["answer"]) for r in math500})
    forced_seconds = time.perf_counter() - start
    n_forced = len({normalize_answer(r["answer"]) for r in math500})

    before = grading._sympy_equal.cache_info().misses
    pb_math = processbench(data, "math", {r["problem"].strip(): extract_answer(r["solution"]) for r in math_all})
    pb_gsm8k = processbench(data, "gsm8k", {r["question"].strip(): extract_answer(r["answer"]) for r in gsm8k})
    sympy_calls = grading._sympy_equal.cache_info().misses - before

    def pb_row(name: str, s: dict) -> str:
        return (
            f"| ProcessBench {name} ({s['n']} model outputs): our grade agrees with `final_answer_correct` "
            f"| {s['agree']} / {s['n'] - s['no_answer']} with an extracted answer ({s['no_answer']} outputs "
            f"have no box, `####` or \"answer is\") | {s['seconds']:.1f} s |"
        )

    table = "\n".join(
        [
            "| check | result | wall time |",
            "|---|---|---:|",
            f"| MATH-500: answer extracted from the reference solution is equivalent to `answer` "
            f"| {500 - len(failures)} / {len(math500)} | {math500_seconds:.2f} s |",
            f"| MATH-500 answers forced through the sympy helper (each vs itself) "
            f"| {self_equal} / {n_forced} distinct answers equal | {forced_seconds:.2f} s |",
            f"| GSM8K test: `#### X` extracts and normalises to a number | {gsm8k_ok} / {len(gsm8k)} | |",
            f"| MATH test: the reference solution yields an answer | {math_ok} / {len(math_all)} | |",
            pb_row("math", pb_math),
            pb_row("gsm8k", pb_gsm8k),
            f"| sympy helper: start + first comparison (once per process) | | {helper_start:.1f} s |",
        ]
    )
    notes = [
        f"The ProcessBench rows sent {sympy_calls} comparisons to the sympy helper; all others were "
        "settled by normalised strings or exact numbers.",
        "MATH-500 failures: " + ("; ".join(f"`{i}`: extracted `{e}` vs `{g}`" for i, e, g in failures) or "none."),
        "ProcessBench disagreements where an answer was extracted (id, label, extracted, gold): "
        + "; ".join(f"`{i}` {lab} `{e}` vs `{g}`" for i, lab, e, g in pb_math["disagree"] + pb_gsm8k["disagree"]),
    ]
    # The rows of the doc's figures table.
    figures = [
        ("Answer grading: reference answers (MATH-500, GSM8K, MATH)",
         f"MATH-500 {len(math500) - len(failures)} / {len(math500)} equivalent to `answer`; GSM8K test "
         f"{gsm8k_ok} / {len(gsm8k)} and MATH test {math_ok} / {len(math_all)} yield an answer"),
        ("Answer grading: ProcessBench outputs vs `final_answer_correct`",
         f"math {pb_math['agree']} / {pb_math['n'] - pb_math['no_answer']}, gsm8k {pb_gsm8k['agree']} / "
         f"{pb_gsm8k['n'] - pb_gsm8k['no_answer']} agree (outputs with an extracted answer; "
         f"{pb_math['no_answer']} and {pb_gsm8k['no_answer']} have none)"),
    ]
    return table, "\n\n".join(notes), figures


def write_section(table: str, notes: str, figures: list[tuple[str, str]]) -> None:
    date = datetime.date.today().isoformat()
    body = "\n".join(
        [
            SECTION,
            "",
            f"Command: `{COMMAND}`  ",
            f"Date: {date}  ",
            f"Machine: {machine()}",
            "",
            table,
            "",
            notes,
            "",
            "Conventions behind these figures (see `mathprm/data/grading.py`): the percent sign is a unit "
            "(`50\\%` == `50` != `0.5`), a comma list without brackets is an unordered set of solutions, "
            "tuples and intervals are ordered, decimals match fractions to 6 decimal places. ProcessBench's "
            "label is stricter in places: it marks some mathematically equal answers wrong "
            "(e.g. `\\frac{411}{333}` for `\\frac{137}{111}`, `-\\frac{58}{87}` for `-\\frac{2}{3}`) and a few "
            "correct final answers wrong (`gsm8k-70`, `gsm8k-74`); `math-50` boxed 7 mid-solution and then moved "
            "away from it, and our extractor takes the last box wherever it stands.",
            "",
        ]
    )
    text = DOC.read_text(encoding="utf-8") if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    atomic.write_text(DOC, update_figures(text, figures, COMMAND, date, machine()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--write", action="store_true", help=f"record the figures in {DOC.relative_to(REPO)}")
    args = parser.parse_args()
    table, notes, figures = run()
    print(table, notes, sep="\n\n")
    if args.write:
        write_section(table, notes, figures)
        print(f"\nwrote {SECTION!r} in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
