"""The process reward model: a causal-LM backbone with a scalar head read at the end of every step.

A PRM is a causal LM (initialised from any HF causal-LM directory: the arithmetic policy,
Qwen2.5-Math, ...) plus a small head. A solution is encoded as

    ids(prompt(question)) + ids(step_0 + sep) + ids(step_1 + sep) + ...

each piece tokenised on its own, and step i's logit is read at the last token of
`step_i + sep`, where a causal model has seen the question and steps 0..i and nothing after.
So one forward pass scores every step, rather than one pass per step prefix reading the logit
of a marker token. Tokenising pieces separately pins each step's end to a token
boundary for any tokenizer (a BPE merge across the separator cannot move it), and training
and scoring share `encode_solution`, so they always agree.

The logit of step i is

    score(h_i) + w . phi_i

with h_i the backbone's last hidden state at the step's end and phi_i the **likelihood
features** of the text (`FEATURES`) under the base model the PRM started from, kept frozen
beside the trained backbone: the lowest and the mean log-probability of step i's tokens,
and the lowest over steps 0..i. A causal LM's surprise at a token ("I expected 116, it says 126") forms in its last
layer at the position before that token, where no later position's head can read it back;
handing the head that surprise is what lets a small PRM work from a few hundred labelled
solutions, from which a head on h alone learns little (docs/BENCHMARKS.md compares the two).
The confidence of a model in its own tokens is a known verifier by itself (DeepConf, Fu et al.
2025); `w` starts as that verifier (weight 1 on the prefix minimum) and training moves it.
Against the first-error truth that untrained start can rank steps better than the trained
variants, because Monte-Carlo values also teach the head how hard the rest of a problem is,
which the first-error truth ignores. `features: []` gives the
plain head; `hidden_head=False` drops score(h) and keeps the backbone frozen as the reference
itself, so training only fits `w` and a bias: the calibrated prior, one model copy, one
forward pass per batch, and nothing for Monte-Carlo values to teach about problem difficulty.

The score is sigmoid(logit), trained with binary cross-entropy against soft labels in [0, 1]
(`bce_step_loss`; TRL casts labels to int, we keep the Monte-Carlo fraction). A saved PRM is
the backbone as a plain HF causal-LM directory (weights, config, tokenizer; vLLM or
`AutoModelForCausalLM` load it as it is), `reference/` (the frozen base the features come
from, when there are features), `prm_head.safetensors` (the head) and `prm_config.json`
(step format, features); `load_prm` rebuilds it and `PRMScorer` implements
`mathprm.scorer.Scorer`.

Inputs longer than the model's context are scored in windows that each end at a step's end
(`windows`), and every window starts with the whole prompt: the question is never cut, the
oldest steps are (a step far from the question is judged without the steps long before it, its
prefix minimum taken over its window's steps). A prompt that leaves no room for a step is
refused (`mathprm.scorer.TooLongError`: ProcessBench skips and counts it).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mathprm import atomic
from mathprm.models import ModelLoadError, check_model_dir, loading
from mathprm.models.prefix import PrefixCache, PrefixCached, run_shared
from mathprm.prompts import DEFAULT_SYSTEM, Prompter
from mathprm.scorer import TooLongError, check_shapes
from mathprm.steps import StepFormat

PRM_CONFIG_FILE = "prm_config.json"
PRM_HEAD_FILE = "prm_head.safetensors"
REFERENCE_DIR = "reference"  # the frozen base LM the likelihood features come from
PRM_KIND = "mathprm.prm/v2"  # the format's name in prm_config.json (kept as first written, not a module path)
# The likelihood features, each a log-probability of the backbone's own LM head (floored at
# LOGP_FLOOR so one absurd token cannot dominate): the lowest and the mean over step i's
# tokens (its separator token left out), and the lowest over the tokens of steps 0..i.
FEATURES = ("step_min_logp", "step_mean_logp", "prefix_min_logp")
LOGP_FLOOR = -20.0


# ----------------------------------------------------------------------------- encoding


def encode_solution(prompter: Prompter, question: str, steps: Sequence[str]) -> tuple[list[int], list[int]]:
    """(token ids, the index of each step's last token); ValueError naming a step that
    contains the separator (it would be two steps)."""
    ids, positions, _ = encode_solution_spans(prompter, question, steps)
    return ids, positions


def encode_solution_spans(prompter: Prompter, question: str, steps: Sequence[str]) -> tuple[list[int], list[int], int]:
    """`encode_solution` and the prompt's length: step i's tokens are ids[a:b + 1] with b its
    last token and a the prompt's length (i = 0) or step i-1's last token + 1. The prompt is
    the policy's (`mathprm.prompts`: the chat template's turns when the PRM's tokenizer has one)."""
    fmt, tokenizer = prompter.step_format, prompter.tokenizer
    ids = prompter.ids(question)
    prompt_length = len(ids)
    positions = []
    for i, step in enumerate(steps):
        if fmt.separator in step:
            raise ValueError(f"step {i}: contains the separator {fmt.separator!r}")
        ids += tokenizer(step + fmt.separator, add_special_tokens=False)["input_ids"]
        positions.append(len(ids) - 1)
    return ids, positions, prompt_length


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
    step_ends: list[int] | None = None  # every step's last token, labelled or not; None: `positions`
    steps_from: int | None = None  # the first token of the first step (the prompt's length); None:
    #                                 the first step is taken to be its last token alone

    def __post_init__(self) -> None:
        ends = self.positions if self.step_ends is None else self.step_ends
        if list(ends) != sorted(set(ends)) or not set(self.positions) <= set(ends):
            raise ValueError("PRMExample: step_ends must be increasing and hold every labelled position")


@dataclasses.dataclass
class PRMBatch:
    input_ids: torch.Tensor  # (B, T) right-padded with pad_id
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    targets: torch.Tensor  # (B, T) float soft label at step ends, 0 elsewhere
    step_mask: torch.Tensor  # (B, T) bool, True at the labelled step ends
    step_index: torch.Tensor  # (B, T) long: the step a token belongs to (0, 1, ...), -1 outside steps

    def to(self, device: torch.device | str) -> PRMBatch:
        return PRMBatch(*(t.to(device) for t in dataclasses.astuple(self)))


def collate(examples: Sequence[PRMExample], pad_id: int) -> PRMBatch:
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    targets = torch.zeros((len(examples), width), dtype=torch.float32)
    step_mask = torch.zeros((len(examples), width), dtype=torch.bool)
    step_index = torch.full((len(examples), width), -1, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[row, : len(e.input_ids)] = 1
        targets[row, e.positions] = torch.tensor(e.targets, dtype=torch.float32)
        step_mask[row, e.positions] = True
        ends = e.positions if e.step_ends is None else e.step_ends
        start = ends[0] if e.steps_from is None else e.steps_from
        for k, end in enumerate(ends):
            step_index[row, start : end + 1] = k
            start = end + 1
    return PRMBatch(ids, mask, targets, step_mask, step_index)


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


def likelihood_features(lm_logits: torch.Tensor, input_ids: torch.Tensor, step_index: torch.Tensor,
                        names: Sequence[str] = FEATURES) -> torch.Tensor:
    """(B, T, F) features `names` (of `FEATURES`) of the step each token belongs to; 0 outside steps.

    lm_logits: (B, T, V) the causal LM's next-token logits; token t's log-probability is read
    from position t-1 (token 0 has none and counts as 0). Steps are the runs of `step_index`
    (B, T), -1 outside any step; each step's statistics skip its last token (the separator)."""
    unknown = set(names) - set(FEATURES)
    if unknown:
        raise ValueError(f"likelihood_features: unknown {sorted(unknown)}; known: {', '.join(FEATURES)}")
    if not names:
        return lm_logits.new_zeros(*input_ids.shape, 0)
    return step_features(next_token_logp(lm_logits[:, :-1], input_ids[:, 1:]), step_index, names)


def next_token_logp(lm_logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) float32 log-probability of `next_ids` (B, T) under the next-token logits (B, T, V)."""
    # Row by row: a float32 log-softmax over a (B, T, V) block is ~10 GB at B = 16, T = 1,024 and
    # a 150k vocabulary (Qwen2.5); one row at a time keeps it at T x V.
    return torch.stack([torch.log_softmax(lm_logits[b].float(), dim=-1).gather(-1, next_ids[b, :, None])[:, 0]
                        for b in range(next_ids.shape[0])])


def step_features(next_logp: torch.Tensor, step_index: torch.Tensor, names: Sequence[str] = FEATURES) -> torch.Tensor:
    """`likelihood_features` from the log-probabilities `next_logp` (B, T - 1) of tokens 1..T-1
    (`next_token_logp`), so a caller that has them (a prefix's cached ones) needs no logits."""
    logp = F.pad(next_logp, (1, 0)).clamp(min=LOGP_FLOOR)  # (B, T): log p(token t | tokens < t)
    inside = step_index >= 0
    idx = step_index.clamp(min=0)
    # A step's last token (its separator) is left out: after a final answer a policy writes EOS,
    # not the separator, so that token would look like an error at the end of every solution.
    is_end = step_index != F.pad(step_index[:, 1:], (0, 1), value=-1)
    counted = inside & ~is_end
    n_steps = int(step_index.max()) + 1 if inside.any() else 1
    zero = torch.zeros(logp.shape[0], n_steps, dtype=logp.dtype, device=logp.device)
    values = torch.where(counted, logp, torch.zeros_like(logp))  # 0 leaves a min of log-probs unchanged
    step_min = zero.scatter_reduce(1, idx, values, "amin", include_self=True)
    count = zero.scatter_add(1, idx, counted.to(logp.dtype))
    step_mean = zero.scatter_add(1, idx, values) / count.clamp(min=1)
    per_step = {"step_min_logp": step_min, "step_mean_logp": step_mean,
                "prefix_min_logp": torch.cummin(step_min, dim=1).values}
    out = torch.stack([per_step[n].gather(1, idx) for n in names], dim=-1)
    return out * inside[..., None]


class PRMModel(torch.nn.Module):
    """A causal LM plus the step head: logit = score(last hidden state) + w . likelihood features.

    The features come from `reference`, a frozen causal LM (the base the PRM started from),
    never from the backbone being trained: the PRM's loss does not keep the backbone a language
    model, so its own log-probabilities would drift away from the signal the features carry."""

    def __init__(self, lm: torch.nn.Module, features: Sequence[str] = FEATURES,
                 reference: torch.nn.Module | None = None, hidden_head: bool = True) -> None:
        super().__init__()
        self.lm = lm
        self.features = tuple(features)
        self.hidden_head = hidden_head
        likelihood_features(torch.zeros(1, 2, 1), torch.zeros(1, 2, dtype=torch.long),
                            torch.zeros(1, 2, dtype=torch.long), self.features)  # ValueError names a bad one
        if not hidden_head:  # the calibrated prior: the features and a bias, the backbone is the reference
            if not self.features:
                raise ValueError("PRMModel: hidden_head=False leaves only the likelihood features, so it needs some")
            if reference is not None and reference is not lm:
                raise ValueError("PRMModel: without the hidden-state head the backbone is the reference; "
                                 "pass no separate reference")
            reference = lm
            lm.requires_grad_(False)
        if self.features and reference is None:
            raise ValueError("PRMModel: likelihood features need a reference LM (build_prm loads one)")
        self.reference = reference if self.features else None
        if self.reference is not None:
            self.reference.requires_grad_(False)
            self.reference.eval()
        hidden = lm.config.get_text_config().hidden_size
        std = getattr(lm.config, "initializer_range", 0.02)
        self.score = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.score.weight, std=std)
        torch.nn.init.zeros_(self.score.bias)
        if not hidden_head:
            torch.nn.init.zeros_(self.score.weight)
            self.score.weight.requires_grad_(False)
        self.feature_weights = torch.nn.Linear(len(self.features), 1, bias=False) if self.features else None
        if self.feature_weights is not None:  # start as the model's own confidence in the prefix
            with torch.no_grad():
                self.feature_weights.weight.zero_()
                if "prefix_min_logp" in self.features:
                    self.feature_weights.weight[0, self.features.index("prefix_min_logp")] = 1.0
                else:
                    self.feature_weights.weight.fill_(1.0 / len(self.features))

    @property
    def config(self):
        return self.lm.config

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def train(self, mode: bool = True) -> PRMModel:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # frozen: no dropout, whatever mode the PRM is in
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                step_index: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) step logits (read them at step ends)."""
        if self.features and step_index is None:
            raise ValueError("PRMModel: likelihood features need step_index (collate builds it)")
        hidden = None
        if self.hidden_head:
            hidden = self.lm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                             logits_to_keep=1).hidden_states[-1]  # what the head reads, not the LM head
        logits = self.hidden_logits(hidden, input_ids.shape)
        if self.feature_weights is not None:
            with torch.no_grad():
                ref_logits = self.reference(input_ids=input_ids, attention_mask=attention_mask).logits
                phi = likelihood_features(ref_logits, input_ids, step_index, self.features)
            logits = logits + self.feature_logits(phi)
        return logits

    def hidden_logits(self, hidden: torch.Tensor | None, shape: Sequence[int]) -> torch.Tensor:
        """(B, T) score(h) of the backbone's last hidden states `hidden` (B, T, H); without the
        hidden-state head (`hidden` None) score.weight is 0, only its bias counts and the backbone
        need not run."""
        if hidden is None:
            return self.score.bias.float().expand(shape)
        return self.score(hidden.to(self.score.weight.dtype))[..., 0].float()

    def feature_logits(self, phi: torch.Tensor) -> torch.Tensor:
        """(B, T) w . phi of the likelihood features phi (B, T, F)."""
        return self.feature_weights(phi.to(self.feature_weights.weight.dtype))[..., 0].float()

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"score.{k}": v for k, v in self.score.state_dict().items()}
        if self.feature_weights is not None:
            state["feature_weights.weight"] = self.feature_weights.weight
        return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def step_logits(model: torch.nn.Module, batch: PRMBatch) -> torch.Tensor:
    """(B, T) logits of a PRM (`PRMModel`, possibly wrapped by DDP); read them at step ends."""
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, step_index=batch.step_index)


# ----------------------------------------------------------------------------- building and saving


def build_prm(base: str | Path, features: Sequence[str] = FEATURES, hidden_head: bool = True,
              **overrides: Any) -> PRMModel:
    """A fresh PRM on the HF causal-LM directory `base` (its weights loaded, the head new);
    `overrides` go to `from_pretrained` (e.g. `dtype`). `hidden_head=False`: the calibrated
    prior, one frozen copy of `base` serving as backbone and reference."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_dir(base, "base")
    with loading(base):
        config = AutoConfig.from_pretrained(base)
        try:
            lm = AutoModelForCausalLM.from_pretrained(base, **overrides)
        except ValueError as e:
            raise ModelLoadError(f"{base}: its architecture {config.architectures} is not a causal LM transformers "
                                 f"knows, so it cannot be a PRM backbone ({e})") from None
        reference = AutoModelForCausalLM.from_pretrained(base, **overrides) if features and hidden_head else None
    return PRMModel(lm, features, reference, hidden_head)


def save_prm(model: PRMModel, tokenizer: Any, fmt: StepFormat, path: str | Path, meta: dict[str, Any]) -> None:
    """Write a loadable PRM directory into `path` (callers make it atomic)."""
    from safetensors.torch import save_file

    path = Path(path)
    model.lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    if model.reference is not None and model.hidden_head:  # without the hidden head the backbone is it
        model.reference.save_pretrained(path / REFERENCE_DIR)
    save_file(model.head_state_dict(), str(path / PRM_HEAD_FILE))
    chat = meta.get("chat")  # what the training prompts were (Prompter.describe); unknown: the tokenizer decides
    prompter = Prompter(tokenizer, fmt, meta.get("system_prompt", DEFAULT_SYSTEM),
                        "auto" if chat is None else "on" if chat else "off")
    config = {"kind": PRM_KIND, "separator": fmt.separator, "features": list(model.features),
              "hidden_head": model.hidden_head,
              "score": "sigmoid(score(h) + w . features) at the last token of step + separator; h the backbone's "
                       "last hidden state there, features its own log-probabilities of the step (mathprm.models.prm)",
              **meta, **prompter.describe()}
    (path / PRM_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def read_prm_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / PRM_CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a PRM directory (no {PRM_CONFIG_FILE}); train one with "
                                "`mathprm train-prm`")
    config = atomic.read_json(file, "retrain the PRM (`mathprm train-prm`) or point to another one")
    if config.get("kind") != PRM_KIND:
        raise ValueError(f"{file}: kind {config.get('kind')!r} is not {PRM_KIND!r}; a PRM saved by an older "
                         "mathprm must be retrained (`mathprm train-prm`)")
    return config


# A step is doubtful when the reference LM gives one of its tokens probability below 1/e (~0.37):
# PRMs with very different fitted weights find their best first-error F1 near this log-prob, and
# it carries over to fresh problems. Tuned in the arithmetic world with exact labels; a real
# checker may differ.
DOUBT_LOGP = -1.0


def likelihood_threshold(model: Any) -> float | None:
    """The ProcessBench threshold of a PRM that is its likelihood alone (no hidden-state head,
    the one feature `prefix_min_logp`, a positive weight): its score of a prefix whose least
    likely token the reference LM gives probability 1/e (`DOUBT_LOGP`). It needs no labels, and
    it is the same point on the log-prob scale whatever weight and bias the noisy tree-search
    labels fitted. None for any other PRM (or model)."""
    if not isinstance(model, PRMModel) or model.hidden_head or model.features != ("prefix_min_logp",):
        return None
    weight, bias = float(model.feature_weights.weight[0, 0].detach()), float(model.score.bias[0].detach())
    if not weight > 0:  # a PRM that learned to trust unlikely steps: no such point
        return None
    return 1.0 / (1.0 + math.exp(-(weight * DOUBT_LOGP + bias)))


def saved_threshold(path: str | Path | None) -> float:
    """The ProcessBench threshold to use with the PRM in `path`: the one its training picked
    (`prm_config.json`'s "threshold", on validation paths or labelled steps:
    `mathprm.train.prm.choose_threshold`; "threshold_from" says which), else 0.5 (the usual
    one for PRMs trained on hard labels; also for the oracles and for `path` None)."""
    if path is None or not (Path(path) / PRM_CONFIG_FILE).is_file():
        return 0.5
    value = read_prm_config(path).get("threshold")
    return 0.5 if value is None else float(value)

def load_prm(path: str | Path, dtype: torch.dtype | None = None) -> PRMModel:
    """The saved PRM in `path` (`save_prm`'s directory), in `dtype` (default: as saved)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = read_prm_config(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    features = config.get("features", [])
    hidden_head = bool(config.get("hidden_head", True))  # False: the backbone is the reference (no reference/)
    with loading(path):
        lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        reference = (AutoModelForCausalLM.from_pretrained(Path(path) / REFERENCE_DIR, **kwargs)
                     if features and hidden_head else None)
        head = load_file(str(Path(path) / PRM_HEAD_FILE))
    model = PRMModel(lm, features, reference, hidden_head)
    missing = set(model.head_state_dict()) ^ set(head)
    if missing:
        raise ValueError(f"{path}/{PRM_HEAD_FILE}: does not match prm_config.json's features (tensors "
                         f"{sorted(missing)})")
    model.score.load_state_dict({k.removeprefix("score."): v for k, v in head.items() if k.startswith("score.")})
    if model.feature_weights is not None:
        model.feature_weights.weight.data.copy_(head["feature_weights.weight"])
    if dtype is not None:
        model.to(dtype)
    return model


# ----------------------------------------------------------------------------- the Scorer


class PRMScorer(PrefixCached):
    """`Scorer` backed by a saved PRM: each solution scored in one forward pass (or a few
    windows when it is longer than the model's context), solutions batched by length.

    With `prefix_cache_tokens` > 0, solutions that fit the context and share a token prefix (a
    search round's candidates) run it once, and recent prefixes are kept for the next call
    (`mathprm.models.prefix`): both the backbone's and the reference's passes, the features'
    log-probabilities inside a prefix cached with it. `cache_stats()` reports the cache and the
    tokens computed. 0: the plain path above."""

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 16,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 0) -> None:
        from transformers import AutoTokenizer

        self.config = read_prm_config(path)
        self.step_format = StepFormat(self.config["separator"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        with loading(path):
            self.tokenizer = AutoTokenizer.from_pretrained(path)
        # The prompts it was trained on (a config without "chat" predates chat prompts: plain).
        self.prompter = Prompter(self.tokenizer, self.step_format, self.config.get("system_prompt"),
                                 "on" if self.config.get("chat") else "off")
        self.model = load_prm(path, dtype=dtype).to(self.device).eval()
        self.batch_size = batch_size
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 30)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    @torch.inference_mode()
    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        check_shapes(questions, steps_per_question)
        out: list[list[float]] = [[0.0] * len(steps) for steps in steps_per_question]
        pieces = []  # (solution, window ids, positions inside the window, step indices)
        whole = []  # with a prefix cache, the solutions that fit the context: (solution, ids, positions, prompt length)
        for i, (q, steps) in enumerate(zip(questions, steps_per_question)):
            if not steps:
                continue
            try:
                ids, positions, prompt_length = encode_solution_spans(self.prompter, q, steps)
            except ValueError as e:
                raise ValueError(f"score: solution {i}: {e}") from None
            budget = self.max_length - prompt_length  # every window holds the whole prompt
            if budget < 1:
                raise TooLongError(f"score: solution {i}: its prompt alone is {prompt_length} tokens, the PRM's "
                                   f"context {self.max_length}", i, len(ids), self.max_length)
            if self.prefix_cache.max_tokens and len(ids) <= self.max_length:
                whole.append((i, ids, positions, prompt_length))
                continue
            ends = [p - prompt_length for p in positions]  # step ends within the steps' tokens
            for start, end, which in windows(ends, budget):
                first = 0 if which[0] == 0 else ends[which[0] - 1] + 1  # the window's first scored step
                window = ids[:prompt_length] + ids[prompt_length + start : prompt_length + end]
                pieces.append((i, window, [prompt_length + ends[k] - start for k in which], which,
                               prompt_length + max(0, first - start)))
        if whole:
            self._score_shared(whole, out, questions)
        pieces.sort(key=lambda p: len(p[1]))  # similar lengths share a batch: less padding
        self.prefix_cache.count_full(sum(len(p[1]) for p in pieces))
        for lo in range(0, len(pieces), self.batch_size):
            chunk = pieces[lo : lo + self.batch_size]
            batch = collate([PRMExample(ids, pos, [0.0] * len(pos), steps_from=first)
                             for _, ids, pos, _, first in chunk], self.pad_id)
            probs = torch.sigmoid(step_logits(self.model, batch.to(self.device)).float()).cpu()
            for row, (i, _, pos, which, _) in enumerate(chunk):
                for k, p in zip(which, probs[row, pos].tolist()):
                    out[i][k] = p
        return out

    def _score_shared(self, whole: list[tuple[int, list[int], list[int], int]], out: list[list[float]],
                      questions: Sequence[str]) -> None:
        """Score whole solutions through the prefix cache: per position, score(h) and the
        reference's log-probability of the next token (`_values`), then the step features of each
        solution from those log-probabilities, as `PRMModel.forward` computes them."""
        model = self.model
        n_models = int(model.hidden_head) + int(model.feature_weights is not None)
        values = run_shared(self._values, n_models, [ids for _, ids, _, _ in whole], self.prefix_cache,
                            self.batch_size, self.pad_id, self.device, [questions[i] for i, _, _, _ in whole])
        for (i, ids, positions, prompt_length), v in zip(whole, values):
            logits = v[:, 0]
            if model.feature_weights is not None:
                step_index = collate([PRMExample(ids, positions, [0.0] * len(positions), steps_from=prompt_length)],
                                     self.pad_id).step_index.to(self.device)
                phi = step_features(v[None, :-1, 1], step_index, model.features)
                logits = logits + model.feature_logits(phi)[0]
            out[i] = torch.sigmoid(logits[positions].float()).cpu().tolist()

    def _values(self, ids: torch.Tensor, next_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
                caches: list[Any]) -> torch.Tensor:
        """`mathprm.models.prefix.Forward`: (B, T, 1 or 2) score(h) at every position and, with
        likelihood features, the reference's log-probability of the token after it."""
        model, caches = self.model, iter(caches)
        hidden = None
        if model.hidden_head:
            hidden = model.lm(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                              past_key_values=next(caches), use_cache=True, output_hidden_states=True,
                              logits_to_keep=1).hidden_states[-1]
        columns = [model.hidden_logits(hidden, ids.shape)]
        if model.feature_weights is not None:
            logits = model.reference(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                                     past_key_values=next(caches), use_cache=True).logits
            columns.append(next_token_logp(logits, next_ids))
        return torch.stack(columns, dim=-1)
