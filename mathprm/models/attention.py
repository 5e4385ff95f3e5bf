"""Grouped-query attention without copying keys and values, for inference on CPU.

transformers' `sdpa` attention gives torch's `scaled_dot_product_attention` the keys and values
of a grouped-query model (Qwen2, Llama 3: fewer key-value heads than query heads) as is
(`enable_gqa=True`) only when there is no attention mask; with one (every padded batch, every
decoding step of a batch of samples) it first copies them once per query head of a group
(`repeat_kv`). At search lengths that copy is most of a decoding step on CPU: 16 rows over a
1.5k-token prefix copy ~0.6 GB per step for a 6-layer model with 4 query heads per key-value
head, where the attention itself reads a quarter of it. torch's CPU kernels take the mask and
`enable_gqa` together and return the same numbers as with the copies.

`install()` registers `sdpa` (transformers' `AttentionInterface`, process-wide) as a function
that, for grouped-query layers on CPU under no gradient with a mask and no dropout, calls
`scaled_dot_product_attention(..., enable_gqa=True)`, and hands every other call (GPUs, where
the copy is cheap and a mask with `enable_gqa` may leave the fused kernels; training; no mask;
paged caches; position biases) to transformers' own function unchanged. `mathprm.models.loading`
installs it before any model loads.
"""

from __future__ import annotations

import functools
from typing import Any


def _eligible(module: Any, key: Any, attention_mask: Any, kwargs: dict[str, Any]) -> bool:
    import torch

    return (getattr(module, "num_key_value_groups", 1) > 1 and key.device.type == "cpu" and attention_mask is not None
            and not torch.is_grad_enabled() and not kwargs.get("dropout") and kwargs.get("cache") is None
            and kwargs.get("position_bias") is None and not kwargs.get("output_attentions"))


@functools.cache
def install() -> None:
    """Register the CPU grouped-query `sdpa` (module docstring); once per process."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    def sdpa(module, query, key, value, attention_mask, **kwargs):
        if not _eligible(module, key, attention_mask, kwargs):
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, scale=kwargs.get("scaling"),
            is_causal=False, enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None

    sdpa.mathprm = True  # tests tell the installed function from transformers' own
    AttentionInterface.register("sdpa", sdpa)
