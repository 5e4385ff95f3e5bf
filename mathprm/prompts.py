"""The one prompt builder: question + the steps so far -> the text (and token ids) a model continues.

Every stage that puts a question in front of a model builds the prompt here: the generators
(labelling, search, evaluation, Serve, PPO rollouts), PRM training and scoring, SFT and the PPO
learner. Two shapes, chosen by the model's tokenizer:

- **chat**: the tokenizer has a chat template (an instruct model: Qwen2.5-Math-Instruct,
  Llama-3-Instruct, ...). The prompt is the template applied to a system message (`system`,
  by default Qwen2.5-Math's "Please reason step by step, and put your final answer within
  \\boxed{}.") and the question as the user turn, with the opening of the assistant turn
  (`add_generation_prompt`); the steps so far follow, each with its separator. The steps are
  the assistant turn's text, so no template text ever enters a step, a label or a score. The
  model ends its turn with one of its EOS ids (`<|im_end|>` for Qwen).
- **plain**: no template (a base model, the arithmetic world's character-level policy): the
  question, the separator, then the steps (`StepFormat.prompt`).

Token ids: a chat prompt carries its own special tokens as text (`<|im_start|>`, a Llama-3
`<|begin_of_text|>`), so it is encoded without the tokenizer's own additions (no second BOS);
a plain prompt is encoded with them (the BOS a base model was trained with). `ids` is the one
place that decides, and every stage that encodes a prompt calls it, so a generator, the PRM
and the PPO learner always see the same ids for the same prefix.

Pure: a tokenizer object in, strings and ints out; imports neither torch, Ray nor vLLM.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mathprm.steps import StepFormat

DEFAULT_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
CHAT_MODES = ("auto", "on", "off")


class Prompter:
    """A model's prompts (module docstring). `chat`: "auto" uses the tokenizer's chat template
    when it has one; "on" requires one (ValueError naming `chat` otherwise); "off" writes plain
    prompts even for a chat model. `system`: the system message of a chat prompt (None or ""
    for none: the template's own default, if it has one)."""

    def __init__(self, tokenizer: Any, fmt: StepFormat, system: str | None = DEFAULT_SYSTEM,
                 chat: str = "auto") -> None:
        if chat not in CHAT_MODES:
            raise ValueError(f"chat: must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if chat == "on" and not has_template:
            raise ValueError("chat: on, but the model's tokenizer has no chat template (tokenizer_config.json "
                             "chat_template); use chat=auto or off")
        self.tokenizer, self.step_format, self.system = tokenizer, fmt, system or None
        self.chat = has_template and chat != "off"

    def head(self, question: str) -> str:
        """The text before the first step: the chat template's system + user turns and the
        opening of the assistant turn, or (plain) the question and the separator."""
        if not self.chat:
            return self.step_format.prompt(question)
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": question}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def text(self, question: str, steps: Sequence[str] = ()) -> str:
        """The text the model continues after `steps`: `head(question)`, then each step followed
        by the separator (ValueError naming a step that would not read back, `StepFormat.join`)."""
        self.step_format.join(steps)
        return self.head(question) + "".join(s + self.step_format.separator for s in steps)

    def ids(self, question: str, steps: Sequence[str] = ()) -> list[int]:
        """The token ids of `text(question, steps)` (module docstring, "Token ids")."""
        return self.encode(self.text(question, steps))

    def room(self, question: str, steps: Sequence[str], context_length: int) -> int:
        """Tokens a context of `context_length` has left after the prompt of (question, steps)
        (<= 0: none): every generator's `room`."""
        return context_length - len(self.ids(question, steps))

    def encode(self, text: str) -> list[int]:
        """The token ids of a prompt `text` made by `text()` (module docstring, "Token ids")."""
        return list(self.tokenizer(text, add_special_tokens=not self.chat)["input_ids"])

    def describe(self) -> dict[str, Any]:
        """What a saved artefact records about its prompts (a PRM's config), to rebuild them alike."""
        return {"chat": self.chat, "system_prompt": self.system}
