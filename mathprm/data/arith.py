"""The arithmetic world: seeded multi-step problems whose every step can be checked exactly.

No pretrained weights can be downloaded here, so mathprm's embedded default is a world it
builds itself. A problem is a start value and a chain of operations applied left to right
(`+ - *` and `/` only where it divides evenly), asked in plain words ("Start with 17. Add
25, then multiply by 3. What is the result?") or as a short word problem. The reference
solution writes one operation per line and ends with the line that
`mathprm.data.grading.extract_answer` reads:

    17 + 25 = 42
    42 * 3 = 126
    The answer is 126

Because the chain is known, `check_step` labels any written step exactly: this is the ground
truth that tree-search labels (Math-Shepherd, Wang et al. 2024), the PRM and PRM-guided
search are measured against. Where Math-Shepherd estimates "can this prefix still reach the
gold answer" by Monte-Carlo rollouts, we decide it by arithmetic: a prefix is good iff every
step in it is right (`step_labels`). The two differ only where later errors happen to cancel
an earlier one, which is part of what this world lets us measure.

Leakage: a problem is in the test split iff the sha256 of its canonical plain-phrasing text
falls under `TEST_PERCENT`, and `generate` rejects candidates of the other split. Training
data can therefore never contain a test chain, whatever seeds either side uses, and a word
phrasing of a chain always lands in the same split as its plain phrasing.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

from mathprm.data.problems import Problem, default_separator

STEP_SEPARATOR = default_separator("arith:")
TEST_PERCENT = 20  # share of all possible chains that belong to the test split
DEFAULT_LIMIT = 500
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Preset:
    """How hard a problem is: its length, its numbers and its operators (ranges inclusive)."""

    n_ops: tuple[int, int]
    start: tuple[int, int]
    add_operand: tuple[int, int]  # operands of + and -
    mul_operand: tuple[int, int]  # operands of * and /
    operators: str  # a subset of "+-*/"
    max_value: int  # every intermediate value lies in [0, max_value]

    def __post_init__(self) -> None:
        for name in ("n_ops", "start", "add_operand", "mul_operand"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"Preset.{name} must be a range 1 <= lo <= hi, got {(lo, hi)}")
        if not self.operators or set(self.operators) - set("+-*/"):
            raise ValueError(f"Preset.operators must be a non-empty subset of '+-*/', got {self.operators!r}")
        if self.max_value < self.start[1]:
            raise ValueError(f"Preset.max_value {self.max_value} is below the largest start value {self.start[1]}")


# Sized so that the tiny character-level policy (`mathprm.models.policy`), trained from scratch on a
# CPU within the SFT time budget, gets most steps right but not all: a PRM then has errors to
# find. Values stay non-negative (the tiny policy handles negatives poorly, and they make word
# problems absurd). easy and medium stay below 100, where the tiny policy learns + and -
# exactly; hard reaches 199 and chains 7-9 operations. Its residual errors are mostly * and /
# facts and carries across 100, and one wrong step anywhere sinks the answer. hard sits
# between two failures: 3-digit numbers make + and - unlearnable in the budget, and numbers
# kept below 100 leave too few errors.
PRESETS: dict[str, Preset] = {
    "easy": Preset(
        n_ops=(2, 2), start=(1, 20), add_operand=(1, 9), mul_operand=(2, 5), operators="+-*", max_value=50
    ),
    "medium": Preset(
        n_ops=(3, 4), start=(1, 50), add_operand=(1, 9), mul_operand=(2, 5), operators="+-*/", max_value=99
    ),
    "hard": Preset(
        n_ops=(7, 9), start=(1, 199), add_operand=(1, 19), mul_operand=(2, 19), operators="+-*/", max_value=199
    ),
}

Op = tuple[str, int]  # ("*", 3): multiply the running value by 3

# Steps must be written exactly as the reference writes them (single spaces, no leading
# zeros); only surrounding whitespace is forgiven. Numbers are capped at 18 digits so that a
# pathological string can never reach int()'s digit limit and raise.
_INT = r"(-?(?:0|[1-9][0-9]{0,17}))"
_OP_STEP = re.compile(rf"{_INT} ([-+*/]) {_INT} = {_INT}", re.ASCII)
_ANSWER_STEP = re.compile(rf"The answer is {_INT}\.?", re.ASCII)
_ANSWER_ANYWHERE = re.compile(r"The answer is (-?[0-9]{1,18})(?!\w|[.,/][0-9])", re.ASCII)  # not 78.5, 78/2


def apply_op(value: int, op: str, operand: int) -> int | None:
    """`value op operand` in exact integer arithmetic; None for a division that leaves a remainder."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    if op == "/" and operand != 0 and value % operand == 0:
        return value // operand
    return None


