"""The PyTorch reference ops against a naive per-token implementation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvreviver_vllm import layout
from kvreviver_vllm.ops import reference


def naive_attention(query, keys, values, scale, seq_len, num_queries, score_window=None):
    """float64, one query row and one head at a time. Returns the output and the
    attention each key received from the last ``score_window`` query rows (all
    by default), summed over those rows and the GQA group."""
    window = num_queries if score_window is None else score_window
    hq, hkv = query.shape[1], keys.shape[1]
    out = torch.zeros(query.shape, dtype=torch.float64)
    received = torch.zeros(hkv, seq_len, dtype=torch.float64)
    for i in range(num_queries):
        visible = seq_len - num_queries + i + 1
        for h in range(hq):
            kvh = h // (hq // hkv)
            k = keys[:visible, kvh].double()
            v = values[:visible, kvh].double()
            probs = torch.softmax((k @ query[i, h].double()) * scale, 0)
            out[i, h] = probs @ v
            if i >= num_queries - window:
                received[kvh, :visible] += probs
    return out, received


def build_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen):
    """A shuffled paged cache holding random K/V for each request, via write_kv."""
    blocks_per_req = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_req) + 3
    perm = torch.randperm(num_blocks, generator=gen)
    width = layout.slot_width(head_size, dtype)
    cache = torch.full((num_blocks, num_kv_heads, block_size, width), float("nan"), dtype=dtype)
    table = torch.zeros(len(seq_lens), max(blocks_per_req), dtype=torch.int32)
    keys, values, used = [], [], 0
    for r, n in enumerate(seq_lens):
        row = perm[used : used + blocks_per_req[r]]
        used += blocks_per_req[r]
        table[r, : len(row)] = row
        k = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_size, generator=gen).to(dtype)
        pos = torch.arange(n)
        slots = row[pos // block_size].long() * block_size + pos % block_size
        reference.write_kv(cache, k, v, slots, pos)
        keys.append(k)
        values.append(v)
    return cache, table, keys, values


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    gqa=st.sampled_from([1, 3, 8]),
    num_kv_heads=st.sampled_from([1, 2]),
    head_size=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_paged_attention_matches_naive(data, gqa, num_kv_heads, head_size, block_size, dtype):
    num_reqs = data.draw(st.integers(1, 4))
    seq_lens = data.draw(st.lists(st.integers(1, 300), min_size=num_reqs, max_size=num_reqs))
    q_lens = [data.draw(st.integers(1, n)) for n in seq_lens]
    score_window = data.draw(st.sampled_from([0, 1, 4, 32]))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    cache, table, keys, values = build_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen)
    hq = gqa * num_kv_heads
    query = torch.randn(sum(q_lens), hq, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    out = torch.empty_like(query)
    scale = head_size**-0.5
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    reference.paged_attention(out, query, cache, table, lens, qsl, scale, score_window)
    reference.paged_attention(out, query, cache, table, lens, qsl, scale, score_window)  # scores add up
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r, (n, q) in enumerate(zip(seq_lens, q_lens)):
        rows = slice(int(qsl[r]), int(qsl[r + 1]))
        want, received = naive_attention(query[rows], keys[r], values[r], scale, n, q, score_window)
        torch.testing.assert_close(out[rows].double(), want, atol=tol, rtol=tol)
        positions, scores = request_meta(cache, table[r], n)
        assert positions.tolist() == [list(range(n))] * num_kv_heads
        torch.testing.assert_close(scores.double(), 2 * received, atol=1e-4, rtol=1e-4)


def request_meta(cache, block_row, num_tokens):
    """(positions, scores) ``[Hkv, num_tokens]`` of a request's first slots."""
    positions, scores = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(block_row, torch.arange(num_tokens), cache.shape[2])
    return positions[blocks, :, offsets].T, scores[blocks, :, offsets].T


def test_slot_layout_holds_kv_position_and_score():
    assert layout.slot_width(64, torch.bfloat16) == 132
    assert layout.slot_width(64, torch.float32) == 130
    cache = torch.zeros(2, 1, 16, layout.slot_width(4, torch.float32))
    key = torch.ones(3, 1, 4)
    value = 2 * torch.ones(3, 1, 4)
    reference.write_kv(cache, key, value, torch.tensor([0, -1, 17]), torch.tensor([5, 6, 8190]))
    assert cache[0, 0, 0, :8].tolist() == [1] * 4 + [2] * 4
    assert cache[1, 0, 1, :8].tolist() == [1] * 4 + [2] * 4
    positions, scores = layout.slot_meta(cache)
    assert positions[0, 0, 0] == 5 and positions[1, 0, 1] == 8190
    assert int((cache[..., :8] != 0).sum()) == 16 and not scores.any()


@pytest.mark.parametrize("seq_len", [1, 8191, 8192])
def test_gather_kv_near_max_positions(seq_len):
    gen = torch.Generator().manual_seed(seq_len)
    cache, table, keys, values = build_cache([seq_len], 2, 64, 128, torch.float32, gen)
    positions, _ = request_meta(cache, table[0], seq_len)
    assert positions[:, -1].tolist() == [seq_len - 1] * 2
    k, v = layout.gather_kv(cache, table[0], seq_len)
    torch.testing.assert_close(k, keys[0].transpose(0, 1))
    torch.testing.assert_close(v, values[0].transpose(0, 1))
