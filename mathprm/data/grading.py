"""Final answers of math solutions, and whether two answers are the same.

`extract_answer` reads the final answer of a written solution: the last `\\boxed{}` or
`\\fbox{}` (MATH, most model outputs), else GSM8K's `#### X` line, else "The answer is X"
(our arithmetic world; Minerva's "Final Answer: The final answer is $X$. I hope it is
correct."). `is_equivalent(pred, gold)` compares two raw answers in three stages:

1. `normalize_answer` rewrites both: `$` delimiters, currency, unit words, degrees and the
   percent sign are dropped, `\\text{}` unwrapped, `\\dfrac` -> `\\frac`, `1,000` -> `1000`
   (only a whole answer in groups of three: `1,2` stays a pair), `x = 5` -> `5`.
2. Equal strings are equal; two plain numbers (decimals, `a/b`, `\\frac{a}{b}`, `1.5e3`,
   `1.5\\times10^{3}`) are compared exactly, rounded to 6 decimals when one is a decimal
   (math-verify's rule), so 0.333333 == 1/3; plain words compare case-insensitively.
3. Everything else goes to math-verify (Kydlíček et al., HuggingFace) on sympy: sets are
   unordered, a comma list without brackets is a set of solutions, tuples and intervals are
   ordered and keep their brackets, matrices compare entrywise.

Departures from math-verify: the percent sign is a unit, as in MATH's own grading, so
`50\\%` == `50` but `50\\%` != `0.5` (math-verify alone says both are equal; a "what
percent" question answered 0.5 is wrong). Words are not products of symbols (math-verify
would call "ab" and "ba" equal).

Time bound. math-verify's timeouts use `signal.alarm`, which only works in the main thread,
and no signal can interrupt one C-level bignum operation (`9^{9^{9^9}}` sits in one `pow`).
So (a) `_is_risky` refuses, before sympy sees them, numeric exponent towers, huge exponents,
factorials and binomials, and over-long answers; and (b) sympy runs in a persistent helper
process (one per grading process, shared by its threads) that the caller waits on for at
most `SYMPY_SECONDS`, then kills and restarts. This holds in any thread, Ray actor or Serve
replica. Cost: one helper start (importing sympy and math-verify, off the caller's clock until
the first comparison that needs sympy), one pipe round trip per sympy comparison, and results
are cached. Most answers never reach the helper (stage 2).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

logger = logging.getLogger(__name__)

SYMPY_SECONDS = 1.5  # wall-clock budget of one sympy comparison in the helper
_START_SECONDS = 60.0  # helper start: importing sympy + math_verify on a busy node
_MAX_CHARS = 1000  # longer "answers" are compared as plain strings only
_MAX_SYMPY_CHARS = 400  # MATH's longest boxed answer has 81 characters

# ---------------------------------------------------------------- extraction

_GSM8K = re.compile(r"####\s*")
_ANSWER_IS = re.compile(r"answer is\s*:?\s*", re.IGNORECASE)
_HOPE = re.compile(r"\s*I hope it is correct\.?\s*$", re.IGNORECASE)


def matching_brace(text: str, start: int) -> int | None:
    """The index of the `}` that closes the `{` at `text[start]`, braces nested; None when
    the text ends first. A backslash escapes the next character (`\\{`, `\\}`, `\\\\`)."""
    depth, i = 0, start
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _last_box(text: str) -> tuple[bool, str | None]:
    """(a box was found, its content); the content is None when the box is empty or unclosed."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return False, None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5) :]
    body = rest.lstrip()
    if body.startswith("{"):
        end = matching_brace(body, 0)
        if end is None:
            return True, None  # cut off mid-box: the final answer is unknown
        return True, body[1:end].strip() or None
    if rest[:1].isspace():  # MATH's brace-less "$\boxed 5$"
        return True, re.split(r"[$\n]", body, maxsplit=1)[0].strip().rstrip(".") or None
    return True, None


def _strip_sentence(answer: str) -> str | None:
    answer = _HOPE.sub("", answer).strip().rstrip(".").strip().strip("*").strip()
    if len(answer) > 1 and answer[0] == answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer or None


