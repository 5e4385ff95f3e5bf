"""The CPU grouped-query attention (`mathprm.models.attention`): taken where it applies, the same
numbers as transformers' own `sdpa`, and out of the way everywhere else."""

from __future__ import annotations

import contextlib

import pytest
import torch

from mathprm.models.attention import install


@contextlib.contextmanager
def transformers_sdpa():
    """transformers' own `sdpa` for the block, ours again after it."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import AttentionInterface

    ours = AttentionInterface._global_mapping["sdpa"]
    AttentionInterface.register("sdpa", sdpa_attention_forward)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", ours)


@pytest.fixture(scope="module")
def gqa_policy(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from tests.tiny_models import build_qwen_policy

    path = build_qwen_policy(tmp_path_factory.mktemp("gqa") / "policy", num_heads=8)  # 8 query heads, 2 key-value heads
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert model.config.num_attention_heads // model.config.num_key_value_heads == 4
    return model


def _batch():
    """A left-padded batch of two prompts, then one decoding step on the cache."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 700, (2, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0
    return ids, mask


def _run(model):
    ids, mask = _batch()
    out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    step = out.logits[:, -1].argmax(-1, keepdim=True)
    mask2 = torch.cat([mask, mask.new_ones(2, 1)], dim=1)
    nxt = model(input_ids=step, attention_mask=mask2, past_key_values=out.past_key_values, use_cache=True)
    return out.logits, nxt.logits


def test_installed_on_load_and_taken_for_masked_gqa_inference(gqa_policy, monkeypatch):
    from transformers.modeling_utils import AttentionInterface

    from mathprm.models import loading

    with loading("any"):
        pass
    assert getattr(AttentionInterface._global_mapping["sdpa"], "mathprm", False)
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(k.get("enable_gqa", False)) or real(*a, **k))
    with torch.inference_mode():
        _run(gqa_policy)
    assert calls and all(calls), calls  # every layer, prefill and decoding step, without copying keys
    calls.clear()
    ids, mask = _batch()
    gqa_policy(input_ids=ids, attention_mask=mask).logits.sum().backward()  # training: transformers' path
    gqa_policy.zero_grad()
    assert calls and not any(calls), calls


def test_the_same_logits_as_transformers_sdpa(gqa_policy):
    install()
    with torch.inference_mode():
        ours = _run(gqa_policy)
        with transformers_sdpa():
            theirs = _run(gqa_policy)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b), (a - b).abs().max()  # torch computes the same sums either way
