"""Compiled CPU ops against the PyTorch reference, over the shapes the backend sees."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvreviver_vllm import layout, ops
from kvreviver_vllm.ops import reference
from kvreviver_vllm.stores import QuantizedStore
from test_reference_ops import build_cache, request_meta

pytestmark = pytest.mark.skipif(
    ops.implementation() != ops.COMPILED, reason="kvreviver_vllm._C is not built"
)


def test_backend_ops_use_the_compiled_kernels():
    assert ops.implementation() == ops.COMPILED
    assert torch.ops.kvreviver.paged_attention.default is not None


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    gqa=st.sampled_from([1, 3, 8]),
    num_kv_heads=st.sampled_from([1, 3]),
    head_size=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_paged_attention_matches_reference(data, gqa, num_kv_heads, head_size, block_size, dtype):
    num_reqs = data.draw(st.integers(1, 5))
    seq_lens = data.draw(st.lists(st.integers(1, 400), min_size=num_reqs, max_size=num_reqs))
    q_lens = [data.draw(st.integers(1, min(n, 20))) for n in seq_lens]
    score_window = data.draw(st.sampled_from([0, 1, 4, 32]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    cache, table, _, _ = build_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen)
    query = torch.randn(sum(q_lens), gqa * num_kv_heads, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    want, got = torch.empty_like(query), torch.empty_like(query)
    ref_cache = cache.clone()
    scale = head_size**-0.5
    reference.paged_attention(want, query, ref_cache, table, lens, qsl, scale, score_window)
    torch.ops.kvreviver.paged_attention(got, query, cache, table, lens, qsl, scale, score_window)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for r, n in enumerate(seq_lens):
        _, want_scores = request_meta(ref_cache, table[r], n)
        _, got_scores = request_meta(cache, table[r], n)
        torch.testing.assert_close(got_scores, want_scores, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("seq_len", [1, 8192])
def test_paged_attention_long_and_single_token_context(seq_len):
    gen = torch.Generator().manual_seed(7)
    cache, table, _, _ = build_cache([seq_len, 5], 3, 64, 128, torch.bfloat16, gen)
    query = torch.randn(2, 9, 64, generator=gen).to(torch.bfloat16)
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32)
    lens = torch.tensor([seq_len, 5], dtype=torch.int32)
    want, got = torch.empty_like(query), torch.empty_like(query)
    reference.paged_attention(want, query, cache, table, lens, qsl, 0.125, 0)
    torch.ops.kvreviver.paged_attention(got, query, cache, table, lens, qsl, 0.125, 0)
    torch.testing.assert_close(got, want, atol=1.6e-2, rtol=1.6e-2)
    for r, n in enumerate([seq_len, 5]):
        assert not request_meta(cache, table[r], n)[1].any()  # scores untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    key = torch.randn(50, 3, 64, generator=gen).to(dtype)
    value = torch.randn(50, 3, 64, generator=gen).to(dtype)
    slots = torch.randperm(4 * 32, generator=gen)[:50]
    slots[::7] = -1  # padding
    positions = torch.randint(0, 8192, (50,), generator=gen)
    want = torch.zeros(4, 3, 32, layout.slot_width(64, dtype), dtype=dtype)
    got = torch.zeros_like(want)
    reference.write_kv(want, key, value, slots, positions)
    torch.ops.kvreviver.write_kv(got, key, value, slots, positions)
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))


def test_write_kv_rejects_out_of_range_slot():
    cache = torch.zeros(2, 1, 16, layout.slot_width(4, torch.float32))
    one = torch.ones(1, 1, 4)
    with pytest.raises(RuntimeError, match=r"slot 32 is out of range \[0, 32\)"):
        torch.ops.kvreviver.write_kv(cache, one, one, torch.tensor([32]), torch.tensor([0]))


@settings(max_examples=50, deadline=None)
@given(
    data=st.data(),
    bits=st.sampled_from([2, 3, 4, 8]),
    value_bits=st.sampled_from([0, 2, 3, 4]),
    gqa=st.sampled_from([1, 3, 8]),
    num_kv_heads=st.sampled_from([1, 3]),
    head_size=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_paged_attention_quantized_matches_reference(
    data, bits, value_bits, gqa, num_kv_heads, head_size, block_size, dtype
):
    num_reqs = data.draw(st.integers(1, 4))
    vague = data.draw(st.lists(st.integers(0, 300), min_size=num_reqs, max_size=num_reqs))
    exact = data.draw(st.lists(st.integers(1, 200), min_size=num_reqs, max_size=num_reqs))
    q_lens = [data.draw(st.integers(1, min(n, 20))) for n in exact]
    score_window = data.draw(st.sampled_from([0, 1, 4, 32]))
    group = data.draw(st.sampled_from([0, 64, head_size]))  # 0: layout.record_group
    check_quantized_attention(vague, exact, q_lens, bits, gqa, num_kv_heads, head_size,
                              block_size, dtype, score_window,
                              seed=data.draw(st.integers(0, 2**31 - 1)), value_bits=value_bits,
                              group=group)


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("num_kv_heads", [1, 3])
def test_quantized_decode_split_across_threads_matches_reference(threads, num_kv_heads):
    """Batch-1 decode with fewer KV heads than twice the threads splits each head's
    keys into parts merged afterwards: outputs and scores still match."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        check_quantized_attention([700], [90], [1], 4, 3, num_kv_heads, 64, 16,
                                  torch.bfloat16, score_window=32, seed=threads)
        check_quantized_attention([301, 0], [200, 150], [1, 3], 3, 3, num_kv_heads, 64, 32,
                                  torch.float32, score_window=4, seed=threads)
        check_quantized_attention([500], [40], [1], 4, 3, num_kv_heads, 64, 16,
                                  torch.bfloat16, score_window=32, seed=threads, value_bits=2)
    finally:
        torch.set_num_threads(before)


