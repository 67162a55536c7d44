"""The widened model (tests/widened_model.py) computes the default model's function,
so the parallel engine tests run real attention patterns."""

from __future__ import annotations

import torch

from widened_model import widen_kv_heads


def test_widened_model_gives_the_default_models_logits(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    wide_dir = widen_kv_heads(model_dir, tmp_path / "wide")
    default = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    wide = AutoModelForCausalLM.from_pretrained(wide_dir, dtype=torch.float32)
    assert (wide.config.num_attention_heads, wide.config.num_key_value_heads) == (18, 6)
    ids = torch.randint(100, 40000, (1, 96), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = default(ids).logits, wide(ids).logits
    # Widening changes the GEMM shapes, so float32 sums run in another order, and that
    # order differs by host (AVX2 vs AVX-512 kernels): 30 layers of it move logits
    # (std ~4, max ~34) by up to ~4e-3. A wrong KV head mapping moves them by ~40.
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
