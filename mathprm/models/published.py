"""Published process reward models as `Scorer`s, each loaded in its published layout without remote code.

Four kinds (`mathprm.scorer.SCORERS`), each reproducing its authors' own inference recipe:

- `qwen` (Qwen/Qwen2.5-Math-PRM-7B, -72B; model card "Quick Start" and `modeling_qwen2_rm.py`):
  config `architectures: ["Qwen2ForProcessRewardModel"]`, weights `model.*` (a `Qwen2Model`) and
  `score.0.*`, `score.2.*` (Linear(h, h), ReLU, Linear(h, 2)). Input: the tokenizer's chat template
  over [system "Please reason step by step, and put your final answer within \\boxed{}.", user
  question, assistant = the steps joined by `<extra_0>` plus a trailing `<extra_0>`], encoded as a
  whole; step i's score is softmax(score(h))[1] at the i-th `<extra_0>`.
- `math_shepherd` (peiyi9979/math-shepherd-mistral-7b-prm, README): a causal LM; input
  `question + " " + output`, the output being every step followed by the tag " ки", steps joined by
  "\\n" as in the README's example. Step i's score is softmax over the logits of "+" and "-" at the
  i-th tag, the "+" share; the tag id is `encode("ки")[-1]` and the two ids `encode("+ -")[1:]` in
  the README, i.e. without the BOS the Mistral tokenizer adds. The README's steps carry their
  policy's "Step k: " prefixes; ours are scored as written, with none added.
- `rlhflow` (RLHFlow/Llama3.1-8B-PRM-Deepseek-Data; RLHF-Reward-Modeling `math-rm/README.md` and
  `math-rm/prm_evaluate.py`): a causal LM over a conversation whose user turns are the steps,
  stripped (the first prefixed with `question + " "`), each answered by the assistant with "+";
  the Deepseek-Data model's steps are cut at "\n\n". The evaluation code runs
  one pass per step over the turns so far and reads softmax over the logits of "+" and "-"
  (`encode("+")[-1]`, `encode("-")[-1]`) at position -3, the one that predicts the last "+". Here
  one pass over all turns reads the same positions: a causal LM's logits at a position depend
  only on the tokens before it, so they are the same when the chat template renders the first k
  turns as a token prefix of all of them, which `encode` checks for every turn (ValueError if not).
- `skywork` (Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B, -7B; SkyworkAI/skywork-o1-prm-inference
  `prm_model.py`, `io_utils.py`, and its vLLM plugin `Qwen2ForPrmModel`): config `architectures:
  ["Qwen2ForPrmModel"]`, weights `model.*` and the value head `v_head.summary.*` (Linear(h, 1)),
  `lm_head.*` unused (the plugin skips it too). Input as `prepare_input` builds it: ids of
  `bos_token + question + "\\n"`, then per line ids of the line and the "\\n" token, each line
  tokenised alone; the score is sigmoid(v_head(h)) at a flagged "\\n" token. A step of ours
  may hold several lines; it is flagged once, at its last line's "\\n", so it gets the reward the
  published code gives that line.

Every kind batches solutions by length (right padding), reads its context from the config's
`max_position_embeddings` and refuses a longer solution with a `TooLongError` naming it (nothing is
cut), runs on cuda when there is one (bf16) or the CPU (fp32), and gives `[]` for a solution with
no steps. With `prefix_cache_tokens` > 0, solutions that share a token prefix (a search's candidates)
run it once and recent prefixes are kept for the next call (`mathprm.models.prefix`); 0 is the plain
full pass per solution. A tokenizer without the token a format needs, or weights not in the published names,
is a one-line ValueError naming the kind and the directory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2Model
from transformers.models.qwen2.modeling_qwen2 import Qwen2PreTrainedModel

from mathprm import atomic
from mathprm.models import ModelLoadError, loading
from mathprm.models.prefix import PrefixCache, PrefixCached, run_shared
from mathprm.scorer import TooLongError, check_shapes

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QWEN_STEP_TOKEN = "<extra_0>"
SHEPHERD_TAG = "ки"


# ----------------------------------------------------------------------------- loading


def _published_config(kind: str, path: str | Path, architecture: str | None) -> dict[str, Any]:
    """config.json of `path`; ValueError unless it declares `architecture` (None: any causal LM)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ValueError(f"{kind}: {path} has no config.json, so it is not a published {kind} PRM directory")
    config = atomic.read_json(file, f"restore the published {kind} checkpoint's config.json")
    archs = config.get("architectures") or []
    ok = archs == [architecture] if architecture else len(archs) == 1 and archs[0].endswith("ForCausalLM")
    if not ok:
        raise ValueError(f"{kind}: {path} declares architectures {archs}, not {architecture or 'one *ForCausalLM'}")
    if architecture and config.get("model_type") != "qwen2":
        raise ValueError(f"{kind}: {path} has model_type {config.get('model_type')!r}, not 'qwen2'")
    return config


