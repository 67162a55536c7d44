"""The quantized vague store: records, pages, budget split, revival inside
attention and compaction into the store (PyTorch reference path)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvreviver_vllm import layout, policy
from kvreviver_vllm.ops import reference
from kvreviver_vllm.stores import CountSketchStore, MixedQuantizedStore, QuantizedStore
from test_reference_ops import build_cache, request_meta

SLOT_BYTES = layout.slot_width(64, torch.bfloat16) * 2  # 264


def reference_quantize(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-token asymmetric min/max quantization, float16 scale and min, dequantized."""
    g = x.float().view(x.shape[0], -1, group)
    lo = g.amin(2, keepdim=True).half().float()
    scale = ((g.amax(2, keepdim=True) - lo) / (2**bits - 1)).half().float()
    codes = ((g - lo) / scale.clamp(min=1e-8)).round().clamp(0, 2**bits - 1)
    return (codes * scale + lo).view_as(x)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), value_bits=st.sampled_from([0, 2, 3, 4, 8]),
       head_size=st.sampled_from([64, 128]), n=st.integers(1, 40), seed=st.integers(0, 2**31 - 1))
def test_records_round_trip(bits, value_bits, head_size, n, seed):
    gen = torch.Generator().manual_seed(seed)
    store = QuantizedStore(head_size, bits, layout.slot_width(head_size, torch.bfloat16) * 2,
                           value_bits)
    # Codes of both widths, fp16 scale and min per 32 channels of K and of V, position, score.
    assert store.record_bytes == head_size * (bits + (value_bits or bits)) // 8 + head_size // 4 + 8
    keys = torch.randn(n, head_size, generator=gen)
    values = 3 * torch.randn(n, head_size, generator=gen)
    positions, scores = torch.randint(0, 8192, (n,), generator=gen), torch.rand(n, generator=gen)
    records = store.encode(keys, values, positions, scores)
    assert records.shape == (n, store.record_bytes)
    k, v, p, s = store.decode(records)
    torch.testing.assert_close(k, reference_quantize(keys, bits, 32), atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(v, reference_quantize(values, value_bits or bits, 32),
                               atol=1e-3, rtol=1e-3)
    assert torch.equal(p, positions.int()) and torch.equal(s, scores)
    pages = store.to_pages(records)
    assert pages.shape == (math.ceil(n * store.record_bytes / store.slot_bytes), store.slot_bytes)
    assert torch.equal(store.from_pages(pages, n), records)


def test_record_sizes_count_every_byte():
    # D=64: K and V codes, fp16 scale+min per 32-channel group, position, score.
    assert QuantizedStore(64, 4, SLOT_BYTES).record_bytes == 32 + 32 + 16 + 8
    # Records straddle slots: 264-byte bf16 slots hold 4.7, 3.7, 3 and 1.7 tokens.
    assert [QuantizedStore(64, b, SLOT_BYTES).capacity(10) for b in (2, 3, 4, 8)] == [47, 36, 30, 17]


def test_split_budget():
    store = QuantizedStore(64, 4, SLOT_BYTES)  # 3 tokens a slot
    # Everything fits: nothing changes.
    assert policy.split_budget(100, 80, 10, 68, store) == (80, 10)
    # Nothing evicted: as many exact tokens as the store leaves room for.
    exact, vague = policy.split_budget(1024, 2048, 0, 68, store)
    assert exact + vague == 2048
    assert exact + math.ceil(vague / 3) <= 1024 < exact + 1 + math.ceil((vague - 1) / 3)
    # Store full: sink + recent stay exact, the store is filled, the rest evicted.
    assert policy.split_budget(205, 2048, 0, 68, store) == (68, 411)
    # Old vague tokens count too.
    assert policy.split_budget(205, 100, 500, 68, store) == (68, 411)
    # Without candidates only sink + recent stay exact, even when more would fit.
    assert policy.split_budget(1024, 2048, 0, 68, store, candidates=False) == (68, 1980)
    assert policy.split_budget(205, 2048, 0, 68, store, candidates=False) == (68, 411)
    # candidate_share: where not everything fits, that share of the slots past sink +
    # recent stays exact (137 * 0.25 = 34), the store fills the other 103 slots.
    assert policy.split_budget(205, 2048, 0, 68, store, candidate_share=0.25) == (102, 309)
    assert policy.split_budget(205, 2048, 0, 68, store, candidate_share=1.0) == (205, 0)
    assert policy.split_budget(205, 80, 500, 68, store, candidate_share=0.5) == (80, 375)  # only 80 exact
    # ... and changes nothing where every token fits.
    assert policy.split_budget(1024, 2048, 0, 68, store, candidate_share=0.25) == \
        policy.split_budget(1024, 2048, 0, 68, store)
    # No store (evict, streaming): the budget is all exact.
    assert policy.split_budget(205, 2048, 0, 68, None) == (205, 0)
    # A sketch costs its buckets first, then 66 positions a slot.
    sketch_store = CountSketchStore(64, 3, 16, SLOT_BYTES, torch.bfloat16)
    assert policy.split_budget(100, 300, 0, 68, sketch_store) == (68, 0)  # no room for 48 buckets
    exact, vague = policy.split_budget(512, 2048, 0, 68, sketch_store)
    assert exact + vague == 2048 and exact + 48 + math.ceil(vague / 66) <= 512


def _layout_request(store, gen, num_vague, num_exact, num_kv_heads=3, head_size=64):
    """One request laid out as [vague pages | exact slots] in a shuffled bf16 cache.
    Returns the cache, its block row and the dequantized vague K/V per head."""
    pages = store.slots_for(num_vague)
    cache, table, keys, values = build_cache(
        [pages + num_exact], num_kv_heads, head_size, 16, torch.bfloat16, gen
    )
    vk = torch.randn(num_kv_heads, num_vague, head_size, generator=gen)
    vv = torch.randn(num_kv_heads, num_vague, head_size, generator=gen)
    records = torch.stack([
        store.encode(vk[h], vv[h], torch.arange(num_vague), torch.zeros(num_vague))
        for h in range(num_kv_heads)
    ])
    layout.write_store_pages(cache, table[0], torch.stack([store.to_pages(r) for r in records]))
    revived = [store.decode(r) for r in records]
    vague_k = torch.stack([r[0] for r in revived])
    vague_v = torch.stack([r[1] for r in revived])
    return cache, table, keys[0][pages:], values[0][pages:], vague_k, vague_v, pages


def test_revival_is_one_softmax_over_vague_and_exact_tokens():
    gen = torch.Generator().manual_seed(0)
    store = QuantizedStore(64, 4, SLOT_BYTES)
    num_vague, num_exact, num_queries = 50, 40, 3
    cache, table, ek, ev, vk, vv, pages = _layout_request(store, gen, num_vague, num_exact)
    query = torch.randn(num_queries, 9, 64, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(query)
    reference.revived_attention(
        out, query, cache, table, torch.tensor([pages]), torch.tensor([pages + num_exact]),
        torch.tensor([num_vague]), torch.tensor([0, num_queries]), 0.125, num_queries, store, 0,
    )
    # Reference: float64 over [vague (all visible) | exact (causal)] per query head.
    keys = torch.cat([vk, ek.transpose(0, 1).float()], 1).double()
    values = torch.cat([vv, ev.transpose(0, 1).float()], 1).double()
    received = torch.zeros(3, num_vague + num_exact, dtype=torch.float64)
    for i in range(num_queries):
        visible = num_vague + num_exact - num_queries + i + 1
        for h in range(9):
            probs = torch.softmax(keys[h // 3, :visible] @ query[i, h].double() * 0.125, 0)
            want = probs @ values[h // 3, :visible]
            torch.testing.assert_close(out[i, h].double(), want, atol=2e-2, rtol=2e-2)
            received[h // 3, :visible] += probs
    # Scores: exact slots and vague records both gained the attention they got.
    _, exact_scores = request_meta(cache, table[0], pages + num_exact)
    torch.testing.assert_close(exact_scores[:, pages:].double(), received[:, num_vague:], atol=1e-4, rtol=1e-4)
    pages_now = layout.store_pages(cache, table[0], pages)
    vague_scores = torch.stack([store.decode(store.from_pages(p, num_vague))[3] for p in pages_now])
    torch.testing.assert_close(vague_scores.double(), received[:, :num_vague], atol=1e-4, rtol=1e-4)


def test_compaction_demotes_exactly_the_dropped_tokens():
    gen = torch.Generator().manual_seed(1)
    store = QuantizedStore(64, 4, SLOT_BYTES)
    num_vague, num_exact = 6, 30
    cache, table, ek, ev, _, _, pages = _layout_request(store, gen, num_vague, num_exact)
    # Exact tokens sit at positions 100.. so they sort after the old vague ones.
    positions, scores = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(table[0], torch.arange(pages, pages + num_exact), 16)
    positions[blocks, :, offsets] = (100 + torch.arange(num_exact, dtype=torch.int32))[:, None]
    scores[blocks, :, offsets] = torch.rand(num_exact, 3, generator=gen)
    kept = torch.stack([torch.sort(torch.randperm(num_exact, generator=gen)[:10]).values for _ in range(3)])
    # Keep every record (6 old + 20 demoted): a pure demotion, no eviction.
    reference.compact_into_store(cache, table[0], pages, pages + num_exact, num_vague, kept, 26, store, 0)

    new_pages = store.slots_for(26)
    records = [store.from_pages(p, 26) for p in layout.store_pages(cache, table[0], new_pages)]
    exact_now = layout.slot_range(cache, table[0], new_pages, new_pages + 10)
    for h in range(3):
        demoted = torch.ones(num_exact, dtype=torch.bool)
        demoted[kept[h]] = False
        k, v, pos, sc = store.decode(records[h])
        assert pos.tolist() == list(range(num_vague)) + (100 + torch.nonzero(demoted)[:, 0]).tolist()
        want_k = reference_quantize(ek[demoted, h].float(), 4, 32)
        torch.testing.assert_close(k[num_vague:], want_k, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(v[num_vague:], reference_quantize(ev[demoted, h].float(), 4, 32),
                                   atol=1e-3, rtol=1e-3)
        assert not sc.any()  # scores restart after a compaction
        assert torch.equal(exact_now[h, :, :64], ek[kept[h], h])
        assert torch.equal(exact_now[h, :, 64:128], ev[kept[h], h])


def test_compaction_evicts_the_lowest_scored_records():
    gen = torch.Generator().manual_seed(2)
    store = QuantizedStore(64, 4, SLOT_BYTES)
    cache, table, _, _, _, _, pages = _layout_request(store, gen, 9, 12, num_kv_heads=1)
    positions, scores = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(table[0], torch.arange(pages, pages + 12), 16)
    positions[blocks, :, offsets] = (100 + torch.arange(12, dtype=torch.int32))[:, None]
    scores[blocks, :, offsets] = torch.arange(12, dtype=torch.float32)[:, None] + 1  # > old records' 0
    kept = torch.arange(8, 12)[None]  # keep the last 4 exact
    # 9 old records (score 0) + 8 demoted (scores 1..8); room for 10: the 8 demoted
    # and 2 of the old survive.
    reference.compact_into_store(cache, table[0], pages, pages + 12, 9, kept, 10, store, 0)
    page = layout.store_pages(cache, table[0], store.slots_for(10))[0]
    _, _, pos, _ = store.decode(store.from_pages(page, 10))
    assert sorted(pos.tolist())[2:] == list(range(100, 108))  # all demoted tokens
    assert sum(p < 9 for p in pos.tolist()) == 2  # and the best 2 of the old records


def test_quantized_store_keeps_a_needles_neighbours_together():
    """Records are ranked by scores max-pooled over neighbours (as exact slots
    are): the tokens next to the most-attended one survive with it."""
    store = QuantizedStore(64, 4, SLOT_BYTES)
    empty = torch.zeros(0, SLOT_BYTES, dtype=torch.uint8)
    keys = torch.randn(40, 64)
    scores = torch.full((40,), 0.01)
    scores[20] = 1.0  # one needle token drew the attention
    scores[[2, 30, 37]] = 0.5  # isolated distractors, each above the needle's neighbours
    pages = store.absorb(empty, 0, keys, keys, torch.arange(40), scores, 7, seed=0)
    _, _, pos, _ = store.decode(store.from_pages(pages, 7))
    assert pos.tolist() == list(range(17, 24))
    # Nothing in, nothing kept.
    none = store.absorb(empty, 0, keys[:0], keys[:0], torch.arange(0), scores[:0], 0, seed=0)
    assert none.shape[0] == 0
    # pool_after: the needle lends its score to the tokens after it, the rest of
    # a value that a copy reads next (here 1 before, 5 after).
    ahead = QuantizedStore(64, 4, SLOT_BYTES, pool_before=1, pool_after=5)
    pages = ahead.absorb(empty, 0, keys, keys, torch.arange(40), scores, 7, seed=0)
    _, _, pos, _ = ahead.decode(ahead.from_pages(pages, 7))
    assert pos.tolist() == list(range(19, 26))


def test_pooled_scores_reach_before_and_after_each_token():
    scores = torch.tensor([[0.0, 0, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 2]])
    # SnapKV's kernel of 7: three on either side.
    assert policy.pooled_scores(scores, *policy.SNAPKV_POOL)[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 1, 0, 0]
    out = policy.pooled_scores(scores, before=1, after=4)
    assert out[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert out[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 2, 2]
    assert policy.pooled_scores(scores, 0, 0).equal(scores)
    kept = policy.select_kept(scores[:1], 5, sink=1, recent=1, by_score=True, pool=(0, 2, 1.0))
    assert kept[0].tolist() == [0, 4, 5, 6, 9]
    # decay: neighbours get that share of the score, a token keeps its own.
    lent = policy.pooled_scores(scores + 0.25 * (torch.arange(10) == 2), 1, 2, decay=0.5)
    assert lent[0].tolist() == [0, 0.125, 0.25, 0.5, 1, 0.5, 0.5, 0, 0, 0]
    assert policy.pooled_scores(scores, 3, 3, decay=0.0).equal(scores)


def test_count_sketch_sums_signed_tokens_and_revives_by_mean():
    gen = torch.Generator().manual_seed(3)
    slot_bytes = layout.slot_width(64, torch.float32) * 4  # float32 sums, exact to compare
    store = CountSketchStore(64, 3, 8, slot_bytes, torch.float32)
    empty = torch.zeros(0, slot_bytes, dtype=torch.uint8)
    keys, values = torch.randn(20, 64, generator=gen), torch.randn(20, 64, generator=gen)
    positions = torch.randperm(1000, generator=gen)[:20]
    pages = store.absorb(empty, 0, keys, values, positions, torch.zeros(20), 20, seed=11)
    assert pages.shape == (24 + 1, slot_bytes)  # 24 buckets + one slot of positions
    idx, sign = store.hashes(positions, 11)
    assert set(sign.unique().tolist()) <= {-1.0, 1.0} and int(idx.max()) < 8
    bucket_k, bucket_v = store.bucket_sums(pages)
    for r in range(3):
        for b in range(8):
            members = idx[r] == b
            want = (sign[r, members, None] * keys[members]).sum(0)
            torch.testing.assert_close(bucket_k[r, b], want, atol=1e-5, rtol=1e-5)
    revived_k, revived_v = store.revive(pages, 20, seed=11)
    order = positions.argsort()  # the store keeps positions sorted
    rows = torch.arange(3)[:, None]
    want_v = (sign[:, order, None] * bucket_v[rows, idx[:, order]]).mean(0)
    torch.testing.assert_close(revived_v, want_v)
    # Bucket-space logits equal logits against the revived keys.
    q = torch.randn(5, 64, generator=gen)
    logits = store.bucket_logits(q, bucket_k, positions[order], seed=11)
    torch.testing.assert_close(logits, q @ revived_k.T, atol=1e-4, rtol=1e-4)
    # A token alone in all its buckets is revived exactly.
    lone = store.absorb(empty, 0, keys[:1], values[:1], positions[:1], torch.zeros(1), 1, seed=11)
    torch.testing.assert_close(store.revive(lone, 1, seed=11)[0], keys[:1])


def test_count_sketch_adds_to_a_bf16_store():
    """A second compaction adds to the sums read back from bf16 pages."""
    store = CountSketchStore(64, 3, 8, SLOT_BYTES, torch.bfloat16)
    empty = torch.zeros(0, SLOT_BYTES, dtype=torch.uint8)
    keys = torch.randn(40, 64)
    first = store.absorb(empty, 0, keys[:20], keys[:20], torch.arange(20), torch.zeros(20), 20, seed=5)
    both = store.absorb(first, 20, keys[20:], keys[20:], torch.arange(20, 40), torch.zeros(20), 40, seed=5)
    at_once = store.absorb(empty, 0, keys, keys, torch.arange(40), torch.zeros(40), 40, seed=5)
    torch.testing.assert_close(store.bucket_sums(both)[0], store.bucket_sums(at_once)[0],
                               atol=0.1, rtol=0.02)  # bf16 sums rounded once more


def test_count_sketch_keeps_the_newest_positions_when_full():
    store = CountSketchStore(64, 2, 4, SLOT_BYTES, torch.bfloat16)
    keys = torch.randn(100, 64)
    pages = store.absorb(torch.zeros(0, SLOT_BYTES, dtype=torch.uint8), 0, keys, keys,
                         torch.arange(100), torch.zeros(100), 70, seed=0)
    assert store.positions_of(pages, 70).tolist() == list(range(30, 100))


def test_mixed_store_keeps_the_best_ranked_records_at_the_high_width():
    """``low_bits``: the best-ranked ``high_share`` of the kept records at ``bits``,
    the rest at ``low_bits``; revival and attention scores follow page order."""
    store = MixedQuantizedStore(64, 4, 2, 0.25, SLOT_BYTES)
    assert store.slots_for(0) == 0
    for slots in (0, 1, 5, 40):  # capacity is the most tokens slots_for admits
        n = store.capacity(slots)
        assert store.slots_for(n) <= slots < store.slots_for(n + 1)
    gen = torch.Generator().manual_seed(3)
    keys, values = torch.randn(2, 40, 64, generator=gen)
    scores = torch.rand(40, generator=gen)
    empty = torch.zeros(0, SLOT_BYTES, dtype=torch.uint8)
    pages = store.absorb(empty, 0, keys, values, torch.arange(40), scores, 12, seed=0)
    assert pages.shape[0] == store.slots_for(12)
    pooled = policy.pooled_scores(scores[None], store.pool_before, store.pool_after)[0]
    best = pooled.sort(descending=True, stable=True).indices[:12]
    high, low = best[:3].sort().values, best[3:].sort().values
    rk, rv = store.revive(pages, 12, seed=0)
    want_k = torch.cat([reference_quantize(keys[high], 4, 32), reference_quantize(keys[low], 2, 32)])
    want_v = torch.cat([reference_quantize(values[high], 4, 32), reference_quantize(values[low], 2, 32)])
    torch.testing.assert_close(rk, want_k, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(rv, want_v, atol=1e-3, rtol=1e-3)
    # Attention received lands on the record it was given to, in page order.
    received = torch.arange(12, dtype=torch.float32)
    pages = store.add_attention(pages, 12, received)
    hi_part, lo_part = store._parts(pages, 12)
    assert store.high.meta(hi_part)[1].tolist() == received[:3].tolist()
    assert store.low.meta(lo_part)[1].tolist() == received[3:].tolist()
    # A second compaction ranks old records (by their new scores) with the new
    # tokens, by position-pooled score, and the two best of its 8 are high-width.
    more_k = torch.randn(4, 64, generator=gen)
    old_pos = torch.cat([high, low])
    pages = store.absorb(pages, 12, more_k, more_k, torch.arange(40, 44), torch.zeros(4), 8, seed=0)
    all_pos = torch.cat([old_pos, torch.arange(40, 44)])
    all_scores = torch.cat([received, torch.zeros(4)])
    order = all_pos.argsort()
    ranked = policy.pooled_scores(all_scores[order][None], store.pool_before, store.pool_after)[0].sort(descending=True, stable=True).indices
    hi_part, lo_part = store._parts(pages, 8)
    assert store.high.meta(hi_part)[0].tolist() == all_pos[order][ranked[:2]].sort().values.tolist()
    assert store.low.meta(lo_part)[0].tolist() == all_pos[order][ranked[2:8]].sort().values.tolist()