def check_quantized_attention(vague, exact, q_lens, bits, gqa, num_kv_heads, head_size,
                              block_size, dtype, score_window, seed, value_bits=0, group=0):
    """The compiled quantized attention against the reference: outputs, exact-slot
    scores and record scores, for requests with ``vague`` records, ``exact`` slots
    and ``q_lens`` new tokens (values at ``value_bits``, 0: ``bits``; channel
    groups of ``group``, 0: the default)."""
    gen = torch.Generator().manual_seed(seed)
    slot_bytes = layout.slot_width(head_size, dtype) * torch.finfo(dtype).bits // 8
    store = QuantizedStore(head_size, bits, slot_bytes, value_bits, group=group)
    pages = [store.slots_for(n) for n in vague]
    cache, table, _, _ = build_cache(
        [p + e for p, e in zip(pages, exact)], num_kv_heads, head_size, block_size, dtype, gen
    )
    for r, n in enumerate(vague):
        if n:
            records = [
                store.encode(torch.randn(n, head_size, generator=gen),
                             torch.randn(n, head_size, generator=gen),
                             torch.arange(n), torch.rand(n, generator=gen))
                for _ in range(num_kv_heads)
            ]
            layout.write_store_pages(cache, table[r], torch.stack([store.to_pages(x) for x in records]))
    query = torch.randn(sum(q_lens), gqa * num_kv_heads, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    starts = torch.tensor(pages, dtype=torch.int32)
    lens = starts + torch.tensor(exact, dtype=torch.int32)
    num_vague = torch.tensor(vague, dtype=torch.int32)
    scale = head_size**-0.5
    want, got = torch.empty_like(query), torch.empty_like(query)
    ref_cache = cache.clone()
    args = (table, starts, lens, num_vague, qsl, scale, score_window, bits, store.group,
            value_bits)
    reference.paged_attention_quantized(want, query, ref_cache, *args)
    torch.ops.kvreviver.paged_attention_quantized(got, query, cache, *args)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)
    for r, (p, e, n) in enumerate(zip(pages, exact, vague)):
        _, want_scores = request_meta(ref_cache, table[r], p + e)
        _, got_scores = request_meta(cache, table[r], p + e)
        torch.testing.assert_close(got_scores[:, p:], want_scores[:, p:], atol=1e-4, rtol=1e-4)
        if n:
            def record_scores(c):
                return torch.stack([store.decode(store.from_pages(x, n))[3]
                                    for x in layout.store_pages(c, table[r], p)])
            torch.testing.assert_close(record_scores(cache), record_scores(ref_cache), atol=1e-4, rtol=1e-4)


