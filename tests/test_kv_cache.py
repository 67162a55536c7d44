"""The sizing rule shared by the block manager, the startup check and the builder."""

from __future__ import annotations

import torch

from kvreviver_vllm.kv_cache import KVReviverSpec


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


def _simulate(s, prompt, chunk, decode_steps):
    """Occupancy of one request (exact slots only) through chunked prefill and
    decode; asserts every step fits the slots the manager backs."""
    kept, settled, done, log = 0, False, 0, []
    steps = [min(chunk, prompt - i) for i in range(0, prompt, chunk)] + [1] * decode_steps
    for i, q in enumerate(steps):
        done += q
        used = kept + q
        assert used <= (s.decode_slots(done) if settled else done), (i, used)
        decoding = i >= len(steps) - decode_steps
        target = s.compaction_target(used, done, decoding, settled)
        settled = settled or decoding
        kept = used if target is None else min(used, s.budget_tokens(target))
        log.append((decoding, done, kept, target))
    return log


def test_the_prompt_stays_whole_and_the_first_decode_step_cuts_it_to_budget():
    s = spec(0.25, floor=68, block_size=32)
    log = _simulate(s, prompt=2000, chunk=512, decode_steps=700)
    prefill = [entry for entry in log if not entry[0]]
    # Prompt chunks never compact: the question at the end has not scored them.
    assert all(kept == done and target is None for _, done, kept, target in prefill)
    # The first decode step cuts to the budget ...
    _, done, kept, target = log[len(prefill)]
    assert target == done and kept == s.budget_tokens(done)
    # ... and later ones hold at most the budget at the last compaction plus
    # the tokens generated since, compacting when the decode room is full.
    last_budget, since, compactions = kept, 0, 0
    for _, done, kept, target in log[len(prefill) + 1 :]:
        since += 1
        if target is not None:
            assert kept == s.budget_tokens(done) and since >= s.decode_room
            last_budget, since, compactions = kept, 0, compactions + 1
        else:
            assert kept == last_budget + since
    assert compactions >= 5


def test_a_short_prompt_is_never_compacted():
    s = spec(0.25, floor=68)
    assert all(t is None for *_, t in _simulate(s, prompt=60, chunk=512, decode_steps=5))
