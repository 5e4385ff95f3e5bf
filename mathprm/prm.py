"""The process reward model: a causal-LM backbone with a scalar head read at the end of every step.

A PRM is a Hugging Face `*ForTokenClassification` model with one label, initialised from any
causal-LM directory (the arithmetic policy, Qwen2.5-Math, ...): the backbone's weights are
loaded and the `score` head (hidden -> 1) starts fresh. A solution is encoded as

    ids(prompt(question)) + ids(step_0 + sep) + ids(step_1 + sep) + ...

each piece tokenised on its own, and step i's logit is read at the last token of
`step_i + sep`, where a causal model has seen the question and steps 0..i and nothing after.
So one forward pass scores every step; the seed instead ran one pass per step prefix and read
the logit of a `<next>` marker. Tokenising pieces separately pins each step's end to a token
boundary for any tokenizer (a BPE merge across the separator cannot move it), and training
and scoring share `encode_solution`, so they always agree.

The score is sigmoid(logit), trained with binary cross-entropy against soft labels in [0, 1]
(`bce_step_loss`; TRL casts labels to int, we keep the Monte-Carlo fraction). A saved PRM is
a plain HF directory (weights, config, tokenizer) plus `prm_config.json` naming its step
format; `PRMScorer` loads it and implements `mathprm.scorer.Scorer`.

Inputs longer than the model's context are scored in windows that each end at a step's end
(`windows`): a step far from the question is then judged with its left context cut, which
only matters for the 512-position arithmetic model on long real-math solutions.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mathprm.scorer import check_shapes
from mathprm.steps import StepFormat

PRM_CONFIG_FILE = "prm_config.json"
PRM_KIND = "mathprm.prm/v1"


# ----------------------------------------------------------------------------- encoding


def encode_solution(tokenizer: Any, fmt: StepFormat, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """(token ids, the index of each step's last token); ValueError naming a step that
    contains the separator (it would be two steps)."""
    ids = list(tokenizer(fmt.prompt(question))["input_ids"])
    positions = []
    for i, step in enumerate(steps):
        if fmt.separator in step:
            raise ValueError(f"step {i}: contains the separator {fmt.separator!r}")
        ids += tokenizer(step + fmt.separator, add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    return ids, positions


def windows(positions: Sequence[int], max_length: int) -> list[tuple[int, int, range]]:
    """Cover an encoding whose steps end at `positions` with windows of at most `max_length`
    tokens: a list of (start, end, indices of the steps scored in it), end exclusive.

    One window from 0 when everything fits. Otherwise each later window ends at the furthest
    step end it can reach while still holding the whole text of its first unscored step
    (which starts right after the previous step's end); a step longer than `max_length`
    alone is scored with its own beginning cut."""
    out, i, n = [], 0, len(positions)
    while i < n:
        start_of_step = 0 if i == 0 else positions[i - 1] + 1
        lo = max(0, positions[i] + 1 - max_length)
        if lo > start_of_step:  # even step i alone does not fit whole
            out.append((lo, positions[i] + 1, range(i, i + 1)))
            i += 1
            continue
        j = i
        while j + 1 < n and positions[j + 1] + 1 - max_length <= start_of_step:
            j += 1
        start = max(0, positions[j] + 1 - max_length)
        out.append((start, positions[j] + 1, range(i, j + 1)))
        i = j + 1
    return out


# ----------------------------------------------------------------------------- training maths


@dataclasses.dataclass
class PRMExample:
    input_ids: list[int]  # (T,) encode_solution's ids
    positions: list[int]  # (S,) each labelled step's last token
    targets: list[float]  # (S,) soft labels in [0, 1]


@dataclasses.dataclass
class PRMBatch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    targets: torch.Tensor  # (B, T) float soft label at step ends, 0 elsewhere
    step_mask: torch.Tensor  # (B, T) bool, True at the labelled step ends

    def to(self, device: torch.device | str) -> PRMBatch:
        return PRMBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(examples: Sequence[PRMExample], pad_id: int) -> PRMBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.float32)
    step_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
        targets[row, e.positions] = torch.tensor(e.targets, dtype=torch.float32)
        step_mask[row, e.positions] = True
    return PRMBatch(ids, mask, targets, step_mask)


def bce_step_loss(logits: torch.Tensor, targets: torch.Tensor, step_mask: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the labelled step positions only.

    logits, targets: (B, T); step_mask: (B, T) bool. With p = sigmoid(logit) and soft label
    y in [0, 1], each step contributes -[y log p + (1 - y) log(1 - p)] (Math-Shepherd, Wang et
    al. 2024, eq. 3 with soft labels); every other position contributes nothing. Minimised at
    p = y, so a step labelled 0.25 learns 0.25, not a rounded 0 (TRL's int labels would)."""
    per_token = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")
    n = step_mask.sum()
    if n == 0:
        raise ValueError("bce_step_loss: the batch has no labelled step")
    return (per_token * step_mask).sum() / n


def step_logits(model: torch.nn.Module, batch: PRMBatch) -> torch.Tensor:
    """(B, T) logits of a token-classification PRM (its one label)."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., 0]


# ----------------------------------------------------------------------------- building and saving


def build_prm(base: str | Path, **overrides: Any) -> torch.nn.Module:
    """A fresh PRM on the backbone of the HF causal-LM (or PRM) directory `base`: weights
    loaded, a one-label head; `overrides` go to the config (e.g. `torch_dtype`)."""
    from transformers import AutoConfig, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

    if not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(f"{base} is not a Hugging Face model directory (no config.json)")
    config = AutoConfig.from_pretrained(base)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight MISSING" is expected: the head is new
    try:
        return AutoModelForTokenClassification.from_pretrained(base, num_labels=1, **overrides)
    except ValueError as e:
        raise ValueError(f"{base}: its architecture {config.architectures} has no token-classification "
                         f"variant in transformers, so it cannot carry a PRM head ({e})") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def save_prm(model: torch.nn.Module, tokenizer: Any, fmt: StepFormat, path: str | Path, meta: dict[str, Any]) -> None:
    """Write a loadable PRM directory into `path` (callers make it atomic)."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    config = {"kind": PRM_KIND, "separator": fmt.separator,
              "score": "sigmoid of the one-label token-classification logit at the last token of step + separator",
              **meta}
    (path / PRM_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_prm_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / PRM_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a PRM directory (no {PRM_CONFIG_FILE}); train one with "
                                "`mathprm train-prm`")
    config = json.loads(file.read_text())
    if config.get("kind") != PRM_KIND:
        raise ValueError(f"{file}: kind {config.get('kind')!r} is not {PRM_KIND!r}")
    return config


# ----------------------------------------------------------------------------- the Scorer


class PRMScorer:
    """`Scorer` backed by a saved PRM: each solution scored in one forward pass (or a few
    windows when it is longer than the model's context), solutions batched by length."""

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 16,
                 dtype: torch.dtype | None = None) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        self.config = read_prm_config(path)
        self.step_format = StepFormat(self.config["separator"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForTokenClassification.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    @torch.inference_mode()
    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        check_shapes(questions, steps_per_question)
        out: list[list[float]] = [[0.0] * len(steps) for steps in steps_per_question]
        pieces = []  # (solution, window ids, positions inside the window, step indices)
        for i, (q, steps) in enumerate(zip(questions, steps_per_question)):
            if not steps:
                continue
            try:
                ids, positions = encode_solution(self.tokenizer, self.step_format, q, steps)
            except ValueError as e:
                raise ValueError(f"score: solution {i}: {e}") from None
            for start, end, which in windows(positions, self.max_length):
                pieces.append((i, ids[start:end], [positions[k] - start for k in which], which))
        pieces.sort(key=lambda p: len(p[1]))  # similar lengths share a batch: less padding
        for lo in range(0, len(pieces), self.batch_size):
            chunk = pieces[lo : lo + self.batch_size]
            batch = collate([PRMExample(ids, pos, [0.0] * len(pos)) for _, ids, pos, _ in chunk], self.pad_id)
            probs = torch.sigmoid(step_logits(self.model, batch.to(self.device)).float()).cpu()
            for row, (i, _, pos, which) in enumerate(chunk):
                for k, p in zip(which, probs[row, pos].tolist()):
                    out[i][k] = p
        return out