def test_quantized_attention_rejects_an_overfull_store():
    store = QuantizedStore(64, 4, layout.slot_width(64, torch.float32) * 4)
    cache = torch.zeros(2, 1, 16, layout.slot_width(64, torch.float32))
    query = torch.zeros(1, 1, 64)
    with pytest.raises(RuntimeError, match=r"request 0: 100 vague tokens do not fit in its 2 store slots"):
        torch.ops.kvreviver.paged_attention_quantized(
            torch.empty_like(query), query, cache, torch.tensor([[0, 1]], dtype=torch.int32),
            torch.tensor([2]), torch.tensor([3]), torch.tensor([100]), torch.tensor([0, 1]),
            0.125, 1, 4, store.group,
        )


# -- vague-store ops -------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(
    n=st.sampled_from([0, 1, 7, 300]),
    head_size=st.sampled_from([64, 128]),
    bits=st.sampled_from([2, 3, 4, 8]),
    value_bits=st.sampled_from([0, 2, 3, 4, 8]),
    group=st.sampled_from([16, 32, 64]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quantize_records_match_reference(n, head_size, bits, value_bits, group, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    keys = (torch.randn(n, head_size, generator=gen) * 3).to(dtype)
    values = torch.randn(n, head_size, generator=gen).to(dtype)
    keys[:, :group] = 0.5  # a constant group: scale 0, every code 0
    positions = torch.randint(0, 8192, (n,), generator=gen)
    scores = torch.rand(n, generator=gen)
    got = torch.ops.kvreviver.quantize_records(keys, values, positions, scores, bits, group,
                                               value_bits)
    want = reference.quantize_records(keys, values, positions, scores, bits, group, value_bits)
    assert torch.equal(got, want)  # bit-identical codes, scales and metadata
    assert got.shape[1] == layout.record_bytes(head_size, bits, group, value_bits)
    k, v = torch.ops.kvreviver.dequantize_records(got, head_size, bits, group, value_bits)
    want_k, want_v = reference.dequantize_records(want, head_size, bits, group, value_bits)
    torch.testing.assert_close(k, want_k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v, want_v, atol=1e-5, rtol=1e-5)


def test_store_ops_reject_bad_layouts():
    keys = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="bits=5 is not supported: allowed values are 2, 3, 4, 8"):
        torch.ops.kvreviver.quantize_records(keys, keys, torch.arange(4), torch.zeros(4), 5, 32)
    with pytest.raises(RuntimeError, match="group=48 must divide the head size 64"):
        torch.ops.kvreviver.quantize_records(keys, keys, torch.arange(4), torch.zeros(4), 4, 48)
    with pytest.raises(RuntimeError, match=r"records must be uint8 \[N, 88\]"):
        torch.ops.kvreviver.dequantize_records(torch.zeros(4, 80, dtype=torch.uint8), 64, 4, 32)
    with pytest.raises(RuntimeError, match=r"value_bits=5 is not supported: allowed values are 0 \(bits\), 2, 3, 4, 8"):
        torch.ops.kvreviver.quantize_records(keys, keys, torch.arange(4), torch.zeros(4), 4, 32, 5)
    with pytest.raises(RuntimeError, match=r"records must be uint8 \[N, 72\] for head size 64, bits=4, group=32, value_bits=2"):
        torch.ops.kvreviver.dequantize_records(torch.zeros(4, 88, dtype=torch.uint8), 64, 4, 32, 2)
    sums = torch.zeros(2, 8, 64)
    with pytest.raises(RuntimeError, match=r"positions must lie in \[0, 2\*\*31 - 1\)"):
        torch.ops.kvreviver.count_sketch_estimate(sums, torch.tensor([-1]), torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"coefficients must be a contiguous int64 \[rows=2, 4\]"):
        torch.ops.kvreviver.count_sketch_estimate(sums, torch.tensor([1]), torch.ones(3, 4, dtype=torch.long))


@settings(max_examples=40, deadline=None)
@given(
    n=st.sampled_from([0, 1, 50, 2000]),
    rows=st.sampled_from([1, 3]),
    buckets=st.sampled_from([8, 64]),
    head_size=st.sampled_from([64, 128]),
    seed=st.integers(0, 2**31 - 1),
)
def test_count_sketch_ops_match_reference(n, rows, buckets, head_size, seed):
    gen = torch.Generator().manual_seed(seed)
    coefficients = torch.randint(1, reference.SKETCH_PRIME, (rows, 4), generator=gen)
    positions = torch.randperm(8200, generator=gen)[:n].to(torch.int32)
    keys = torch.randn(n, head_size, generator=gen)
    values = torch.randn(n, head_size, generator=gen)
    start_k = torch.randn(rows, buckets, head_size, generator=gen)
    start_v = torch.randn(rows, buckets, head_size, generator=gen)
    got_k, got_v = start_k.clone(), start_v.clone()
    want_k, want_v = start_k.clone(), start_v.clone()
    torch.ops.kvreviver.count_sketch_add(got_k, got_v, keys, values, positions, coefficients)
    reference.count_sketch_add(want_k, want_v, keys, values, positions, coefficients)
    torch.testing.assert_close(got_k, want_k, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_v, want_v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        torch.ops.kvreviver.count_sketch_estimate(want_v, positions, coefficients),
        reference.count_sketch_estimate(want_v, positions, coefficients), atol=1e-5, rtol=1e-5)
    query = torch.randn(5, head_size, generator=gen)
    torch.testing.assert_close(
        torch.ops.kvreviver.count_sketch_logits(query, want_k, positions, coefficients),
        reference.count_sketch_logits(query, want_k, positions, coefficients), atol=1e-3, rtol=1e-4)


def test_stores_use_the_compiled_store_ops(monkeypatch):
    """The stores reach the compiled ops through ``ops`` (not the reference)."""
    from kvreviver_vllm.stores import CountSketchStore

    for name in ("quantize_records", "dequantize_records", "count_sketch_add",
                 "count_sketch_estimate"):
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"reference {_n}"))
    store = QuantizedStore(64, 4, 264)
    keys = torch.randn(10, 64)
    records = store.encode(keys, keys, torch.arange(10), torch.zeros(10))
    torch.testing.assert_close(store.decode(records)[0], keys, atol=0.3, rtol=0)
    sketch_store = CountSketchStore(64, 3, 8, 264, torch.bfloat16)
    pages = sketch_store.absorb(torch.zeros(0, 264, dtype=torch.uint8), 0, keys, keys,
                                torch.arange(10), torch.zeros(10), 10, seed=1)
    assert sketch_store.revive(pages, 10, seed=1)[0].shape == (10, 64)


