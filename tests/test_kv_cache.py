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
