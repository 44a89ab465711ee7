"""lmtune_sdpa: transformers' sdpa, except short 16-bit sequences on the CPU, which attend in fp32."""

from __future__ import annotations

import torch
from conftest import build_model
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lmtune import attention
from lmtune.models import load_weights


def _qkv(length: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, heads, length, 16, generator=g).to(dtype) for heads in (4, 2, 2)]


def test_short_bf16_attends_in_fp32_exactly_as_fp32_sdpa():
    module = build_model("llama").model.layers[0].self_attn
    q, k, v = _qkv(12, torch.bfloat16)
    ours, _ = attention.attention_forward(module, q, k, v, None, scaling=0.25)
    oracle, _ = sdpa_attention_forward(module, q.float(), k.float(), v.float(), None, scaling=0.25)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, oracle.to(torch.bfloat16))


def test_long_bf16_and_fp32_are_transformers_sdpa_unchanged():
    module = build_model("llama").model.layers[0].self_attn
    for length, dtype in ((attention.FP32_UP_TO + 1, torch.bfloat16), (12, torch.float32)):
        q, k, v = _qkv(length, dtype)
        ours, _ = attention.attention_forward(module, q, k, v, None, scaling=0.25)
        theirs, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
        assert torch.equal(ours, theirs)


def test_loaded_models_use_it_give_sdpas_logits_and_do_not_save_its_name(model_dir, tmp_path):
    model = load_weights(model_dir)
    assert model.config._attn_implementation == attention.NAME
    plain = build_model("llama")  # the same weights (seed 0) on transformers' own sdpa
    assert plain.config._attn_implementation == "sdpa"
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask path
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   plain(input_ids=ids, attention_mask=mask).logits, atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