def _with_scores(cache, table_row, num_slots, scores):
    """Overwrite the scores of a request's first slots ``[Hkv, num_slots]``."""
    _, score = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(table_row, torch.arange(num_slots), cache.shape[2])
    score[blocks, :, offsets] = scores.T


def _tied_scores(gen, *shape):
    # Few distinct values, so pooled-score ties decide which records survive.
    return torch.randint(0, 4, shape, generator=gen).float() / 4


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    bits=st.sampled_from([2, 3, 4, 8]),
    value_bits=st.sampled_from([0, 2, 3]),
    pool=st.sampled_from([(3, 3, 1.0), (0, 0, 1.0), (1, 24, 1.0), (5, 2, 1.0), (3, 24, 0.1),
                          (3, 3, 0.0)]),
    num_kv_heads=st.sampled_from([1, 3]),
    head_size=st.sampled_from([64, 128]),
    block_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    group=st.sampled_from([0, 64]),  # 0: layout.record_group
)
def test_compact_quantized_matches_reference(data, bits, value_bits, pool, num_kv_heads,
                                             head_size, block_size, dtype, group):
    num_vague = data.draw(st.integers(0, 300))
    num_exact = data.draw(st.integers(1, 200))
    num_kept = data.draw(st.integers(0, num_exact))
    keep_vague = data.draw(st.integers(0, num_vague + num_exact - num_kept))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    slot_bytes = layout.slot_width(head_size, dtype) * torch.finfo(dtype).bits // 8
    store = QuantizedStore(head_size, bits, slot_bytes, value_bits, pool[0], pool[1], group,
                           pool[2])
    pages = store.slots_for(num_vague)
    # Positions near 8192; old records interleave with the exact tokens.
    order = torch.randperm(num_vague + num_exact, generator=gen) + 8192 - num_vague - num_exact
    vague_pos, exact_pos = order[:num_vague].sort().values, order[num_vague:].sort().values
    cache, table, _, _ = build_cache([pages + num_exact], num_kv_heads, head_size, block_size,
                                     dtype, gen)
    positions, _ = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(table[0], torch.arange(pages, pages + num_exact), block_size)
    positions[blocks, :, offsets] = exact_pos.to(torch.int32)[:, None]
    _with_scores(cache, table[0], pages + num_exact, _tied_scores(gen, num_kv_heads, pages + num_exact))
    if num_vague:
        records = [store.encode(torch.randn(num_vague, head_size, generator=gen),
                                torch.randn(num_vague, head_size, generator=gen),
                                vague_pos, _tied_scores(gen, num_vague))
                   for _ in range(num_kv_heads)]
        layout.write_store_pages(cache, table[0], torch.stack([store.to_pages(x) for x in records]))
    kept = torch.stack([torch.randperm(num_exact, generator=gen)[:num_kept].sort().values
                        for _ in range(num_kv_heads)])
    want = cache.clone()
    args = (table[0], pages, pages + num_exact, num_vague, kept, keep_vague, bits, store.group,
            value_bits, *pool)
    reference.compact_quantized(want, *args)
    torch.ops.kvreviver.compact_quantized(cache, *args)
    # Byte for byte (unused slots hold NaN, equal as bytes).
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