def _device_dtype(device: str | None, dtype: torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def _tokenizer(kind: str, path: str | Path, chat: bool = False) -> Any:
    with loading(path):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if chat and not tokenizer.chat_template:
        raise ValueError(f"{kind}: the tokenizer in {path} has no chat template, which the published input needs")
    return tokenizer


def _token_id(kind: str, path: str | Path, tokenizer: Any, text: str, ids: list[int]) -> int:
    """The one id `ids[-1]` that the published recipe takes for `text`; ValueError (naming the
    kind, the token and the directory) when the tokenizer does not hold `text` as one token."""
    decoded = tokenizer.decode(ids[-1:]) if ids else None
    if not (decoded == text or text.strip() and decoded and decoded.strip() == text):
        raise ValueError(f"{kind}: the tokenizer in {path} has no single token for {text!r} "
                         f"(it gives {tokenizer.convert_ids_to_tokens(ids)}), which the published format reads")
    return ids[-1]


class _QwenProcessRM(Qwen2PreTrainedModel):
    """The module layout of Qwen's `Qwen2ForProcessRewardModel`, so its weights load by name."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        h = config.hidden_size
        self.score = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 2))
        self.post_init()


class _SkyworkValueRM(Qwen2PreTrainedModel):
    """The module layout of Skywork's `Qwen2ForPrmModel`: the backbone and `v_head.summary`; its
    checkpoint's `lm_head.*` (the wrapped causal LM's) is not used."""

    _keys_to_ignore_on_load_unexpected: ClassVar[list[str]] = [r"^lm_head\."]

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__(config)
        self.model = Qwen2Model(config)
        self.v_head = nn.ModuleDict({"summary": nn.Linear(config.hidden_size, 1)})
        self.post_init()


def _load_qwen2_with_head(kind: str, path: str | Path, cls: type, dtype: torch.dtype) -> Any:
    """`cls` with every weight from `path` by its published name; a missing, unexpected or
    misshapen one is a one-line ValueError (transformers alone would only log it)."""
    with loading(path):
        try:
            model, info = cls.from_pretrained(path, config=Qwen2Config.from_pretrained(path), dtype=dtype,
                                              output_loading_info=True)
        except OSError as e:
            raise ModelLoadError(f"{kind}: no weights in {path} ({str(e).splitlines()[0]})") from None
    wrong = {what: sorted(info[f"{what}_keys"])[:4] for what in ("missing", "unexpected", "mismatched")
             if info[f"{what}_keys"]}
    if wrong:
        raise ValueError(f"{kind}: {path} is not in the published layout; weights " +
                         ", ".join(f"{what} {names}" for what, names in wrong.items()))
    return model


def _load_causal_lm(kind: str, path: str | Path, dtype: torch.dtype) -> Any:
    with loading(path):
        lm, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        raise ValueError(f"{kind}: {path} lacks weights of its architecture: {sorted(info['missing_keys'])[:4]}")
    return lm


def _tag_positions(ids: list[int], tag_id: int, tag: str, n_steps: int) -> list[int]:
    positions = [k for k, t in enumerate(ids) if t == tag_id]
    if len(positions) != n_steps:
        raise ValueError(f"the input holds {len(positions)} {tag!r} tokens for {n_steps} steps (a step that "
                         f"contains {tag!r}, or a tag merged with the text beside it, would misplace the scores)")
    return positions


# ----------------------------------------------------------------------------- scoring


def _score(scorer: Any, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
    """The batched loop every kind shares: `scorer.encode(question, steps)` gives (token ids, the
    position read for each step), `scorer.backbone` the last hidden states of a right-padded (B, T)
    batch and `scorer.head` the (N,) scores of N of them. Solutions of similar length share a batch.
    With a prefix cache (`prefix_cache_tokens` > 0) solutions that share a token prefix run it once
    (`mathprm.models.prefix`), the head read at every position `scorer.readable` marks."""
    check_shapes(questions, steps_per_question)
    out: list[list[float]] = [[] for _ in questions]
    pieces = []
    for i, (question, steps) in enumerate(zip(questions, steps_per_question)):
        if not steps:
            continue
        try:
            ids, positions = scorer.encode(question, list(steps))
        except ValueError as e:
            raise ValueError(f"{scorer.kind}: solution {i}: {e}") from None
        if len(ids) > scorer.max_length:
            raise TooLongError(f"{scorer.kind}: solution {i} is {len(ids)} tokens, longer than the model's context "
                               f"of {scorer.max_length} (max_position_embeddings); it is not cut",
                               i, len(ids), scorer.max_length)
        pieces.append((i, ids, positions))
    device = scorer.device
    if scorer.prefix_cache.max_tokens:
        with torch.inference_mode():
            values = run_shared(functools.partial(_values, scorer), 1, [ids for _, ids, _ in pieces],
                                scorer.prefix_cache, scorer.batch_size, scorer.pad_id, device,
                                [questions[i] for i, _, _ in pieces])
        for (i, _, positions), v in zip(pieces, values):
            out[i] = v[positions, 0].tolist()
        return out
    pieces.sort(key=lambda p: len(p[1]))  # similar lengths share a batch: less padding
    scorer.prefix_cache.count_full(sum(len(ids) for _, ids, _ in pieces))
    for lo in range(0, len(pieces), scorer.batch_size):
        chunk = pieces[lo : lo + scorer.batch_size]
        ids = torch.full((len(chunk), max(len(p[1]) for p in chunk)), scorer.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        rows: list[int] = []
        cols: list[int] = []
        for r, (_, seq, positions) in enumerate(chunk):
            ids[r, : len(seq)] = torch.tensor(seq)
            mask[r, : len(seq)] = 1
            rows += [r] * len(positions)
            cols += positions
        with torch.inference_mode():
            h = scorer.backbone(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            probs = scorer.head(h.last_hidden_state[torch.tensor(rows, device=device),
                                                    torch.tensor(cols, device=device)]).float().cpu().tolist()
        k = 0
        for i, _, positions in chunk:
            out[i] = probs[k : k + len(positions)]
            k += len(positions)
    return out


def _values(scorer: Any, ids: torch.Tensor, next_ids: torch.Tensor, mask: torch.Tensor, position_ids: torch.Tensor,
            caches: list[Any]) -> torch.Tensor:
    """`mathprm.models.prefix.Forward` of a published kind: (B, T, 1) its score at every position
    `scorer.readable` marks (a superset of the read positions that depends on the tokens alone, so
    a cached prefix serves any later solution), 0 elsewhere."""
    h = scorer.backbone(input_ids=ids, attention_mask=mask, position_ids=position_ids, past_key_values=caches[0],
                        use_cache=True).last_hidden_state
    keep = scorer.readable(ids, next_ids)
    out = torch.zeros(*ids.shape, 1, dtype=torch.float32, device=ids.device)
    out[keep] = scorer.head(h[keep]).float()[:, None]
    return out


def _pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out either way


class QwenPRMScorer(PrefixCached):
    """Qwen2.5-Math-PRM (module docstring): softmax(head)[1] at each `<extra_0>`."""

    kind = "qwen"
    separator = "\n\n"  # the model card's recommended step separation

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 8,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 0) -> None:
        config = _published_config(self.kind, path, "Qwen2ForProcessRewardModel")
        self.tokenizer = _tokenizer(self.kind, path, chat=True)
        if QWEN_STEP_TOKEN not in self.tokenizer.get_vocab():
            raise ValueError(f"{self.kind}: the tokenizer in {path} has no {QWEN_STEP_TOKEN} token, the step "
                             "separator the published PRM reads")
        self.step_id = _token_id(self.kind, path, self.tokenizer, QWEN_STEP_TOKEN,
                                 self.tokenizer.encode(QWEN_STEP_TOKEN))
        self.device, dtype = _device_dtype(device, dtype)
        self.model = _load_qwen2_with_head(self.kind, path, _QwenProcessRM, dtype).to(self.device).eval()
        self.backbone = self.model.model
        self.max_length = int(config["max_position_embeddings"])
        self.batch_size, self.pad_id = batch_size, _pad_id(self.tokenizer)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        messages = [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": question},
                    {"role": "assistant", "content": QWEN_STEP_TOKEN.join(steps) + QWEN_STEP_TOKEN}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        ids = self.tokenizer.encode(text)
        return ids, _tag_positions(ids, self.step_id, QWEN_STEP_TOKEN, len(steps))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model.score(h).float(), dim=-1)[:, 1]

    def readable(self, ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return ids == self.step_id

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        return _score(self, questions, steps_per_question)



class SkyworkPRMScorer(PrefixCached):
    """Skywork-o1-Open-PRM (module docstring): sigmoid(v_head(h)) at each step's last "\\n"."""

    kind = "skywork"
    separator = "\n"  # the published inference splits a response into steps at every "\n"

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 8,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 0) -> None:
        config = _published_config(self.kind, path, "Qwen2ForPrmModel")
        self.tokenizer = _tokenizer(self.kind, path)
        if self.tokenizer.bos_token is None:
            raise ValueError(f"{self.kind}: the tokenizer in {path} has no bos_token, which the published input "
                             "starts with")
        self.newline_id = _token_id(self.kind, path, self.tokenizer, "\n", self.tokenizer.encode("\n"))
        self.device, dtype = _device_dtype(device, dtype)
        self.model = _load_qwen2_with_head(self.kind, path, _SkyworkValueRM, dtype).to(self.device).eval()
        self.backbone = self.model.model
        self.max_length = int(config["max_position_embeddings"])
        self.batch_size, self.pad_id = batch_size, _pad_id(self.tokenizer)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids = tok.encode(tok.bos_token + question + "\n")
        positions = []
        for step in steps:
            for line in step.split("\n"):  # `prepare_input` tokenises every line alone
                ids += (tok.encode(line) if line else []) + [self.newline_id]
            positions.append(len(ids) - 1)
        return ids, positions

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model.v_head.summary(h).float())[:, 0]

    def readable(self, ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return ids == self.newline_id

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        return _score(self, questions, steps_per_question)



def _plus_share(lm: Any, h: torch.Tensor, candidates: list[int]) -> torch.Tensor:
    """softmax over the LM's logits of candidates = [good, bad] at the (N, hidden) states h, the
    good share. The LM head runs on the read positions only: a 128k vocabulary over every token is
    wasted work."""
    logits = lm.get_output_embeddings()(h)[:, candidates]
    return torch.softmax(logits.float(), dim=-1)[:, 0]


class MathShepherdScorer(PrefixCached):
    """Math-Shepherd (module docstring): P(+) against P(-) at each " ки" tag."""

    kind = "math_shepherd"
    separator = "\n"  # its training solutions put one step on a line

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 8,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 0) -> None:
        config = _published_config(self.kind, path, None)
        self.tokenizer = tok = _tokenizer(self.kind, path)
        self.tag_id = _token_id(self.kind, path, tok, SHEPHERD_TAG, tok.encode(SHEPHERD_TAG, add_special_tokens=False))
        pair = tok.encode("+ -", add_special_tokens=False)  # the README's encode("+ -")[1:], its BOS dropped
        if len(pair) != 2:
            raise ValueError(f"{self.kind}: the tokenizer in {path} does not encode '+ -' as two tokens "
                             f"(it gives {tok.convert_ids_to_tokens(pair)}), which the published format reads")
        self.candidates = [_token_id(self.kind, path, tok, "+", pair[:1]), _token_id(self.kind, path, tok, "-", pair)]
        self.device, dtype = _device_dtype(device, dtype)
        self.model = _load_causal_lm(self.kind, path, dtype).to(self.device).eval()
        self.backbone = self.model.base_model
        self.max_length = int(config["max_position_embeddings"])
        self.batch_size, self.pad_id = batch_size, _pad_id(tok)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        output = "\n".join(f"{step} {SHEPHERD_TAG}" for step in steps)
        ids = self.tokenizer.encode(f"{question} {output}")
        return ids, _tag_positions(ids, self.tag_id, SHEPHERD_TAG, len(steps))

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return _plus_share(self.model, h, self.candidates)

    def readable(self, ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return ids == self.tag_id

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        return _score(self, questions, steps_per_question)



class RLHFlowScorer(PrefixCached):
    """RLHFlow Llama3.1-8B-PRM (module docstring): P(+) against P(-) where the assistant answers each step."""

    kind = "rlhflow"
    separator = "\n\n"  # the README splits a response into steps at "\n\n"

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 8,
                 dtype: torch.dtype | None = None, prefix_cache_tokens: int = 0) -> None:
        config = _published_config(self.kind, path, None)
        self.tokenizer = tok = _tokenizer(self.kind, path, chat=True)
        self.plus_id = _token_id(self.kind, path, tok, "+", tok.encode("+"))
        self.candidates = [self.plus_id, _token_id(self.kind, path, tok, "-", tok.encode("-"))]
        self.device, dtype = _device_dtype(device, dtype)
        self.model = _load_causal_lm(self.kind, path, dtype).to(self.device).eval()
        self.backbone = self.model.base_model
        self.max_length = int(config["max_position_embeddings"])
        self.batch_size, self.pad_id = batch_size, _pad_id(tok)
        self.prefix_cache = PrefixCache(prefix_cache_tokens)

    def encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        conversation: list[dict[str, str]] = []
        for k, step in enumerate(s.strip() for s in steps):  # prm_evaluate.py strips every step
            conversation += [{"role": "user", "content": f"{question} {step}" if k == 0 else step},
                             {"role": "assistant", "content": "+"}]
        # The README's input for step k: the first k + 1 turns, tokenised as apply_chat_template does.
        texts = [self.tokenizer.apply_chat_template(conversation[: 2 * k + 2], tokenize=False)
                 for k in range(len(steps))]
        per_step = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = per_step[-1]
        positions = []
        for k, prefix in enumerate(per_step):
            position = len(prefix) - 3  # the README's logits[:, -3]: the position that predicts the "+"
            if ids[: len(prefix)] != prefix or ids[position + 1] != self.plus_id:
                raise ValueError(f"the chat template does not render turns 0..{k} as a token prefix of the whole "
                                 "conversation ending in '+' and one closing token, so one pass cannot read what "
                                 "the published per-step passes read")
            positions.append(position)
        return ids, positions

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return _plus_share(self.model, h, self.candidates)

    def readable(self, ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        return next_ids == self.plus_id  # the position that predicts an assistant's "+"

    def score(self, questions: Sequence[str], steps_per_question: Sequence[Sequence[str]]) -> list[list[float]]:
        return _score(self, questions, steps_per_question)