def extract_answer(text: str) -> str | None:
    """The final answer written in a solution, as written; None if there is none.

    The last `\\boxed{...}`/`\\fbox{...}` (nested braces; `\\boxed 5`) wins; a last box
    that is empty or never closed (a truncated generation) gives None. Without a box: the
    last GSM8K `#### X`, else the last "answer is X" (trailing period, `$...$` and
    Minerva's "I hope it is correct." removed).
    """
    if not isinstance(text, str):
        return None
    found, content = _last_box(text)
    if found:
        return content
    for marker in (_GSM8K, _ANSWER_IS):
        last = None
        for last in marker.finditer(text):  # the last marker; the answer is the rest of its line
            pass
        if last is not None:
            return _strip_sentence(text[last.end() :].split("\n", 1)[0])
    return None


# ---------------------------------------------------------------- normalisation

_DELETE = re.compile(
    r"\\(?:left|right|displaystyle)(?![a-zA-Z])"  # sizing
    r"|(?<!\\)\\[,;:! ]|~"  # LaTeX spaces
    r"|\^\s*\{?\s*\\circ\s*\}?|\\circ|°|\\degree"  # degrees
    r"|\\?%|\\?\$"  # percent sign (a unit, see the module doc) and currency / math delimiters
)
_TEXT = r"\\(?:text|textrm|textnormal|textbf|textit|mbox|mathrm|mathbf|mathit|rm)\s*"
_TRAILING_UNIT = re.compile(_TEXT + r"\{\s*[a-zA-Z][a-zA-Z .]*\}\s*(?:\^\s*\{?\d\}?)?\s*$")
_UNWRAP = re.compile(_TEXT + r"\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"[a-zA-Z](?:_\{?[a-zA-Z0-9]+\}?)?(?:=|\\in(?![a-zA-Z]))(.+)")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_WORD = re.compile(r"[a-zA-Z]{2,}(?:\^\{?\d\}?)?")


def _drop_unit_words(s: str) -> str:
    """`12 dollars` -> `12`, `3 sq units` -> `3`: trailing words after a number or a group."""
    tokens = s.split(" ")
    while len(tokens) > 1 and _WORD.fullmatch(tokens[-1]):
        tokens.pop()
    dropped = len(tokens) < s.count(" ") + 1
    return " ".join(tokens) if dropped and re.search(r"[\d})\]]$", tokens[-1]) else s


def normalize_answer(answer: str) -> str:
    """A canonical string for an answer; equal strings are equal answers (not conversely)."""
    s = answer.strip().replace("\x00", "")
    if "\\boxed" in s or "\\fbox" in s:
        s = extract_answer(s) or ""
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\dbinom", "\\binom")
    s = re.sub(r"(?<!\\)\\(?=\d)", "", s)  # "\15": a mangled "\$15"
    s = s.replace("{,}", ",").replace("**", "^").replace("−", "-").replace("×", "\\times ")
    s = _DELETE.sub("", s)
    s = re.sub(r"\s+", " ", s).strip()
    if re.search(r"\d", s):
        for _ in range(2):  # "864 \mbox{ inches}^2", "5\text{ cm} \text{ long}"
            s = _TRAILING_UNIT.sub("", s).strip() or s
    s = _UNWRAP.sub(r"\1", s).strip()
    s = _drop_unit_words(s)
    # Drop spaces, except the one that ends a command before a letter (\pi r must not become \pir).
    s = re.sub(r"(\\[a-zA-Z]+) (?=[a-zA-Z])", "\\1\x00", s).replace(" ", "").replace("\x00", " ")
    s = s.rstrip(".")
    if (m := _ASSIGNMENT.fullmatch(s)) and "=" not in m[1]:  # not "x=1,y=2"
        s = m[1]
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac(\{[^{}]*\})(\d)", r"\\frac\1{\2}", s)
    if m := re.fullmatch(r"\(([A-Ea-e])\)", s):  # multiple choice: (C) == C
        s = m[1]
    return s


# ---------------------------------------------------------------- numbers and words

_SCI = re.compile(
    r"(?P<m>[-+]?(?:\d+\.?\d*|\.\d+))"
    r"(?:[eE](?P<e1>[-+]?\d+)|(?:\\times|\\cdot|\*)10\^(?:\{(?P<e2>[-+]?\d+)\}|(?P<e3>\d)))?"
)
_FRAC = re.compile(r"(?P<s>-?)(?:\\frac\{(?P<n>-?\d+)\}\{(?P<d>\d+)\}|(?P<n2>\d+)/(?P<d2>\d+))")
_PLAIN_WORDS = re.compile(r"[a-zA-Z]{2,}")


def _as_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, exact) of a plain number; exact is False for decimals. None if not one."""
    if len(s) > 300:  # int() refuses > 4300 digits; such answers are not plain numbers here
        return None
    if m := _SCI.fullmatch(s):
        exponent = int(m["e1"] or m["e2"] or m["e3"] or 0)
        if abs(exponent) > 300:
            return None
        return Fraction(m["m"]) * Fraction(10) ** exponent, "." not in m["m"]
    if (m := _FRAC.fullmatch(s)) and int(m["d"] or m["d2"]) != 0:
        value = Fraction(int(m["n"] or m["n2"]), int(m["d"] or m["d2"]))
        return (-value if m["s"] else value), True
    return None


# ---------------------------------------------------------------- risk check

def _exponent(s: str, i: int) -> str:
    """The exponent written at s[i:] (right after a `^`): a braced or bracketed group, or a token."""
    if s[i : i + 1] in ("{", "("):
        close, depth = {"{": "}", "(": ")"}[s[i]], 0
        for j in range(i, len(s)):
            depth += {s[i]: 1, close: -1}.get(s[j], 0)
            if depth == 0:
                return s[i : j + 1]
        return s[i:]
    m = re.match(r"\d+|\\[a-zA-Z]+|.", s[i:])
    return m[0] if m else ""


def _is_risky(s: str) -> bool:
    """Could sympy materialise an enormous number from this answer? Then it never sees it."""
    if len(s) > _MAX_SYMPY_CHARS:
        return True
    for m in re.finditer(r"\^", s):
        exponent = _exponent(s, m.end())
        numeric = not re.search(r"[a-zA-Z]", re.sub(r"\\(?:times|cdot|frac)", "", exponent))
        tower = "^" in exponent or "!" in exponent or s[m.end() + len(exponent) :].startswith("^")
        product = re.search(r"\\times|\\cdot|\*", exponent) and len(re.findall(r"\d", exponent)) >= 6
        if numeric and (tower or product or re.search(r"\d{6,}", exponent)):
            return True
    # n! of a 5-digit n, or a factorial or binomial of a group when big numbers are about
    big = re.search(r"\d{5,}", s) or "^" in s
    return bool(re.search(r"\d{5,}!", s) or (big and re.search(r"[)}]!|\\binom|\\choose", s)))


# ---------------------------------------------------------------- sympy helper process


class _Unavailable(Exception):
    """The helper process could not be started; the comparison is not cached."""


class _Helper:
    """A persistent `python -c` process running math-verify, killed when it overruns.

    A subprocess, not multiprocessing: spawn would re-import a Ray worker's `__main__`,
    and fork is unsafe in a multi-threaded actor. Threads share one helper behind a lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False
        self._buffer = b""

    def _start(self) -> None:
        root = str(Path(__file__).resolve().parents[2])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self._proc = subprocess.Popen(
            [sys.executable, "-c", "from mathprm.data.grading import _serve; _serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C reaches the parent only; the helper exits on EOF
        )
        self._ready, self._buffer = False, b""

    def _read_line(self, deadline: float) -> bytes | None:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        poller = select.poll()  # not select.select: Ray workers hold fds past FD_SETSIZE
        poller.register(fd, select.POLLIN)
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return None
            chunk = os.read(fd, 4096)
            if not chunk:  # the helper died
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._proc = None

    def forget(self) -> None:
        """In a forked child: the helper belongs to the parent; close our ends, start afresh."""
        if self._proc is not None:
            for pipe in (self._proc.stdin, self._proc.stdout):
                if pipe is not None:
                    pipe.close()
        self._lock = threading.Lock()  # it may have been held by another thread at fork time
        self._proc, self._ready, self._buffer = None, False, b""

    def equal(self, pred: str, gold: str) -> bool:
        with self._lock:
            try:
                if self._proc is None or self._proc.poll() is not None:
                    self._start()
                if not self._ready:
                    if self._read_line(time.monotonic() + _START_SECONDS) != b"ready":
                        raise OSError("the grading helper did not start")
                    self._ready = True
                assert self._proc is not None and self._proc.stdin is not None
                self._proc.stdin.write(json.dumps([pred, gold]).encode() + b"\n")
                self._proc.stdin.flush()
            except OSError as e:
                logger.warning("grading: no sympy helper (%s); comparing strings and numbers only", e)
                self.kill()
                raise _Unavailable(str(e)) from e
            line = self._read_line(time.monotonic() + SYMPY_SECONDS)
            if line is None:
                logger.warning("grading: sympy gave up after %.1f s on %r vs %r", SYMPY_SECONDS, pred, gold)
                self.kill()
                self._start()  # warm up now, so the next call waits less
                return False
            return line == b"1"


_HELPER = _Helper()
atexit.register(_HELPER.kill)
os.register_at_fork(after_in_child=_HELPER.forget)


@lru_cache(maxsize=65536)  # best-of-N and search grade the same answer many times
def _sympy_equal(pred: str, gold: str) -> bool:
    return _HELPER.equal(pred, gold)


def _serve() -> None:
    """The helper's main loop: a JSON [pred, gold] per stdin line, "1" or "0" per stdout line."""
    import resource

    from math_verify import parse, verify

    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # a stray print inside sympy must not corrupt the protocol
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        pred, gold = json.loads(line)
        # The parent kills an overrunning helper; this CPU cap also ends one whose parent died.
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        if hard == resource.RLIM_INFINITY or used + 10 <= hard:
            resource.setrlimit(resource.RLIMIT_CPU, (int(used) + 10, hard))
        try:
            gold_parsed = parse(f"${gold}$", parsing_timeout=None)
            pred_parsed = parse(f"${pred}$", parsing_timeout=None)
            same = bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))  # gold first: not symmetric
        except Exception:  # math-verify raises on some malformed LaTeX: not equal
            same = False
        out.write(b"1\n" if same else b"0\n")


