"""The head rotation (kvreviver_vllm/rotation.py): orthogonal, fixed, attention
unchanged by it, and the store's quantization finer under it where keys carry
outlier channels."""

from __future__ import annotations

import math

import pytest
import torch

from kvreviver_vllm.backend import KVReviverBackend
from kvreviver_vllm.config import KVReviverConfig
from kvreviver_vllm.ops.reference import dequantize_groups, quantize_groups
from kvreviver_vllm.rotation import rotate, rotation_matrix

HEAD_SIZES = KVReviverBackend.get_supported_head_sizes()


@pytest.mark.parametrize("d", HEAD_SIZES)
def test_rotation_is_orthogonal_and_fixed(d):
    r = rotation_matrix(d)
    assert r.shape == (d, d) and r.dtype == torch.float32
    torch.testing.assert_close(r @ r.T, torch.eye(d), atol=2e-6, rtol=0)
    assert torch.equal(r, rotation_matrix(d))  # a cache is readable only with its own rotation
    if d & (d - 1) == 0:  # Hadamard: every channel spread evenly over all of them
        assert torch.equal(r.abs(), torch.full((d, d), 1 / math.sqrt(d)))


def test_attention_is_unchanged_by_the_rotation():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 64, generator=gen, dtype=torch.float64) for n in (3, 50, 50))
    r = rotation_matrix(64).double()

    def attend(q, k, v):
        return torch.softmax(q @ k.T / 8, dim=-1) @ v

    torch.testing.assert_close(attend(q @ r, k @ r, v @ r) @ r.T, attend(q, k, v))


def test_rotate_keeps_shape_and_dtype():
    x = torch.randn(5, 3, 64, dtype=torch.bfloat16)
    y = rotate(x, rotation_matrix(64))
    assert y.shape == x.shape and y.dtype == torch.bfloat16
    torch.testing.assert_close(rotate(y, rotation_matrix(64).T), x, atol=0.05, rtol=0.02)
    flat = x.view(5, 3 * 64)  # heads flattened, as vLLM may pass them
    assert torch.equal(rotate(flat, rotation_matrix(64)), y.view(5, 3 * 64))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rotation_makes_outlier_keys_quantize_finer(bits):
    """Keys shaped like a RoPE model's: most channel pairs small, two pairs large,
    each pair rotating with the position. Per-token 32-channel groups (the
    store's) quantize the rotated keys with about half the error (measured
    on the attention logits; 1.7-1.9x here)."""
    gen = torch.Generator().manual_seed(1)
    n, d = 512, 64
    magnitude = torch.ones(d // 2)
    magnitude[[5, 29]] = 12.0  # outlier pairs
    angle = torch.arange(n)[:, None] * (1e-4 ** (torch.arange(d // 2) / (d // 2)))
    radius = magnitude * (1 + 0.3 * torch.randn(n, d // 2, generator=gen).abs())
    keys = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)], 1)
    query = torch.randn(16, d, generator=gen)
    r = rotation_matrix(d)

    def logit_error(k, q):
        codes, scale, lo = quantize_groups(k, bits, 32)
        return ((dequantize_groups(codes, scale, lo) - k) @ q.T).pow(2).mean().sqrt()

    plain, rotated = logit_error(keys, query), logit_error(keys @ r, query @ r)
    assert rotated < plain / 1.5, (plain, rotated)


def test_config_rotates_only_where_the_quantized_store_holds_records():
    assert not KVReviverConfig().rotate  # the default
    on = dict(rotate=True, budget=0.25)
    assert KVReviverConfig(**on).rotates(8192)
    assert not KVReviverConfig(**on, variant="evict").rotates(8192)
    assert not KVReviverConfig(**on, variant="sketch").rotates(8192)
    assert not KVReviverConfig(rotate=True).rotates(8192)  # budget 1.0: nothing compressed
    assert KVReviverConfig.from_sources({}, {"KVREVIVER_ROTATE": "true"}).rotate
