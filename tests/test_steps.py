"""StepFormat: exact split/join round trips, and join refusing exactly what would not round-trip."""

from __future__ import annotations

import random

import pytest

from mathprm.steps import StepFormat

NL = StepFormat()  # "\n\n"
LINES = StepFormat("\n")


def test_default_separator_is_a_blank_line():
    assert NL.separator == "\n\n"
    assert NL.split("Step one.\n\nStep two.") == ["Step one.", "Step two."]
    assert NL.join(["Step one.", "Step two."]) == "Step one.\n\nStep two."


def test_split_is_verbatim():
    # No stripping: the whitespace a model wrote stays in its step, so the text comes back.
    assert NL.split(" a \n\n\tb\n") == [" a ", "\tb\n"]
    assert LINES.split("1 + 2 = 3\n3 * 4 = 12\nThe answer is 12") == ["1 + 2 = 3", "3 * 4 = 12", "The answer is 12"]


def test_empty_text_has_no_steps():
    assert NL.split("") == []
    assert NL.join([]) == ""


def test_empty_steps_inside_a_list_round_trip():
    assert NL.split("\n\n") == ["", ""]
    assert NL.split("a\n\n\n\nb") == ["a", "", "b"]
    assert NL.join(["", ""]) == "\n\n"
    assert NL.join(["a", "", "b"]) == "a\n\n\n\nb"


def test_join_accepts_a_tuple():
    assert LINES.join(("a", "b")) == "a\nb"


def test_join_rejects_the_single_empty_step():
    with pytest.raises(ValueError, match="step 0"):
        NL.join([""])


def test_join_rejects_a_step_containing_the_separator():
    with pytest.raises(ValueError, match=r"step 1: contains the separator"):
        NL.join(["a", "b\n\nc", "d"])
    with pytest.raises(ValueError, match=r"step 2: contains the separator"):
        NL.join(["a", "b", "c\n\n"])


def test_join_rejects_a_step_whose_end_runs_into_the_separator():
    # "a\n" + "\n\n" + "b" reads back as "a", "\nb": the split happens one character early.
    assert NL.split("a\n" + "\n\n" + "b") == ["a", "\nb"]
    with pytest.raises(ValueError, match=r"step 0: its end .* runs into the separator"):
        NL.join(["a\n", "b"])


def test_last_step_may_end_with_part_of_the_separator():
    assert NL.join(["a", "b\n"]) == "a\n\nb\n"
    assert NL.split("a\n\nb\n") == ["a", "b\n"]


def test_join_rejects_non_strings():
    with pytest.raises(ValueError, match="step 1: must be a string"):
        NL.join(["a", 3])  # type: ignore[list-item]


@pytest.mark.parametrize("bad", ["", None, 5])
def test_separator_is_validated(bad):
    with pytest.raises(ValueError, match="separator"):
        StepFormat(bad)  # type: ignore[arg-type]


def test_is_frozen():
    with pytest.raises(AttributeError):
        NL.separator = "\n"  # type: ignore[misc]


# Small alphabets that contain the separators' characters, so random strings hit every
# edge: separators inside steps, overlapping tails, empty steps, leading/trailing runs.
SEPARATORS = ["\n\n", "\n", "aba", "ab", "aa"]
ALPHABET = ["a", "b", "\n", " "]


def _random_text(rng: random.Random, max_len: int = 12) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randrange(max_len + 1)))


@pytest.mark.parametrize("sep", SEPARATORS)
def test_join_split_round_trips_every_text(sep):
    fmt, rng = StepFormat(sep), random.Random(f"text:{sep}")
    for _ in range(3000):
        text = _random_text(rng, 20)
        steps = fmt.split(text)
        assert fmt.join(steps) == text, (text, steps)


@pytest.mark.parametrize("sep", SEPARATORS)
def test_join_refuses_exactly_the_lists_that_do_not_round_trip(sep):
    fmt, rng = StepFormat(sep), random.Random(f"steps:{sep}")
    accepted = refused = 0
    for _ in range(3000):
        steps = [_random_text(rng, 5) for _ in range(rng.randrange(5))]
        # What plain str.join would write, read back by split: the list survives iff equal.
        survives = fmt.split(sep.join(steps)) == steps
        try:
            text = fmt.join(steps)
        except ValueError:
            refused += 1
            assert not survives, steps
        else:
            accepted += 1
            assert survives, steps
            assert fmt.split(text) == steps
    # Both branches must really be exercised for the check above to mean anything.
    assert accepted > 300 and refused > 300, (accepted, refused)


def test_prompt_is_question_then_each_step_terminated():
    fmt = StepFormat("\n")
    assert fmt.prompt("Q?") == "Q?\n"
    assert fmt.prompt("Q?", ["1 + 1 = 2", "2 * 3 = 6"]) == "Q?\n1 + 1 = 2\n2 * 3 = 6\n"
    # The training text of a full solution is the bare prompt plus the joined steps.
    assert fmt.prompt("Q?", ["a", "b"]) == fmt.prompt("Q?") + fmt.join(["a", "b"]) + "\n"
    with pytest.raises(ValueError, match="step 1"):
        fmt.prompt("Q?", ["a", "b\nc"])


@pytest.mark.parametrize("sep", ["\n", "\n\n", "<sep>"])
def test_clean_makes_any_sampled_text_a_step_that_joins_with_any_other(sep):
    fmt = StepFormat(sep)
    rng = random.Random(1)
    alphabet = ["a", " ", "\n", "<", "s", "e", "p", ">", sep]
    cleaned = []
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        step = fmt.clean(text)
        assert text.startswith(step) and sep not in step
        cleaned.append(step)
    steps = [s for s in cleaned if s]
    assert fmt.split(fmt.join(steps)) == steps  # every order of cleaned steps reads back
    rng.shuffle(steps)
    assert fmt.split(fmt.join(steps)) == steps


def test_clean_cuts_at_the_separator_and_drops_a_tail_that_runs_into_it():
    assert NL.clean("5 + 3 = 8\n") == "5 + 3 = 8"  # cut at its token limit between the two newlines
    assert NL.clean("a\n\nb") == "a"
    assert NL.clean("\n\n") == NL.clean("\n") == ""
    assert NL.clean("a\nb") == "a\nb" and LINES.clean("a b") == "a b"
    assert LINES.clean("x = 1\n") == "x = 1"


def test_blank_and_content():
    from mathprm.steps import blank, content

    assert blank("") and blank(" \t") and blank("\n") and not blank(" x ")
    assert content(["", "a", " ", "b\n", "\t"]) == ["a", "b\n"]