# ----------------------------------------------------------------------------- phrasing


_PLAIN_VERBS = {"+": "add {n}", "-": "subtract {n}", "*": "multiply by {n}", "/": "divide by {n}"}


def plain_question(start: int, ops: list[Op]) -> str:
    """The canonical phrasing; its hash decides the split of the chain, whatever the phrasing shown."""
    clauses = ", then ".join(_PLAIN_VERBS[op].format(n=n) for op, n in ops)
    return f"Start with {start}. {clauses[0].upper()}{clauses[1:]}. What is the result?"


@dataclass(frozen=True)
class _Story:
    subject: str  # how the story opens: "A baker"
    name: str  # how it later refers back: "the baker"
    pronoun: str
    unit: tuple[str, str]  # singular, plural
    gain: str  # "+" as an event, "{n} {u}" filled in
    loss: str  # "-" as an event


_STORIES = (
    _Story("A baker", "the baker", "he", ("loaf", "loaves"), "bakes {n} more {u}", "sells {n} {u}"),
    _Story("Mia", "Mia", "she", ("sticker", "stickers"), "buys {n} more {u}", "gives away {n} {u}"),
    _Story("A farmer", "the farmer", "she", ("apple", "apples"), "picks {n} more {u}", "uses {n} {u} in a pie"),
    _Story("Leo", "Leo", "he", ("marble", "marbles"), "wins {n} more {u}", "loses {n} {u}"),
    _Story("A library", "the library", "it", ("book", "books"), "receives {n} more {u}", "donates {n} {u}"),
)


def word_question(start: int, ops: list[Op], story_index: int) -> str:
    """A word problem that states every operand and operator, one event per sentence, in order."""
    s = _STORIES[story_index % len(_STORIES)]
    one, many = s.unit

    def count(n: int) -> str:
        return f"{n} {one if n == 1 else many}"

    sentences = [f"{s.subject} has {count(start)}."]
    for op, n in ops:
        if op == "+":
            event = s.gain.format(n=n, u=one if n == 1 else many)
        elif op == "-":
            event = s.loss.format(n=n, u=one if n == 1 else many)
        elif op == "*":
            event = f"ends up with {n} times as many {many} as before"
        else:
            event = f"splits the {many} into {n} equal groups and keeps only one group"
        sentences.append(f"Then {s.pronoun} {event}.")
    sentences.append(f"How many {many} does {s.name} have now?")
    return " ".join(sentences)


def chain_steps(start: int, ops: list[Op]) -> list[str]:
    """One `a op b = c` line per operation, then `The answer is c`."""
    steps, value = [], start
    for op, n in ops:
        result = apply_op(value, op, n)
        if result is None:
            raise ValueError(f"{value} {op} {n} is not an exact integer operation")
        steps.append(f"{value} {op} {n} = {result}")
        value = result
    return [*steps, f"The answer is {value}"]


# ----------------------------------------------------------------------------- generation


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def is_test_text(text: str) -> bool:
    """Whether a canonical question text (see `plain_question`) belongs to the test split."""
    return int(_sha256(text), 16) % 100 < TEST_PERCENT


def split_of(problem: Problem) -> str:
    """The split a problem belongs to, recomputed from its chain (not read from metadata)."""
    start, ops = chain(problem)
    return "test" if is_test_text(plain_question(start, ops)) else "train"


_MAX_MISSES = 5000
_INVERSE = {"+": "-", "-": "+", "*": "/", "/": "*"}


