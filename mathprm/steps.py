"""Step format: how a solution's text is cut into steps and how steps are put back together.

A PRM scores a solution step by step, so generator, labeller, scorer and trainer must all
agree on where one step ends. `StepFormat` is that agreement: one separator, `"\\n\\n"` for
natural-language math (ProcessBench, Math-Shepherd) and `"\\n"` for the arithmetic world,
whose solutions hold one operation per line.

The round trip is exact in both directions, with no stripping:

- `fmt.join(fmt.split(text)) == text` for every string;
- `fmt.split(fmt.join(steps)) == steps` for every list `join` accepts. `join` refuses, with
  a ValueError naming the step, exactly the lists that would not come back: a step that
  contains the separator; a step other than the last whose end runs into the separator
  (with `"\\n\\n"`, a step ending in `"\\n"`: `"a\\n" + "\\n\\n"` reads back as `"a"`, then
  the separator); and the one-element list `[""]`.

That last one is the edge case. The empty text has no steps (`split("") == []`,
`join([]) == ""`), which is what a search tree's root prefix needs; so the one step `""`
would also write as `""` and could not be told apart from no steps at all.

Sampled steps. A policy can write anything, and a sampled step must never break a run. The
rule, in one place:

- `clean(text)` makes a sampled step storable: the text before the first separator, less a
  tail that runs into the separator (a step cut at its token limit right after `"\n"` when
  the separator is `"\n\n"`). Any list of non-blank cleaned steps joins and reads back.
- A *blank* step (empty or whitespace only, `blank`) carries nothing to score or to build on.
  Inference search drops it from the candidates; a path whose candidates are all blank ends
  there, unfinished (`Usage.blank_steps` counts the dropped ones). A solution read from a
  sampled text keeps only its non-blank steps (`content`); a prefix built from a sample holds
  none. Tree-search labelling keeps each sample's text as written (its labels are prefixes of
  real samples) and labels no prefix that cannot be written (the lone blank first step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepFormat:
    separator: str = "\n\n"  # the text between two steps, never inside one

    def __post_init__(self) -> None:
        if not isinstance(self.separator, str) or not self.separator:
            raise ValueError(f"separator: must be a non-empty string, got {self.separator!r}")

    def split(self, text: str) -> list[str]:
        """The steps of `text`, verbatim (no stripping); `[]` for the empty text."""
        return text.split(self.separator) if text else []

    def join(self, steps: Sequence[str]) -> str:
        """The text of `steps`; ValueError (naming the step) if it would not split back into `steps`."""
        bad = self.unreadable(steps)
        if bad is not None:
            raise ValueError(f"step {bad[0]}: {bad[1]}")
        return self.separator.join(steps)

    def unreadable(self, steps: Sequence[str]) -> tuple[int, str] | None:
        """(index, why) of the first step that would not split back out of `join(steps)`, else None."""
        sep = self.separator
        if len(steps) == 1 and steps[0] == "":
            return 0, "a single empty step would read back as no steps at all"
        for i, step in enumerate(steps):
            if not isinstance(step, str):
                return i, f"must be a string, got {type(step).__name__}"
            if sep in step:
                return i, f"contains the separator {sep!r}"
            # `split` cuts at the first separator it meets. Inside `step + sep` that must be
            # the appended one; an earlier match would start in the step's tail (its end
            # overlaps the separator's start) and cut the step short.
            if i < len(steps) - 1 and (step + sep).find(sep) != len(step):
                return i, (f"its end {step[-len(sep):]!r} runs into the separator {sep!r} "
                           "that follows it, so the text would split there")
        return None

    def clean(self, text: str) -> str:
        """`text` as a storable step: cut at its first separator, then its tail shortened until
        it no longer runs into the separator (module docstring, "Sampled steps")."""
        step = text.split(self.separator, 1)[0]
        while step and (step + self.separator).find(self.separator) != len(step):
            step = step[:-1]
        return step

    def prompt(self, question: str, steps: Sequence[str] = ()) -> str:
        """The text a policy continues to write the next step: question, separator, then each
        step followed by the separator. A solution's training text is `prompt(question)` +
        `join(steps)`, so a model trained on it stops each step at the separator."""
        self.join(steps)  # the same validation: each step must read back from the text
        return question + self.separator + "".join(s + self.separator for s in steps)


def blank(step: str) -> bool:
    """Whether a step is empty or whitespace only (module docstring, "Sampled steps")."""
    return not step.strip()


def content(steps: Sequence[str]) -> list[str]:
    """The non-blank steps of `steps`, in order: a sampled solution's steps worth scoring."""
    return [s for s in steps if not blank(s)]


def step_format_for(dataset: str, separator: str | None = None, trained: str | None = None) -> StepFormat:
    """The step format of a stage, by the one rule every stage and the Serve app use:
    `separator` when the config sets one; else `trained`, the separator the PRM in use was
    trained with (its scores mean something only on steps cut its way); else the dataset's own
    (`problems.default_separator`). A set `separator` that differs from `trained` is a
    ConfigError (a ValueError) naming `separator`."""
    from mathprm.config import ConfigError
    from mathprm.data.problems import default_separator

    if separator is not None and trained is not None and separator != trained:  # a ConfigError: one line in the CLI
        raise ConfigError(f"separator: {separator!r} differs from {trained!r}, the one the PRM was trained with; "
                         "leave separator unset or pick another PRM")
    chosen = separator if separator is not None else trained
    return StepFormat(chosen if chosen is not None else default_separator(dataset))
