"""Byte layout of the paged KV cache and of the quantized store's records.

Paged cache (one layer): ``kv_cache[num_blocks, num_kv_heads, block_size, W]``.
A request's physical slot ``s`` is offset ``s % block_size`` of block
``block_table[req, s // block_size]``. Each slot holds, per KV head,

    [ key (D elements) | value (D elements) | position (int32) | score (float32) ]

so ``W = 2 * D + META_BYTES / itemsize``. The position is the token's logical
(RoPE) position; the score is the attention mass the token received since the
request's last compaction (summed over the query heads of its GQA group).

A request's slots are laid out as

    [0, exact_start)          vague-store pages (raw bytes, the store's format)
    [exact_start, seq_len)    exact slots in position order, this step's last

A quantized-store record is one token, the same trailing metadata as a slot:

    [ K codes | V codes | K scale, K min, V scale, V min (float16 per group) | position | score ]

These helpers are plain PyTorch and work on any device; the kernels in ``csrc/``
read the same bytes.
"""

from __future__ import annotations

import torch

META_BYTES = 8  # int32 position + float32 score, at the end of every slot and record


# -- slots -------------------------------------------------------------------

def slot_width(head_size: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` per (slot, KV head): K, V and the metadata."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * head_size + META_BYTES // itemsize


def head_size_of(kv_cache: torch.Tensor) -> int:
    return (kv_cache.shape[-1] - META_BYTES // kv_cache.element_size()) // 2


def slot_meta(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views ``(positions int32, scores float32)`` shaped ``kv_cache.shape[:-1]``."""
    meta = kv_cache[..., 2 * head_size_of(kv_cache) :].view(torch.int32)
    return meta[..., 0], meta[..., 1].view(torch.float32)


def physical_slots(block_row: torch.Tensor, slots: torch.Tensor, block_size: int):
    """(block ids, offsets) of a request's physical slot indices."""
    return block_row[slots // block_size].long(), slots % block_size


def physical_span(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int):
    """(block ids, offsets) of a request's physical slots ``[start, end)``."""
    slots = torch.arange(start, end, device=kv_cache.device)
    return physical_slots(block_row, slots, kv_cache.shape[2])


def slot_range(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Whole slots ``[Hkv, end - start, W]`` of one request's slots ``[start, end)`` (a copy)."""
    blocks, offsets = physical_span(kv_cache, block_row, start, end)
    return kv_cache[blocks, :, offsets].transpose(0, 1)


def write_slot_range(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int,
                     slots: torch.Tensor) -> None:
    """Write ``slots [Hkv, n, W]`` (cache dtype) to one request's slots ``[start, start + n)``."""
    blocks, offsets = physical_span(kv_cache, block_row, start, start + slots.shape[1])
    kv_cache[blocks, :, offsets] = slots.transpose(0, 1)


def gather_kv(kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[Hkv, num_tokens, D]`` of one request's first ``num_tokens`` slots."""
    head_size = head_size_of(kv_cache)
    slots = slot_range(kv_cache, block_row, 0, num_tokens)
    return slots[..., :head_size], slots[..., head_size : 2 * head_size]


def request_scores(kv_cache: torch.Tensor, block_row: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Scores ``[Hkv, num_slots]`` (float32) of one request's first slots."""
    _, score = slot_meta(kv_cache)
    blocks, offsets = physical_span(kv_cache, block_row, 0, num_slots)
    return score[blocks, :, offsets].transpose(0, 1)


def reset_scores(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int) -> None:
    """Zero the scores of one request's slots ``[start, end)``."""
    _, score = slot_meta(kv_cache)
    blocks, offsets = physical_span(kv_cache, block_row, start, end)
    score[blocks, :, offsets] = 0.0


# -- vague-store pages -------------------------------------------------------

def store_pages(kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int) -> torch.Tensor:
    """One request's vague-store pages, raw: ``uint8 [Hkv, exact_start, slot_bytes]``."""
    return slot_range(kv_cache, block_row, 0, exact_start).contiguous().view(torch.uint8)


def write_store_pages(kv_cache: torch.Tensor, block_row: torch.Tensor, pages: torch.Tensor) -> None:
    """Write ``pages uint8 [Hkv, P, slot_bytes]`` to one request's slots ``[0, P)``."""
    write_slot_range(kv_cache, block_row, 0, pages.view(kv_cache.dtype))


def head_seed(layer_seed: int, head: int) -> int:
    """Hash seed of one (layer, KV head); stores derive one per row from it."""
    return layer_seed * 1_000_003 + head


# -- quantized records -------------------------------------------------------

def record_group(head_size: int) -> int:
    """Channels per (scale, min) pair: 32, or 16 where 32 does not divide the head."""
    return 32 if head_size % 32 == 0 else 16


def record_bytes(head_size: int, bits: int, group: int, value_bits: int = 0) -> int:
    """Bytes of one record: codes, four float16 parameters per group, metadata."""
    value_bits = value_bits or bits
    return head_size * (bits + value_bits) // 8 + 8 * (head_size // group) + META_BYTES


def record_meta(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (int32) and scores (float32) ``[N]`` of records, read without
    unpacking their codes."""
    meta = records[:, -META_BYTES:].contiguous().view(torch.int32)
    return meta[:, 0], meta[:, 1].view(torch.float32)


def with_record_scores(records: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """A copy of ``records`` whose scores are ``scores``."""
    out = records.clone()
    out[:, -4:] = scores.float().contiguous().view(torch.uint8).view(-1, 4)
    return out
