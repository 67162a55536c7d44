"""The sizing rule shared by the block manager, the startup check and the builder."""

from __future__ import annotations

import torch

from kvreviver_vllm.kv_cache import KVReviverSpec


def spec(budget, staging=128, floor=68, block_size=32):
    return KVReviverSpec(block_size=block_size, num_kv_heads=3, head_size=64, dtype=torch.bfloat16,
                         budget=budget, floor_tokens=floor, staging_tokens=staging)


def test_budget_is_a_fraction_or_tokens_never_below_the_floor():
    assert spec(0.1).budget_tokens(2048) == 205
    assert spec(0.1).budget_tokens(300) == 68  # floor: sink + recent
    assert spec(0.1).budget_tokens(40) == 40  # never more than the request has
    assert spec(512).budget_tokens(2048) == 512
    assert spec(16).budget_tokens(2048) == 68  # an absolute budget below the floor


def test_held_slots_cover_budget_plus_staging_in_whole_blocks():
    s = spec(0.1)
    assert s.limit_tokens(2240) == 352  # round_up(224 + 128, 32)
    assert s.held_tokens(2240) == 352 and s.held_tokens(100) == 100
    assert not s.prefix_cacheable
    # Monotone in the request's length, so a growing request never loses blocks.
    held = [s.held_tokens(n) for n in range(1, 9000, 7)]
    assert held == sorted(held)


def test_merge_keeps_the_budget_fields():
    merged = KVReviverSpec.merge([spec(0.25), spec(0.25)])
    assert isinstance(merged, KVReviverSpec)
    assert (merged.budget, merged.floor_tokens, merged.staging_tokens) == (0.25, 68, 128)
    assert merged.page_size_bytes == spec(0.25).page_size_bytes


def _simulate(s, prompt, chunk, decode_steps):
    """Occupancy of one request (exact slots only) through chunked prefill and
    decode; asserts every step fits the slots the manager backs."""
    kept, settled, done, log = 0, False, 0, []
    steps = [min(chunk, prompt - i) for i in range(0, prompt, chunk)] + [1] * decode_steps
    for i, q in enumerate(steps):
        done += q
        used = kept + q
        assert used <= s.held_tokens(done), (i, used, s.held_tokens(done))
        decoding = i >= len(steps) - decode_steps
        target = s.compaction_target(used, done, decoding, settled)
        settled = settled or decoding
        kept = used if target is None else min(used, s.budget_tokens(target))
        log.append((decoding, done, kept, target))
    return log


def test_compaction_schedule_fits_the_cap_and_settles_at_the_first_decode_step():
    s = spec(0.25, staging=512, floor=68, block_size=32)
    log = _simulate(s, prompt=2000, chunk=512, decode_steps=700)
    prefill = [entry for entry in log if not entry[0]]
    # Prompt chunks keep what the next chunk's cap leaves room for: more than
    # the budget of the length so far.
    assert all(kept >= s.budget_tokens(done) for _, done, kept, _ in prefill)
    assert prefill[0][2] == s.budget_tokens(512 + 512)
    # The first decode step cuts to the budget ...
    _, done, kept, target = log[len(prefill)]
    assert target == done and kept == s.budget_tokens(done)
    # ... and later ones hold at most the budget at the last compaction plus
    # the tokens generated since, compacting when the staging room is full.
    last_budget, since = kept, 0
    for _, done, kept, target in log[len(prefill) + 1 :]:
        since += 1
        if target is not None:
            assert kept == s.budget_tokens(done)
            last_budget, since = kept, 0
        else:
            assert kept == last_budget + since
    assert any(t is not None for *_, t in log[len(prefill) + 1 :])


def test_a_short_prompt_is_never_compacted():
    s = spec(0.25, staging=512, floor=68)
    assert all(t is None for *_, t in _simulate(s, prompt=60, chunk=512, decode_steps=5))
