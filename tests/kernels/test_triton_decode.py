"""The Triton flash-decoding kernel against the PyTorch reference: on a GPU, or
on the CPU under Triton's interpreter. Triton reads ``TRITON_INTERPRET`` when it
is first imported, so on the CPU this module runs in a process of its own that
sets it from the start (``test_triton_interpreter.py``); the engine tests'
vLLM processes never see it."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU: runs under the Triton interpreter in its own process "
                "(test_triton_interpreter.py)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed: no Triton decode kernel to test")

from test_reference_ops import build_cache  # noqa: E402

from kvreviver_vllm import layout  # noqa: E402
from kvreviver_vllm.ops import reference, triton_decode  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 5e-3}


def run_case(seq_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window,
             split_size, tile=None, seed=0, calls=1):
    gen = torch.Generator().manual_seed(seed)
    cache, table, _, _ = build_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen)
    num_reqs = len(seq_lens)
    query = torch.randn(num_reqs, gqa * num_kv_heads, head_size, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32)
    scale = head_size**-0.5
    want, got = torch.empty_like(query), torch.empty_like(query)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    for _ in range(calls):
        reference.paged_attention(want, query, ref_cache, table, lens, qsl, scale, score_window)
        triton_decode.paged_decode_attention(got, query, tri_cache, table, lens, scale,
                                             score_window, split_size=split_size, tile=tile)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert_only_scores_change(cache, ref_cache, tri_cache, score_window)
    return tri_cache, table


def assert_only_scores_change(cache, ref_cache, tri_cache, score_window):
    """The kernel's cache ``tri_cache`` has the reference's scores (unwritten
    slots stay NaN in both) and, byte for byte, ``cache``'s K, V and positions."""
    _, ref_scores = layout.slot_meta(ref_cache)
    _, tri_scores = layout.slot_meta(tri_cache)
    torch.testing.assert_close(tri_scores, ref_scores, atol=1e-4, rtol=1e-4, equal_nan=True)
    before = cache.contiguous().view(torch.uint8).view(*cache.shape[:3], -1)
    after = tri_cache.view(torch.uint8).view(*cache.shape[:3], -1)
    assert torch.equal(before[..., :-4], after[..., :-4])
    if score_window == 0:
        assert torch.equal(before, after)


CASES = [
    # seq_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window, split, tile
    ([1, 77, 300], 3, 1, 64, 16, torch.float32, 1, 64, 32),
    ([1, 77, 300], 3, 1, 64, 16, torch.bfloat16, 1, 64, 32),
    ([300], 1, 2, 64, 32, torch.float32, 1, 32, 16),
    ([130, 5], 1, 2, 64, 32, torch.bfloat16, 0, 32, 16),
    ([200, 33], 3, 2, 64, 32, torch.float32, 0, 16, 16),
    ([1], 3, 1, 64, 16, torch.bfloat16, 1, 16, 16),
    ([257, 100], 4, 1, 64, 16, torch.float16, 1, 64, 64),
    ([150], 8, 1, 128, 128, torch.bfloat16, 1, 32, 32),
]


@pytest.mark.parametrize(
    "seq_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window, split, tile", CASES
)
def test_decode_matches_reference(seq_lens, gqa, num_kv_heads, head_size, block_size, dtype,
                                  score_window, split, tile):
    run_case(seq_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window, split,
             tile, seed=len(seq_lens) * 1000 + sum(seq_lens))


def test_scores_accumulate_over_calls_with_default_split():
    """Two calls add up, as the reference does; default split size and tile."""
    run_case([90, 40], 3, 1, 64, 16, torch.float32, 1, None, calls=2, seed=7)


def test_strided_query_and_out():
    """Query and out as head-major views of wider buffers (as a fused QKV would give)."""
    gen = torch.Generator().manual_seed(3)
    cache, table, _, _ = build_cache([70, 20], 1, 64, 16, torch.float32, gen)
    lens = torch.tensor([70, 20], dtype=torch.int32)
    qkv = torch.randn(2, 5, 64, generator=gen)
    query = qkv[:, :3]
    want = torch.empty(2, 3, 64)
    reference.paged_attention(want, query, cache.clone(), table, lens,
                              torch.arange(3, dtype=torch.int32), 0.125, 0)
    out_buf = torch.zeros(2, 4, 64)
    triton_decode.paged_decode_attention(out_buf[:, 1:], query, cache, table, lens, 0.125, 0,
                                         split_size=32, tile=16)
    torch.testing.assert_close(out_buf[:, 1:], want, atol=2e-5, rtol=2e-5)
    assert not out_buf[:, 0].any()


