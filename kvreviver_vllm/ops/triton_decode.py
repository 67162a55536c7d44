"""Triton flash-decoding over the paged KV cache: decode steps (one query row per request).

Same semantics as :func:`kvreviver_vllm.ops.reference.paged_attention` with
``query_start_loc = arange(num_reqs + 1)``: each request's single query row
attends to all of its ``seq_lens[r]`` slots; with ``score_window >= 1`` each
slot's score (float32 metadata of the slot, ``layout``) grows by the attention
probability it received, summed over the query heads of its GQA group.

Design (three launches, scores without a second pass over the cache):

1. ``_split_kernel``, grid ``(request, KV head, split)``. A split is a
   contiguous range of ``split_size`` slots (a power of two, chosen by
   :func:`choose_split_size` so that the grid fills the GPU's SMs). The
   program walks its range in tiles of ``tile`` slots, loading each K and V
   tile ONCE for the whole GQA group: the group's ``Hq / Hkv`` query heads are
   the rows of a ``[group (padded to 16), D] x [D, tile]`` dot. Online softmax
   in float32 (base 2). Writes the partial ``(max, sum, acc[D])`` per
   (request, query head, split) to scratch and, if scoring, each slot's raw
   logit per query head to ``logits [num_reqs, Hq, max_len]`` (float32).
2. ``_merge_kernel``, grid ``(request, query head)``: log-sum-exp merge of the
   splits, writes ``out`` in its dtype and the final (max, sum) per head.
3. ``_score_kernel``, grid ``(request, KV head, tile of slots)``, only when
   ``score_window > 0``: ``exp2(logit - max) / sum`` summed over the group,
   added to each slot's score field (4-byte read-modify-write per slot per KV
   head, through a float32 view of the same cache memory).

K and V rows of a slot are contiguous per KV head within a block (``W``
elements: ``[K | V | position | score]``), so a tile is ``tile`` contiguous runs
of ``2 * D * itemsize`` bytes at a stride of ``W * itemsize = 2 * D * itemsize +
8`` bytes: every row starts 8-byte aligned (Triton derives it from the constexpr
``W``), so loads vectorise to 8 bytes; 16-byte vectors would need a slot stride
that is a multiple of 16 (a layout change: 16 bytes of metadata). The score
field is reached through ``kv_cache.view(torch.float32)`` (``W * itemsize`` is a
multiple of 4), the same memory.

Bytes per call (``L`` = total context over the batch, ``isz`` = itemsize):

* pass 1 reads ``L * Hkv * (2 * D * isz + 8)`` (K, V and the sectors of the
  slot metadata it shares; :func:`decode_bytes`), plus the block table and
  queries (negligible); writes ``num_reqs * Hq * splits * (D + 2) * 4`` of
  partials and, when scoring, ``L * Hq * 4`` of logits;
* pass 2 reads the partials again and writes ``out``;
* pass 3 (scoring) reads ``L * Hq * 4`` of logits and read-modify-writes
  ``L * Hkv * 4`` bytes of scores.

So scoring adds ``(8 Hq + 8 Hkv) / (Hkv (2 D isz + 8))`` of pass 1's traffic:
12% for 9/3/64 bf16, 8% for 32/8/128 bf16. Example: 9/3/64 bf16, batch 16,
8k context: pass 1 reads 16 * 3 * 8192 * 264 B = 104 MB (~22 us at 4.8 TB/s).

Note: Triton 3.9's interpreter (``TRITON_INTERPRET=1``) computes ``tl.dot`` on
bfloat16/float16 operands wrongly, so under the interpreter both dots run in
float32 (``DOT_F32``); on a GPU 16-bit caches use the tensor cores (float32
accumulate, probabilities rounded to the cache dtype for the P @ V dot, as
FlashAttention does) and float32 caches use ``input_precision="ieee"``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvreviver_vllm.layout import META_BYTES, head_size_of

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16 on the GPU
DEFAULT_TILE = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def decode_bytes(num_reqs: int, num_kv_heads: int, context: int, head_size: int,
                 dtype: torch.dtype) -> int:
    """Bytes pass 1 reads from the cache: K, V and metadata of every slot of every
    KV head (``context`` slots per request)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_reqs * num_kv_heads * context * (2 * head_size * itemsize + META_BYTES)


def choose_split_size(num_reqs: int, num_kv_heads: int, max_len: int, num_sms: int = 132,
                      largest: int = 512, smallest: int = 64) -> int:
    """Largest power-of-two split in ``[smallest, largest]`` whose grid
    ``num_reqs * num_kv_heads * ceil(max_len / split)`` reaches two programs per SM."""
    split = largest
    while split > smallest and num_reqs * num_kv_heads * triton.cdiv(max_len, split) < 2 * num_sms:
        split //= 2
    return split