def _sample_chain(preset: Preset, rng: random.Random) -> tuple[int, list[Op]] | None:
    """A random chain within the preset: an operator uniform among those with a legal operand,
    then an operand uniform among the legal ones, so bounds hold by construction. None when
    the chain reaches a value with no legal operation (possible only in odd presets)."""
    value = rng.randint(*preset.start)
    start, ops = value, []
    for _ in range(rng.randint(*preset.n_ops)):
        a_lo, a_hi = preset.add_operand
        m_lo, m_hi = preset.mul_operand
        legal = {
            "+": list(range(a_lo, min(a_hi, preset.max_value - value) + 1)),
            "-": list(range(a_lo, min(a_hi, value) + 1)),
            # A zero running value makes * and / no-ops, which teach nothing.
            "*": list(range(m_lo, min(m_hi, preset.max_value // value) + 1)) if value > 0 else [],
            "/": [d for d in range(m_lo, m_hi + 1) if value > 0 and value % d == 0],
        }
        if ops:
            # An operation that undoes the previous one would let a solution skip both and
            # still reach the gold answer, so outcome and step labels would disagree.
            prev_op, prev_n = ops[-1]
            undo = _INVERSE[prev_op]
            legal[undo] = [n for n in legal[undo] if n != prev_n]
        choices = [op for op in preset.operators if legal[op]]
        if not choices:
            return None
        op = rng.choice(choices)
        n = rng.choice(legal[op])
        ops.append((op, n))
        value = apply_op(value, op, n)  # type: ignore[assignment]  # legal by construction
    return start, ops


def generate(
    difficulty: str, n: int, seed: int, split: str = "test", word_problems: bool | float = False
) -> list[Problem]:
    """`n` distinct problems of one split, deterministic for the arguments.

    `word_problems` is the probability that a problem is phrased as a word problem (True = 1).
    Candidates of the other split are rejected by hash; a chain appears at most once per call.
    """
    if difficulty not in PRESETS:
        raise ValueError(f"unknown arith difficulty {difficulty!r}; presets: {', '.join(PRESETS)}")
    preset = PRESETS[difficulty]
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    p_word = float(word_problems)
    if not 0.0 <= p_word <= 1.0:
        raise ValueError(f"word_problems must be a bool or a probability in [0, 1], got {word_problems!r}")
    rng = random.Random(f"arith:{difficulty}:{seed}:{split}:{p_word}")
    problems: list[Problem] = []
    seen: set[str] = set()
    misses = 0
    while len(problems) < n:
        # A test problem takes ~5 candidates; a long run of misses means the preset's pool
        # of distinct chains for this split is (nearly) used up.
        if misses > _MAX_MISSES:
            raise ValueError(
                f"arith:{difficulty} ran out of distinct {split} problems after {len(problems)}, asked for {n}"
            )
        sampled = _sample_chain(preset, rng)
        canonical = plain_question(*sampled) if sampled else ""
        if not sampled or canonical in seen or is_test_text(canonical) != (split == "test"):
            misses += 1
            continue
        misses = 0
        seen.add(canonical)
        start, ops = sampled
        word = rng.random() < p_word
        question = word_question(start, ops, rng.randrange(len(_STORIES))) if word else canonical
        steps = chain_steps(start, ops)
        problems.append(
            Problem(
                id=f"arith:{difficulty}:{_sha256(question)[:12]}",
                question=question,
                answer=steps[-1].removeprefix("The answer is "),
                source=f"arith:{difficulty}",
                solution=STEP_SEPARATOR.join(steps),
                # Parallel lists, not [[op, n], ...]: single-typed lists also fit an Arrow column.
                metadata={
                    "difficulty": difficulty,
                    "split": split,
                    "phrasing": "word" if word else "plain",
                    "start": start,
                    "ops": [op for op, _ in ops],
                    "operands": [n for _, n in ops],
                },
            )
        )
    return problems


def load_arith(
    spec: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    word_problems: bool | float = False,
    skip_bad: bool = False,
    errors: list | None = None,
) -> list[Problem]:
    """Problems for a dataset name `arith:easy|medium|hard` (`limit` defaults to DEFAULT_LIMIT).

    `skip_bad` and `errors` are the file loaders' arguments, which `load_problems` passes to
    every loader; they are accepted and unused, since a generated record is never bad.
    """
    prefix, _, difficulty = spec.partition(":")
    if prefix != "arith":
        raise ValueError(f"not an arith dataset name: {spec!r}; expected arith:{{{'|'.join(PRESETS)}}}")
    return generate(difficulty, DEFAULT_LIMIT if limit is None else limit, seed, split, word_problems)


# ----------------------------------------------------------------------------- checking


def chain(problem: Problem) -> tuple[int, list[Op]]:
    """The start value and operations stored in a problem's metadata.

    Values are coerced so that metadata that went through numpy (a Ray Data row built
    without `Problem.to_dict`, which keeps it a JSON string) still checks.
    """
    m = problem.metadata
    return int(m["start"]), [(str(op), int(n)) for op, n in zip(m["ops"], m["operands"], strict=True)]


def solution_steps(problem: Problem) -> list[str]:
    """The reference solution's steps, rebuilt from the chain."""
    return chain_steps(*chain(problem))


def check_step(problem: Problem, previous_steps: list[str], step: str) -> bool:
    """Whether `step` is a correct next step after `previous_steps`, which are taken as written.

    Operation step i must read `a op b = c` with `a` the result written by step i-1 (the
    start value for i = 0), `op b` the problem's i-th operation and `c` exact. The answer
    step must come right after the last operation and repeat its written result. So a step
    computed correctly from an earlier wrong result is True here; `step_labels` is what
    carries the earlier error forward.
    """
    start, ops = chain(problem)
    i = len(previous_steps)
    if i == 0:
        previous = start
    elif m := _OP_STEP.fullmatch(previous_steps[-1].strip()):
        previous = int(m[4])
    else:
        return False  # nothing written to continue from (garbage, or the answer line)
    text = step.strip()
    if m := _OP_STEP.fullmatch(text):
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        return i < len(ops) and a == previous and (op, b) == ops[i] and apply_op(a, op, b) == c
    if m := _ANSWER_STEP.fullmatch(text):
        return i == len(ops) and int(m[1]) == previous
    return False


def can_reach_gold(problem: Problem, steps: list[str]) -> bool:
    """Whether finishing `steps` with exact arithmetic reaches the gold answer: the value the
    last step wrote, put through the operations still to come (after an answer line, the
    answer written). This is what a Monte-Carlo step score estimates with a perfect completer.
    Unlike `step_labels`, a state whose last value is back on the gold path after a wrong step
    (52 written instead of 51, then "52 / 17 = 3") counts as reachable; a step that does not
    parse cannot be continued."""
    start, ops = chain(problem)
    if not steps:
        value = start
    elif m := _ANSWER_STEP.fullmatch(steps[-1].strip()):
        return problem.answer is not None and int(m[1]) == int(problem.answer)
    elif (m := _OP_STEP.fullmatch(steps[-1].strip())) and len(steps) <= len(ops):
        value = int(m[4])
    else:
        return False
    for op, n in ops[len(steps):]:
        value = apply_op(value, op, n)
        if value is None:
            return False
    return problem.answer is not None and value == int(problem.answer)


def step_labels(problem: Problem, steps: list[str]) -> list[bool]:
    """Label i is True iff steps 0..i are all correct, i.e. the prefix is still on the way to the gold answer."""
    labels, ok = [], True
    for i, step in enumerate(steps):
        ok = ok and check_step(problem, steps[:i], step)
        labels.append(ok)
    return labels


def first_error(problem: Problem, steps: list[str]) -> int:
    """Index of the earliest wrong step, -1 if none is wrong (ProcessBench's convention).

    Only the steps present are judged: a correct but unfinished solution (no answer line yet)
    gives -1. Use `is_correct` to also require the right final answer.
    """
    return next((i for i, ok in enumerate(step_labels(problem, steps)) if not ok), -1)


def is_correct(problem: Problem, solution_text: str) -> bool:
    """Whether the last "The answer is N" in the text gives the gold answer (steps are not judged)."""
    found = _ANSWER_ANYWHERE.findall(solution_text)
    return bool(found) and problem.answer is not None and int(found[-1]) == int(problem.answer)