def test_split_size_fills_the_gpu():
    assert triton_decode.choose_split_size(64, 8, 32768) == 512
    assert triton_decode.choose_split_size(1, 3, 2048) == 64
    split = triton_decode.choose_split_size(1, 8, 8192)
    assert 8 * (8192 // split) >= 2 * 132 and split >= 64


def test_decode_bytes():
    # 9/3/64 bf16: K + V = 256 bytes, metadata 8.
    assert triton_decode.decode_bytes(2, 3, 100, 64, torch.bfloat16) == 2 * 3 * 100 * 264
    assert triton_decode.decode_bytes(1, 8, 10, 128, torch.float32) == 8 * 10 * (1024 + 8)


# -- quantized vague store ------------------------------------------------------

def build_quantized(vague, exact, num_kv_heads, head_size, block_size, dtype, bits, value_bits,
                    gen, group=0):
    """A paged cache whose request ``r`` holds ``vague[r]`` records (random K/V,
    scores; channel groups of ``group``, 0: the default) in its first slots and
    ``exact[r]`` exact slots after them."""
    slot_bytes = layout.slot_width(head_size, dtype) * torch.finfo(dtype).bits // 8
    store = reference.QuantizedRecords(head_size, bits, slot_bytes, value_bits, group=group)
    pages = [store.slots_for(n) for n in vague]
    cache, table, _, _ = build_cache([p + e for p, e in zip(pages, exact)], num_kv_heads,
                                     head_size, block_size, dtype, gen)
    for r, n in enumerate(vague):
        if n:
            records = [store.encode(torch.randn(n, head_size, generator=gen),
                                    torch.randn(n, head_size, generator=gen),
                                    torch.arange(n), torch.rand(n, generator=gen))
                       for _ in range(num_kv_heads)]
            pages_r = torch.stack([store.to_pages(x) for x in records])
            layout.write_store_pages(cache, table[r], pages_r)
    return cache, table, store, torch.tensor(pages, dtype=torch.int32)


def split_scores(cache, table, store, pages, vague, exact):
    """(record scores, exact-slot scores) per request, and the cache's bytes with
    both zeroed."""
    cache = cache.clone()
    found = []
    for r, (p, nv, ne) in enumerate(zip(pages.tolist(), vague, exact)):
        page_bytes = layout.store_pages(cache, table[r], p)
        rec = [store.meta(store.from_pages(page_bytes[h], nv))[1] for h in range(cache.shape[1])]
        rec_scores = torch.stack(rec) if nv else torch.zeros(cache.shape[1], 0)
        exact_scores = layout.request_scores(cache, table[r], p + ne)[:, p:]
        found.append((rec_scores.clone(), exact_scores.clone()))
        if nv:
            zeroed = [store.to_pages(store.with_scores(store.from_pages(page_bytes[h], nv),
                                                       torch.zeros(nv)))
                      for h in range(cache.shape[1])]
            layout.write_store_pages(cache, table[r], torch.stack(zeroed))
        layout.reset_scores(cache, table[r], p, p + ne)
    return found, cache.view(torch.uint8)


QUANT_CASES = [
    # vague, exact, gqa, num_kv_heads, block_size, dtype, bits, value_bits, score_window, split
    ([40, 0, 100], [20, 33, 5], 3, 1, 16, torch.float32, 4, 4, 1, 32),
    ([40, 70], [20, 1], 3, 1, 16, torch.bfloat16, 4, 4, 1, 32),
    ([50], [30], 1, 2, 32, torch.float32, 3, 3, 1, 16),
    ([50], [30], 3, 1, 32, torch.bfloat16, 2, 2, 0, 32),
    ([33], [10], 4, 1, 16, torch.float32, 8, 8, 1, 16),
    ([45], [12], 3, 1, 16, torch.float32, 4, 2, 1, 16),
    ([45, 20], [12, 40], 3, 1, 16, torch.bfloat16, 3, 2, 1, 16),
]


@pytest.mark.parametrize(
    "vague, exact, gqa, num_kv_heads, block_size, dtype, bits, value_bits, score_window, split",
    QUANT_CASES,
)
def test_decode_quantized_matches_reference(vague, exact, gqa, num_kv_heads, block_size, dtype,
                                            bits, value_bits, score_window, split, head_size=64,
                                            group=0):
    gen = torch.Generator().manual_seed(sum(vague) + bits)
    cache, table, store, pages = build_quantized(vague, exact, num_kv_heads, head_size,
                                                 block_size, dtype, bits, value_bits, gen, group)
    num_reqs = len(vague)
    query = torch.randn(num_reqs, gqa * num_kv_heads, head_size, generator=gen).to(dtype)
    seq_lens = pages + torch.tensor(exact, dtype=torch.int32)
    nv = torch.tensor(vague, dtype=torch.int32)
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32)
    scale = head_size**-0.5
    want, got = torch.empty_like(query), torch.empty_like(query)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    reference.paged_attention_quantized(want, query, ref_cache, table, pages, seq_lens, nv, qsl,
                                        scale, score_window, bits, store.group, value_bits)
    triton_decode.paged_decode_attention_quantized(got, query, tri_cache, table, pages, seq_lens,
                                                   nv, scale, score_window, bits, store.group,
                                                   value_bits, split_size=split, tile=16)
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    want_scores, want_bytes = split_scores(ref_cache, table, store, pages, vague, exact)
    got_scores, got_bytes = split_scores(tri_cache, table, store, pages, vague, exact)
    for (wr, we), (gr, ge) in zip(want_scores, got_scores):
        torch.testing.assert_close(gr, wr, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ge, we, atol=1e-4, rtol=1e-4)
    assert torch.equal(got_bytes, want_bytes)  # all else byte for byte
    if score_window == 0:
        assert torch.equal(tri_cache.view(torch.uint8), cache.view(torch.uint8))


@pytest.mark.parametrize("head_size", [32, 128])
def test_decode_quantized_3bit_codes_of_other_head_sizes(head_size):
    """3-bit codes are read as whole words, 3 per 32 codes, at every head size."""
    test_decode_quantized_matches_reference([37, 9], [11, 30], 2, 2, 16, torch.float32, 3, 2,
                                            1, 16, head_size=head_size)


def test_decode_quantized_one_group_per_head():
    """``record_group`` = the head size: one scale and min per key and per value."""
    test_decode_quantized_matches_reference([41, 7], [13, 30], 3, 1, 16, torch.bfloat16, 3, 2,
                                            1, 16, group=64)