@settings(max_examples=30, deadline=None)
@given(
    data=st.data(),
    num_kv_heads=st.sampled_from([1, 3]),
    block_size=st.sampled_from([16, 32, 128]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_compact_slots_matches_reference(data, num_kv_heads, block_size, dtype):
    num_slots = data.draw(st.integers(1, 400))
    keep = data.draw(st.integers(0, num_slots))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    cache, table, _, _ = build_cache([num_slots], num_kv_heads, 64, block_size, dtype, gen)
    _with_scores(cache, table[0], num_slots, torch.rand(num_kv_heads, num_slots, generator=gen))
    kept = torch.stack([torch.randperm(num_slots, generator=gen)[:keep].sort().values
                        for _ in range(num_kv_heads)])
    want = cache.clone()
    reference.compact_slots(want, table[0], kept)
    torch.ops.kvreviver.compact_slots(cache, table[0], kept)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))


def test_compaction_ops_reject_bad_arguments():
    cache = torch.zeros(4, 2, 16, layout.slot_width(64, torch.float32))
    row = torch.tensor([0, 1], dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"kept_slots\[0, 1\]=40 is out of range \[0, 32\)"):
        torch.ops.kvreviver.compact_slots(cache, row, torch.tensor([[1, 40], [1, 2]]))
    with pytest.raises(RuntimeError, match=r"kept_slots\[1\] must be strictly ascending"):
        torch.ops.kvreviver.compact_slots(cache, row, torch.tensor([[1, 2], [2, 1]]))
    with pytest.raises(RuntimeError, match=r"block ids must lie in \[0, 4\), got \[0, 9\]"):
        torch.ops.kvreviver.compact_slots(cache, torch.tensor([0, 9]), torch.tensor([[0], [0]]))
    kept = torch.tensor([[0, 1], [0, 1]])
    with pytest.raises(RuntimeError, match=r"keep_vague=9 is out of range \[0, 8\]"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 12, 0, kept, 9, 4, 32, 0, 3, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"num_vague=50 records do not fit in the 2 store slots"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 12, 50, kept, 0, 4, 32, 0, 3, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"bits=5 is not supported"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 12, 0, kept, 0, 5, 32, 0, 3, 3, 1.0)
    with pytest.raises(RuntimeError, match=r"pool_before=3, pool_after=257 are out of range: "
                                           r"expected integers in \[0, 256\]"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 12, 0, kept, 0, 4, 32, 0, 3, 257, 1.0)
    with pytest.raises(RuntimeError, match=r"pool_decay=1.5 is out of range: expected a number in "
                                           r"\[0, 1\]"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 12, 0, kept, 0, 4, 32, 0, 3, 3, 1.5)
    with pytest.raises(RuntimeError, match=r"seq_len \(40\) <= the request's 32 slots"):
        torch.ops.kvreviver.compact_quantized(cache, row, 2, 40, 0, kept, 0, 4, 32, 0, 3, 3, 1.0)


def test_backend_compacts_through_the_compiled_ops(monkeypatch):
    for name in ("compact_slots", "compact_quantized", "compact_into_store"):
        monkeypatch.setattr(reference, name, lambda *a, _n=name, **k: pytest.fail(f"reference {_n}"))
    gen = torch.Generator().manual_seed(0)
    cache, table, _, _ = build_cache([40], 1, 64, 16, torch.bfloat16, gen)
    store = QuantizedStore(64, 4, layout.slot_width(64, torch.bfloat16) * 2)
    store.compact(cache, table[0], 0, 40, 0, torch.arange(10)[None], 30, 0)
    ops.compact_slots(cache, table[0], torch.arange(5)[None])