# ---------------------------------------------------------------- public comparison


def is_equivalent(pred: str, gold: str) -> bool:
    """Is the predicted answer mathematically the gold one? Never raises; bounded in time.

    Both are raw answers (no `\\boxed`, `$...$` allowed); ints and floats are read as their
    `str`, any other non-string is False. See the module doc for the conventions.
    """
    try:
        if isinstance(pred, (int, float)) and not isinstance(pred, bool):
            pred = str(pred)
        if isinstance(gold, (int, float)) and not isinstance(gold, bool):
            gold = str(gold)
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        if len(pred) > _MAX_CHARS or len(gold) > _MAX_CHARS:
            return bool(pred.strip()) and pred.strip() == gold.strip()
        p, g = normalize_answer(pred), normalize_answer(gold)
        if not p or not g:
            return False
        if p == g:
            return True
        p_num, g_num = _as_number(p), _as_number(g)
        if p_num is not None and g_num is not None:
            (pv, p_exact), (gv, g_exact) = p_num, g_num
            return pv == gv if p_exact and g_exact else round(pv, 6) == round(gv, 6)
        if _PLAIN_WORDS.fullmatch(p) or _PLAIN_WORDS.fullmatch(g):
            return p.lower() == g.lower()
        if _is_risky(p) or _is_risky(g):
            return False
        return _sympy_equal(p, g)
    except Exception:  # the contract is a bool for any input; a grader bug must not kill a run
        logger.debug("grading: is_equivalent(%r, %r) failed", pred, gold, exc_info=True)
        return False


def grade(solution_text: str, gold: str) -> bool:
    """Extract the final answer of a solution and compare it with the gold; False if none."""
    answer = extract_answer(solution_text)
    return answer is not None and is_equivalent(answer, gold)