@triton.jit
def _split_kernel(
    query, kv_cache, block_table, seq_lens,
    part_max, part_sum, part_acc, logits,
    qk_scale,
    stride_qr, stride_qh, stride_bt,
    num_splits, max_len,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr,
    SPLIT: tl.constexpr, TILE: tl.constexpr,
    SCORES: tl.constexpr, DOT_F32: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    num_q_heads = NUM_KV_HEADS * GROUP
    seq_len = tl.load(seq_lens + r)
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, seq_len)

    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    d = tl.arange(0, HEAD)
    q = tl.load(query + r * stride_qr + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD], tl.float32)
    t_off = tl.arange(0, TILE)
    for t in range(start, end, TILE):
        offs = t + t_off
        valid = offs < end
        blk = tl.load(block_table + r * stride_bt + offs // BLOCK_SIZE, mask=valid, other=0)
        row = ((blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + offs % BLOCK_SIZE) * WIDTH
        k = tl.load(kv_cache + row[:, None] + d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))  # base-2 logits
        if SCORES:
            lrow = (r * num_q_heads + heads[:, None]).to(tl.int64) * max_len
            tl.store(logits + lrow + offs[None, :], qk, mask=gmask[:, None] & valid[None, :])
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(kv_cache + row[:, None] + HEAD + d[None, :], mask=valid[:, None], other=0.0)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = (r * num_q_heads + heads) * num_splits + s
    tl.store(part_max + part, m_i, mask=gmask)
    tl.store(part_sum + part, l_i, mask=gmask)
    tl.store(part_acc + part[:, None] * HEAD + d[None, :], acc, mask=gmask[:, None])


@triton.jit
def _merge_kernel(
    out, part_max, part_sum, part_acc, stats, seq_lens,
    stride_or, stride_oh,
    num_splits,
    NUM_Q_HEADS: tl.constexpr, HEAD: tl.constexpr, SPLIT: tl.constexpr,
    SPLITS_PAD: tl.constexpr, CHUNK: tl.constexpr, SCORES: tl.constexpr,
):
    r = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens + r)
    used = tl.cdiv(seq_len, SPLIT)
    base = (r * NUM_Q_HEADS + h) * num_splits
    sp = tl.arange(0, SPLITS_PAD)
    m = tl.load(part_max + base + sp, mask=sp < used, other=float("-inf"))
    m_all = tl.max(m, 0)
    m_safe = tl.where(m_all > float("-inf"), m_all, 0.0)

    d = tl.arange(0, HEAD)
    c = tl.arange(0, CHUNK)
    total = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD], tl.float32)
    for s0 in range(0, used, CHUNK):
        idx = s0 + c
        ok = idx < used
        mc = tl.load(part_max + base + idx, mask=ok, other=float("-inf"))
        w = tl.where(ok, tl.exp2(mc - m_safe), 0.0)
        lc = tl.load(part_sum + base + idx, mask=ok, other=0.0)
        total += tl.sum(w * lc, 0)
        ac = tl.load(part_acc + (base + idx)[:, None] * HEAD + d[None, :], mask=ok[:, None],
                     other=0.0)
        acc += tl.sum(w[:, None] * ac, 0)
    l_all = tl.sum(total, 0)
    l_safe = tl.where(l_all > 0, l_all, 1.0)
    tl.store(out + r * stride_or + h * stride_oh + d, (acc / l_safe).to(out.dtype.element_ty))
    if SCORES:
        tl.store(stats + (r * NUM_Q_HEADS + h) * 2, m_safe)
        tl.store(stats + (r * NUM_Q_HEADS + h) * 2 + 1, l_safe)


