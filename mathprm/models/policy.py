"""Policy models built from scratch: Llama-architecture configs sized for a CPU.

The arithmetic world's policy is a real Hugging Face `LlamaForCausalLM`, so every later
stage (vLLM generation, PRM backbone, PPO) treats it exactly as it would treat a
downloaded checkpoint. Presets name sizes; `tiny` trains from scratch on a CPU within the
SFT time budget and `small` is the ">= 4x larger" model for the "small model + PRM beats a
bigger model" test.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 512


MODEL_PRESETS: dict[str, ModelPreset] = {
    # Head size 32 everywhere: vLLM's CPU attention rejects head sizes below 32.
    "test": ModelPreset(hidden_size=32, num_layers=2, num_heads=1, intermediate_size=64),  # for unit tests
    "tiny": ModelPreset(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384),  # 0.87M params
    "small": ModelPreset(hidden_size=256, num_layers=5, num_heads=8, intermediate_size=768),  # 4.3M params (4.9x)
}


def build_policy(preset: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised Llama causal LM of size `preset` for `tokenizer`'s vocabulary."""
    import torch

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(MODEL_PRESETS)}")
    p = MODEL_PRESETS[preset]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads,
        num_key_value_heads=p.num_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=p.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)
