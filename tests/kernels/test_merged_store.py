"""The summary store (``merge_share``, ``stores/merged.py``): where it must drop
tokens, some records stand for runs of dropped tokens and weigh as many of them
in attention."""

from __future__ import annotations

import torch

from kvreviver_vllm import layout
from kvreviver_vllm.config import KVReviverConfig, KVReviverConfigError
from kvreviver_vllm.ops import reference
from kvreviver_vllm.stores import MergedQuantizedStore, QuantizedStore, make_store
from test_reference_ops import build_cache

SLOT_BYTES = layout.slot_width(64, torch.bfloat16) * 2  # 264
EMPTY = torch.zeros(0, SLOT_BYTES, dtype=torch.uint8)


def _tokens(gen, num_distinct: int, num_alike: int):
    """``num_distinct`` random tokens with scores 1..n (the best), then
    ``num_alike`` copies of one token with score 0, interleaved by position."""
    n = num_distinct + num_alike
    keys = torch.randn(1, 64, generator=gen).expand(n, 64).clone()
    values = torch.randn(1, 64, generator=gen).expand(n, 64).clone()
    distinct = torch.randperm(n, generator=gen)[:num_distinct].sort().values
    keys[distinct] = torch.randn(num_distinct, 64, generator=gen)
    values[distinct] = torch.randn(num_distinct, 64, generator=gen)
    scores = torch.zeros(n)
    scores[distinct] = torch.arange(1, num_distinct + 1, dtype=torch.float32)
    return keys, values, scores, distinct


def test_records_carry_a_token_count_inside_the_budget():
    store = MergedQuantizedStore(64, 4, 0.25, SLOT_BYTES)
    assert store.record_bytes == QuantizedStore(64, 4, SLOT_BYTES).record_bytes + 4
    for slots in (0, 1, 5, 40):
        n = store.capacity(slots)
        assert store.slots_for(n) <= slots < store.slots_for(n + 1)
    assert [store.num_summaries(k) for k in (0, 1, 4, 12)] == [0, 1, 1, 3]


def test_summaries_of_alike_tokens_attend_as_the_tokens_themselves():
    """6 distinct best-scored tokens stay plain; 34 copies of one token become
    6 summaries, each adding log(its count) to its logit: attention through the
    reference op equals attention over the plain records and the 34 copies."""
    gen = torch.Generator().manual_seed(0)
    store = MergedQuantizedStore(64, 4, 0.5, SLOT_BYTES, pool_before=0, pool_after=0)
    keys, values, scores, distinct = _tokens(gen, 6, 34)
    pages = store.absorb(EMPTY, 0, keys, values, torch.arange(40), scores, 12, seed=0)
    assert pages.shape[0] == store.slots_for(12)
    records, counts = store._records(pages, 12)
    positions, rec_scores = store.base.meta(records)
    assert counts.sum() == 40 and (counts > 1).sum() == 6 and torch.all(rec_scores == 0)
    assert torch.equal(positions, positions.sort().values)
    assert set(positions[counts == 1].tolist()) == set(distinct.tolist())

    # Through the reference attention: [store | 5 exact slots], one query row.
    num_pages, num_exact = pages.shape[0], 5
    cache, table, ek, ev = build_cache([num_pages + num_exact], 1, 64, 16, torch.bfloat16, gen)
    layout.write_store_pages(cache, table[0], pages[None])
    query = torch.randn(1, 3, 64, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(query)
    reference.revived_attention(
        out, query, cache, table, torch.tensor([num_pages]), torch.tensor([num_pages + num_exact]),
        torch.tensor([12]), torch.tensor([0, 1]), 0.125, 1, store, 0)
    # Float64 over every token as a plain record would hold it, and the exact slots.
    plain = QuantizedStore(64, 4, SLOT_BYTES)
    qk, qv, _, _ = plain.decode(plain.encode(keys, values, torch.arange(40), scores))
    all_k = torch.cat([qk, ek[0][num_pages:, 0].float()]).double()
    all_v = torch.cat([qv, ev[0][num_pages:, 0].float()]).double()
    for h in range(3):
        probs = torch.softmax(all_k @ query[0, h].double() * 0.125, 0)
        torch.testing.assert_close(out[0, h].double(), probs @ all_v, atol=2e-2, rtol=2e-2)


def test_a_second_compaction_merges_again_and_keeps_every_token_counted():
    gen = torch.Generator().manual_seed(1)
    store = MergedQuantizedStore(64, 4, 0.25, SLOT_BYTES)
    keys, values, scores, _ = _tokens(gen, 10, 30)
    pages = store.absorb(EMPTY, 0, keys, values, torch.arange(40), scores, 16, seed=0)
    # The summaries drew attention per token below the new tokens': merged again.
    pages = store.add_attention(pages, 16, torch.full((16,), 0.01))
    more = torch.randn(2, 20, 64, generator=gen)
    pages = store.absorb(pages, 16, more[0], more[1], torch.arange(40, 60), torch.ones(20), 16,
                         seed=0)
    records, counts = store._records(pages, 16)
    assert counts.sum() == 60 and (counts > 1).sum() <= store.num_summaries(16)
    positions = store.base.meta(records)[0]
    assert torch.equal(positions, positions.sort().values)
    # Where every token fits, nothing is merged.
    pages = store.absorb(EMPTY, 0, keys[:10], values[:10], torch.arange(10), scores[:10], 16, seed=0)
    assert store._records(pages, 10)[1].tolist() == [1.0] * 10


def test_every_head_keeps_exactly_its_budget_of_records():
    """However the dropped tokens' counts fall (old summaries of many tokens beside
    single ones), a compaction keeps exactly its budget of records, and every
    token absorbed stays counted."""
    gen = torch.Generator().manual_seed(2)
    store = MergedQuantizedStore(64, 4, 0.5, SLOT_BYTES, pool_before=0, pool_after=0)
    for trial in range(20):
        n, keep = int(torch.randint(2, 60, (1,), generator=gen)), int(torch.randint(0, 20, (1,), generator=gen))
        keys = torch.randn(n, 64, generator=gen)
        pages = store.absorb(EMPTY, 0, keys, keys, torch.arange(n), torch.rand(n, generator=gen), keep, 0)
        assert pages.shape[0] == store.slots_for(min(n, keep))
        # A second round: each old record's score per token decides, counts stay whole.
        held = min(n, keep)
        pages = store.add_attention(pages, held, torch.rand(held, generator=gen) * 5)
        more = torch.randn(7, 64, generator=gen)
        pages = store.absorb(pages, held, more, more, torch.arange(n, n + 7), torch.rand(7, generator=gen),
                             keep, 0)
        records, counts = store._records(pages, min(held + 7, keep))
        assert pages.shape[0] == store.slots_for(min(held + 7, keep))
        if keep:  # nothing is lost: every token absorbed is counted in some record
            assert counts.sum() == n + 7 and counts.min() >= 1


def test_config_builds_the_store_and_refuses_it_with_mixed_widths():
    store = make_store(KVReviverConfig(merge_share=0.25, value_bits=2), 64, SLOT_BYTES,
                       torch.bfloat16)
    assert isinstance(store, MergedQuantizedStore) and store.base.value_bits == 2
    try:
        KVReviverConfig(merge_share=0.25, low_bits=2)
    except KVReviverConfigError as e:
        assert "merge_share=0.25 cannot be combined with low_bits=2" in str(e)
    else:
        raise AssertionError("merge_share with low_bits was accepted")
