"""The sizing rule shared by the block manager, the startup check and the builder,
and the builder's per-request plan, built without an engine."""

from __future__ import annotations

import functools

import pytest
import torch

from kvreviver_vllm import policy
from kvreviver_vllm.schedule import (
    Cut,
    KVReviverSpec,
    RequestState,
    is_decode_step,
    map_slots,
    plan_request,
    skip_gaps,
)
from kvreviver_vllm.stores import QuantizedStore


def spec(budget, room=32, floor=68, block_size=32):
    return KVReviverSpec(block_size=block_size, num_kv_heads=3, head_size=64, dtype=torch.bfloat16,
                         budget=budget, floor_tokens=floor, decode_room=room)


def test_budget_is_a_fraction_or_tokens_never_below_the_floor():
    assert spec(0.1).budget_tokens(2048) == 205
    assert spec(0.1).budget_tokens(300) == 68  # floor: sink + recent
    assert spec(0.1).budget_tokens(40) == 40  # never more than the request has
    assert spec(512).budget_tokens(2048) == 512
    assert spec(16).budget_tokens(2048) == 68  # an absolute budget below the floor


def test_a_decoding_request_holds_its_budget_plus_room_in_whole_blocks():
    s = spec(0.1)
    assert s.decode_limit(2240) == 256  # round_up(224 + 32, 32)
    assert s.decode_slots(2240) == 256 and s.decode_slots(100) == 100
    assert not s.prefix_cacheable
    # Monotone in the request's length, so a growing request never loses blocks.
    held = [s.decode_slots(n) for n in range(1, 9000, 7)]
    assert held == sorted(held)
    # Uncompressed (budget 1.0): the whole request, nothing more.
    assert spec(1.0).decode_slots(2240) == 2240


def test_the_cut_frees_the_prompt_blocks_past_the_decode_limit():
    s = spec(0.1)
    cut = s.cut(2047)  # first decode step: token 2048, blocks 0..63 held
    assert (cut.kept, cut.prompt_blocks, cut.gap) == (8, 64, 56)  # 205 + 32 -> 256 slots
    assert s.num_entries(2000, None) == 63  # reading the prompt: every block
    assert s.num_entries(2048, 2047) == 64  # the first decode step: still every block
    # Growth after the cut goes past the gap: live blocks + the gap.
    assert s.num_entries(2400, 2047) == 64 + s.decode_limit(2400) // 32 - 8
    assert s.num_entries(2400, 2047) - cut.gap == s.decode_slots(2400) // 32
    # No gap when the budget keeps the whole prompt.
    assert spec(1.0).cut(2047).gap == 0 and spec(0.1).cut(100).gap == 0


def test_merge_keeps_the_budget_fields():
    merged = KVReviverSpec.merge([spec(0.25), spec(0.25)])
    assert isinstance(merged, KVReviverSpec)
    assert (merged.budget, merged.floor_tokens, merged.decode_room) == (0.25, 68, 32)
    assert merged.page_size_bytes == spec(0.25).page_size_bytes


def _split(store=None, protected=68):
    return functools.partial(policy.split_budget, protected=protected, store=store)


def _run(s, prompt, chunk, decode_steps, store=None, protected=68):
    """Plans of one request through chunked prefill and decode, as the builder
    makes them; plan_request itself refuses a step that overfills the slots the
    manager backs."""
    state, done, plans = None, 0, []
    steps = [min(chunk, prompt - i) for i in range(0, prompt, chunk)] + [1] * decode_steps
    for q in steps:
        prompt_done = done >= prompt
        done += q
        plan = plan_request(s, state, q, done, prompt_done, store, _split(store, protected))
        state = plan.after
        plans.append((done, plan))
    return plans