@triton.jit
def _score_kernel(
    scores_f32, block_table, seq_lens, logits, stats,
    stride_bt, max_len,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, WIDTH32: tl.constexpr, TILE: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    t = tl.program_id(2)
    num_q_heads = NUM_KV_HEADS * GROUP
    seq_len = tl.load(seq_lens + r)
    offs = t * TILE + tl.arange(0, TILE)
    valid = offs < seq_len
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    m = tl.load(stats + (r * num_q_heads + heads) * 2, mask=gmask, other=0.0)
    l = tl.load(stats + (r * num_q_heads + heads) * 2 + 1, mask=gmask, other=1.0)
    lg = tl.load(logits + (r * num_q_heads + heads[:, None]).to(tl.int64) * max_len + offs[None, :],
                 mask=gmask[:, None] & valid[None, :], other=float("-inf"))
    p = tl.exp2(lg - m[:, None]) / l[:, None]
    received = tl.sum(tl.where(gmask[:, None] & valid[None, :], p, 0.0), 0)
    blk = tl.load(block_table + r * stride_bt + offs // BLOCK_SIZE, mask=valid, other=0)
    slot = (blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + offs % BLOCK_SIZE
    ptr = scores_f32 + slot * WIDTH32 + (WIDTH32 - 1)
    old = tl.load(ptr, mask=valid, other=0.0)
    tl.store(ptr, old + received, mask=valid)


def paged_decode_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                           block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           score_window: int, split_size: int | None = None,
                           tile: int | None = None, max_seq_len: int | None = None,
                           num_sms: int | None = None) -> None:
    """Decode attention (one query row per request) over the paged cache, in place.

    ``query``/``out`` ``[num_reqs, Hq, D]``; ``block_table [num_reqs, max_blocks]``
    and ``seq_lens [num_reqs]`` int32. ``split_size`` (power of two) defaults to
    :func:`choose_split_size`; ``tile`` (slots per K/V tile, power of two >= 16)
    to ``min(64, split_size)``. ``max_seq_len`` bounds ``seq_lens`` (default: the
    block table's capacity, so no device-to-host sync) and sizes the grid and
    the logit scratch."""
    num_reqs, num_q_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    assert out.shape == query.shape and head_size == head_size_of(kv_cache)
    assert head_size >= 16 and head_size & (head_size - 1) == 0, "head size must be a power of two"
    assert num_q_heads % num_kv_heads == 0
    assert kv_cache.is_contiguous() and query.stride(2) == 1 and out.stride(2) == 1
    assert block_table.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert (width * kv_cache.element_size()) % 4 == 0
    if num_reqs == 0:
        return
    group = num_q_heads // num_kv_heads
    group_pad = max(MIN_GROUP_ROWS, triton.next_power_of_2(group))
    max_len = max_seq_len if max_seq_len is not None else block_table.shape[1] * block_size
    max_len = max(int(max_len), 1)
    if split_size is None:
        if num_sms is None:
            num_sms = (torch.cuda.get_device_properties(query.device).multi_processor_count
                       if query.is_cuda else 132)
        split_size = choose_split_size(num_reqs, num_kv_heads, max_len, num_sms)
    assert split_size >= 16 and split_size & (split_size - 1) == 0, "split size: power of two >= 16"
    tile = tile or min(DEFAULT_TILE, split_size)
    assert 16 <= tile <= split_size and tile & (tile - 1) == 0
    num_splits = triton.cdiv(max_len, split_size)
    scores = score_window > 0
    dot_f32 = kv_cache.dtype == torch.float32 or _interpreting()

    dev = query.device
    part_max = torch.empty(num_reqs, num_q_heads, num_splits, dtype=torch.float32, device=dev)
    part_sum = torch.empty_like(part_max)
    part_acc = torch.empty(num_reqs, num_q_heads, num_splits, head_size, dtype=torch.float32,
                           device=dev)
    if scores:
        logits = torch.empty(num_reqs, num_q_heads, max_len, dtype=torch.float32, device=dev)
        stats = torch.empty(num_reqs, num_q_heads, 2, dtype=torch.float32, device=dev)
    else:
        logits = stats = part_max  # unused placeholders

    _split_kernel[(num_reqs, num_kv_heads, num_splits)](
        query, kv_cache, block_table, seq_lens,
        part_max, part_sum, part_acc, logits,
        scale * LOG2E,
        query.stride(0), query.stride(1), block_table.stride(0),
        num_splits, max_len,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad,
        HEAD=head_size, BLOCK_SIZE=block_size, WIDTH=width,
        SPLIT=split_size, TILE=tile, SCORES=scores, DOT_F32=dot_f32,
        num_warps=4,
    )
    splits_pad = triton.next_power_of_2(num_splits)
    _merge_kernel[(num_reqs, num_q_heads)](
        out, part_max, part_sum, part_acc, stats, seq_lens,
        out.stride(0), out.stride(1),
        num_splits,
        NUM_Q_HEADS=num_q_heads, HEAD=head_size, SPLIT=split_size,
        SPLITS_PAD=splits_pad, CHUNK=min(16, splits_pad), SCORES=scores,
        num_warps=4,
    )
    if scores:
        score_tile = 128
        width32 = width * kv_cache.element_size() // 4
        _score_kernel[(num_reqs, num_kv_heads, triton.cdiv(max_len, score_tile))](
            kv_cache.view(torch.float32), block_table, seq_lens, logits, stats,
            block_table.stride(0), max_len,
            NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
            BLOCK_SIZE=block_size, WIDTH32=width32, TILE=score_tile,
            num_warps=4,
        )