def test_the_prompt_stays_whole_and_the_first_decode_step_cuts_it_to_budget():
    s = spec(0.25, floor=68, block_size=32)
    plans = _run(s, prompt=2000, chunk=512, decode_steps=700)
    prefill = [(done, p) for done, p in plans if not p.decoding]
    assert len(prefill) == 4
    # Prompt chunks never compact; each resets the scores of the older slots so
    # that the prompt's last chunk (its question) alone ranks the prompt.
    assert all(p.compaction is None and p.after.exact == done for done, p in prefill)
    assert [p.rescore for _, p in prefill] == [None, (0, 512), (0, 1024), (0, 1536)]
    # The first decode step cuts to the budget and records the gap ...
    done, first = plans[len(prefill)]
    assert first.compaction == (s.budget_tokens(done), 0) and first.gap is None
    assert first.after.cut == s.cut(done - 1)
    # ... which every later step's block table skips; those steps hold at most
    # the budget at the last compaction plus the tokens generated since,
    # compacting when the decode room is full.
    last, since, compactions = first.after.exact, 0, 0
    for done, p in plans[len(prefill) + 1 :]:
        assert p.gap == first.after.cut and p.rescore is None
        since += 1
        if p.compaction is not None:
            assert p.compaction == (s.budget_tokens(done), 0) and since >= s.decode_room
            last, since, compactions = p.after.exact, 0, compactions + 1
        else:
            assert p.after.exact == last + since
    assert compactions >= 5


def test_with_a_store_the_budget_holds_exact_slots_and_records():
    store = QuantizedStore(64, 4, 264)  # bf16 slots of head size 64: 3 records a slot
    s = spec(0.25, floor=36, block_size=16)
    plans = _run(s, prompt=1000, chunk=512, decode_steps=100, store=store, protected=36)
    done, first = next((done, p) for done, p in plans if p.decoding)
    exact, vague = first.compaction
    budget = s.budget_tokens(done)
    # 3 records a slot cannot hold all 1001 tokens in 251 slots: sink + recent
    # stay exact and the rest of the budget is records.
    assert (exact, vague) == (36, store.capacity(budget - 36))
    assert exact + store.slots_for(vague) <= budget
    # The next step reads the store's pages before its exact slots.
    _, second = plans[plans.index((done, first)) + 1]
    assert (second.exact_start, second.vague) == (store.slots_for(vague), vague)
    assert second.write_start == second.exact_start + exact


def test_a_short_prompt_is_never_compacted():
    s = spec(0.25, floor=68)
    assert all(p.compaction is None for _, p in _run(s, prompt=60, chunk=512, decode_steps=5))


def test_a_preempted_request_restarts_from_an_empty_cache():
    s = spec(0.25, floor=68)
    settled = RequestState(vague=0, exact=600, cut=s.cut(2047))
    # Recomputed from scratch: all its tokens are new this step.
    plan = plan_request(s, settled, 512, 512, False, None, _split())
    assert (plan.exact_start, plan.write_start, plan.gap) == (0, 0, None)
    assert plan.after == RequestState(0, 512, None)


def test_a_step_that_overfills_the_backed_slots_is_refused():
    s = spec(0.1, floor=68)
    cut = s.cut(2047)
    too_many = RequestState(vague=0, exact=s.decode_slots(2100), cut=cut)
    with pytest.raises(RuntimeError, match="needs 257 slots but holds 256"):
        plan_request(s, too_many, 1, 2100, True, None, _split())


def test_decode_step_rule():
    assert is_decode_step(1, prompt_done=True)
    assert not is_decode_step(1, prompt_done=False)  # a one-token prompt chunk
    assert not is_decode_step(2, prompt_done=True)  # a replayed chunk after preemption


def test_skip_gaps_and_map_slots():
    table = torch.arange(10, dtype=torch.int32).view(2, 5) + 100
    gapped = skip_gaps(table, {1: Cut(kept=1, prompt_blocks=3)})
    assert gapped[1, :3].tolist() == [105, 108, 109] and gapped[0].equal(table[0])
    assert skip_gaps(table, {}) is table
    # Request 0 writes 2 tokens from slot 3, request 1 one token from slot 17
    # (block 2 of its row after the gap: 109); one padding slot.
    qsl = torch.tensor([0, 2, 3], dtype=torch.int32)
    slots = map_slots(gapped, qsl, [3, 17], block_size=8, num_slots=4)
    assert slots.tolist() == [100 * 8 + 3, 100 * 8 + 4, 109 * 8 + 1, -1]
