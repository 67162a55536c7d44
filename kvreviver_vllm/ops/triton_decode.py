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

Quantized vague store (:func:`paged_decode_attention_quantized`): the same
three passes over a request's virtual token sequence ``[revived records |
exact slots]``. A tile's record tokens are revived in pass 1 from the bytes of
the request's first ``exact_start`` slots (records packed back to back, so a
record may straddle slots and blocks, and each load is addressed through the
block table). Records and slots are multiples of 4 bytes, so no 32-bit word
straddles two slots: codes are loaded as whole words (``D * bits / 32`` per
record half; 3-bit codes as 3 words per 32 codes, a code that straddles two
words taken from both) and unpacked in registers (shift and mask,
little-endian), the float16 scale and min as one 16-bit load per group of
channels spread over the group. ``code * scale + min`` in float32, rounded to the
cache's dtype, so both dots run on the tensor cores as for exact slots (the
rounding is far below 4-bit quantization's error). Pass 3 adds each record's
received attention to its float32 score field (4-aligned, so within one slot).

Record bytes per token per KV head: ``D * (bits + value_bits) / 8 + 8 * D /
group + 8`` (88 for 4-bit, D = 64: a third of a bf16 slot's 264). Pass 1 reads
each request's ``seq_lens[r]`` slots (its pages, then its exact slots) once:
at budget 10% of a 32k context with the default config about 10% of the full
cache's bytes (the budget is counted in slots; ``benchmarks/gpu_decode.py``
prints each case's).
Compiled for sm_90, the 4-bit split kernel has 115 global loads in its PTX
(D = 64; 227 for D = 128) where byte-wise revival had 747 (1,491).

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

from kvreviver_vllm.layout import META_BYTES, head_size_of, record_bytes

LOG2E = 1.4426950408889634
MIN_GROUP_ROWS = 16  # tl.dot needs M >= 16 on the GPU
DEFAULT_TILE = 64


def interpreting() -> bool:
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
def _stream_address(block_table, row_bt, kvh, offs, mask,
                    NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    SLOT_BYTES: tl.constexpr):
    """Cache byte address of offsets ``offs`` (int64) in one KV head's
    vague-store pages: the bytes of its slots ``0, 1, ...`` back to back."""
    slot = offs // SLOT_BYTES
    blk = tl.load(block_table + row_bt + slot // BLOCK_SIZE, mask=mask, other=0).to(tl.int64)
    return ((blk * NUM_KV_HEADS + kvh) * BLOCK_SIZE + slot % BLOCK_SIZE) * SLOT_BYTES \
        + offs % SLOT_BYTES


@triton.jit
def _stream_word(cache_i32, block_table, row_bt, kvh, at, mask,
                 NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, SLOT_BYTES: tl.constexpr):
    """The 32-bit words at 4-aligned store offsets ``at [TILE, N]``, as uint32
    ``[TILE, N, 1]``."""
    addr = _stream_address(block_table, row_bt, kvh, at, mask, NUM_KV_HEADS, BLOCK_SIZE,
                           SLOT_BYTES)
    word = tl.load(cache_i32 + addr // 4, mask=mask, other=0)
    return word.to(tl.uint32, bitcast=True)[:, :, None]


@triton.jit
def _stream_codes(cache_i32, block_table, row_bt, kvh, base, mask,
                  CODES: tl.constexpr, BITS: tl.constexpr, HEAD: tl.constexpr,
                  TILE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                  SLOT_BYTES: tl.constexpr):
    """Codes ``[TILE, HEAD]`` (int32) at byte ``CODES`` of the records starting at
    ``base [TILE, 1]``: ``BITS`` each, little-endian from the region's first bit."""
    if CODES % 4 == 0 and 32 % BITS == 0 and HEAD * BITS % 32 == 0:
        # Whole 32-bit words (4-aligned: records and slots are multiples of 4
        # bytes, so no word straddles two slots), unpacked in registers.
        PER: tl.constexpr = 32 // BITS
        words_at = base + CODES + 4 * tl.arange(0, HEAD * BITS // 32)[None, :]
        words = _stream_word(cache_i32, block_table, row_bt, kvh, words_at, mask,
                             NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
        shift = (tl.arange(0, PER) * BITS)[None, None, :].to(tl.uint32)
        codes = ((words >> shift) & ((1 << BITS) - 1)).to(tl.int32)
        return tl.reshape(codes, [TILE, HEAD])
    else:
        # 3 bits: 32 codes fill 3 whole words. Load each group's 3 words, and take
        # code j from word 3j // 32, or from two words where it straddles them.
        tl.static_assert(BITS == 3 and CODES % 4 == 0 and HEAD % 32 == 0)
        GROUPS: tl.constexpr = HEAD // 32
        words_at = base + CODES + 12 * tl.arange(0, GROUPS)[None, :]
        w0 = _stream_word(cache_i32, block_table, row_bt, kvh, words_at, mask,
                          NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
        w1 = _stream_word(cache_i32, block_table, row_bt, kvh, words_at + 4, mask,
                          NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
        w2 = _stream_word(cache_i32, block_table, row_bt, kvh, words_at + 8, mask,
                          NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
        bit = (tl.arange(0, 32) * 3)[None, None, :]
        at = bit // 32
        low = tl.where(at == 0, w0, tl.where(at == 1, w1, w2)) >> (bit % 32).to(tl.uint32)
        # The next word's low bits where the code straddles (shift 1 or 2, never 32).
        spill = (32 - bit % 32).to(tl.uint32)
        high = tl.where(bit % 32 > 29, tl.where(at == 0, w1, w2) << (spill % 32), 0)
        codes = ((low | high) & 7).to(tl.int32)
        return tl.reshape(codes, [TILE, HEAD])


@triton.jit
def _stream_params(cache_i16, block_table, row_bt, kvh, base, mask, AT: tl.constexpr,
                   HEAD: tl.constexpr, CHANNELS: tl.constexpr, TILE: tl.constexpr,
                   NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                   SLOT_BYTES: tl.constexpr):
    """One float16 parameter per group of ``CHANNELS`` at byte ``AT`` of the
    records at ``base [TILE, 1]``, one load per group, spread over its channels:
    float32 ``[TILE, HEAD]``."""
    GROUPS: tl.constexpr = HEAD // CHANNELS
    at = base + AT + 2 * tl.arange(0, GROUPS)[None, :]
    addr = _stream_address(block_table, row_bt, kvh, at, mask, NUM_KV_HEADS, BLOCK_SIZE,
                           SLOT_BYTES)
    half = tl.load(cache_i16 + addr // 2, mask=mask, other=0).to(tl.float16, bitcast=True)
    spread = tl.broadcast_to(half.to(tl.float32)[:, :, None], [TILE, GROUPS, CHANNELS])
    return tl.reshape(spread, [TILE, HEAD])


@triton.jit
def _revive(cache_i16, cache_i32, block_table, row_bt, kvh, rec, mask,
            CODES: tl.constexpr, PARAM: tl.constexpr, BITS: tl.constexpr, HEAD: tl.constexpr,
            CHANNELS: tl.constexpr, PARAMS_AT: tl.constexpr, RECORD: tl.constexpr,
            TILE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr,
            SLOT_BYTES: tl.constexpr):
    """Keys (``CODES = 0``, ``PARAM = 0``) or values of records ``rec [TILE]``:
    float32 ``[TILE, HEAD]``, ``code * scale + min`` per group of ``CHANNELS``
    (parameters ``[key scales | key mins | value scales | value mins]``, one per
    group each)."""
    base = rec.to(tl.int64)[:, None] * RECORD
    m2 = mask[:, None]
    code = _stream_codes(cache_i32, block_table, row_bt, kvh, base, m2, CODES, BITS,
                         HEAD, TILE, NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
    GROUPS: tl.constexpr = HEAD // CHANNELS
    scale = _stream_params(cache_i16, block_table, row_bt, kvh, base, m2,
                           PARAMS_AT + 2 * PARAM * GROUPS, HEAD, CHANNELS, TILE,
                           NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
    low = _stream_params(cache_i16, block_table, row_bt, kvh, base, m2,
                         PARAMS_AT + 2 * (PARAM + 1) * GROUPS, HEAD, CHANNELS, TILE,
                         NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
    return code.to(tl.float32) * scale + low


@triton.jit
def _request_span(r, lengths, exact_start, vague_tokens, QUANT: tl.constexpr):
    """(tokens, revived records, first exact slot) of request ``r``."""
    total = tl.load(lengths + r)
    if QUANT:
        num_vague = tl.load(vague_tokens + r)
        first_exact = tl.load(exact_start + r)
    else:
        num_vague = 0
        first_exact = 0
    return total, num_vague, first_exact


@triton.jit
def _split_kernel(
    query, kv_cache, cache_i16, cache_i32, block_table, lengths, exact_start,
    vague_tokens, part_max, part_sum, part_acc, logits,
    qk_scale,
    stride_qr, stride_qh, stride_bt,
    num_splits, max_len,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr,
    SPLIT: tl.constexpr, TILE: tl.constexpr,
    SCORES: tl.constexpr, DOT_F32: tl.constexpr,
    QUANT: tl.constexpr, BITS: tl.constexpr, VALUE_BITS: tl.constexpr,
    CHANNELS: tl.constexpr, RECORD: tl.constexpr, SLOT_BYTES: tl.constexpr,
):
    """Token ``j`` of a request (``j < lengths[r]``) is its revived record ``j``
    if ``j < vague_tokens[r]`` (QUANT only), else its exact slot
    ``exact_start[r] + j - vague_tokens[r]``."""
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.program_id(2)
    num_q_heads = NUM_KV_HEADS * GROUP
    total, num_vague, first_exact = _request_span(r, lengths, exact_start, vague_tokens, QUANT)
    start = s * SPLIT
    end = tl.minimum(start + SPLIT, total)
    row_bt = r * stride_bt

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
        exact = valid & (offs >= num_vague)
        slot = first_exact + offs - num_vague
        blk = tl.load(block_table + row_bt + slot // BLOCK_SIZE, mask=exact, other=0)
        row = ((blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + slot % BLOCK_SIZE) * WIDTH
        k = tl.load(kv_cache + row[:, None] + d[None, :], mask=exact[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        if QUANT:
            vague = valid & (offs < num_vague)
            kq = _revive(cache_i16, cache_i32, block_table, row_bt, kvh, offs, vague,
                         0, 0, BITS, HEAD, CHANNELS, HEAD * (BITS + VALUE_BITS) // 8, RECORD,
                         TILE, NUM_KV_HEADS, BLOCK_SIZE, SLOT_BYTES)
            k = tl.where(vague[:, None], kq.to(k.dtype), k)
        if DOT_F32:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
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
        v = tl.load(kv_cache + row[:, None] + HEAD + d[None, :], mask=exact[:, None], other=0.0)
        if DOT_F32:
            v = v.to(tl.float32)
        if QUANT:
            vq = _revive(cache_i16, cache_i32, block_table, row_bt, kvh, offs, vague,
                         HEAD * BITS // 8, 2, VALUE_BITS, HEAD, CHANNELS,
                         HEAD * (BITS + VALUE_BITS) // 8, RECORD, TILE, NUM_KV_HEADS,
                         BLOCK_SIZE, SLOT_BYTES)
            v = tl.where(vague[:, None], vq.to(v.dtype), v)
        if DOT_F32:
            pv = tl.dot(p, v, input_precision="ieee")
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
    scores_f32, block_table, lengths, exact_start, vague_tokens, logits, stats,
    stride_bt, max_len,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, WIDTH32: tl.constexpr, TILE: tl.constexpr,
    QUANT: tl.constexpr, RECORD: tl.constexpr,
):
    r = tl.program_id(0)
    kvh = tl.program_id(1)
    t = tl.program_id(2)
    num_q_heads = NUM_KV_HEADS * GROUP
    total, num_vague, first_exact = _request_span(r, lengths, exact_start, vague_tokens, QUANT)
    offs = t * TILE + tl.arange(0, TILE)
    valid = offs < total
    g = tl.arange(0, GROUP_PAD)
    gmask = g < GROUP
    heads = kvh * GROUP + g
    m = tl.load(stats + (r * num_q_heads + heads) * 2, mask=gmask, other=0.0)
    l = tl.load(stats + (r * num_q_heads + heads) * 2 + 1, mask=gmask, other=1.0)
    lrow = (r * num_q_heads + heads[:, None]).to(tl.int64) * max_len
    lg = tl.load(logits + lrow + offs[None, :], mask=gmask[:, None] & valid[None, :],
                 other=float("-inf"))
    p = tl.exp2(lg - m[:, None]) / l[:, None]
    received = tl.sum(tl.where(gmask[:, None] & valid[None, :], p, 0.0), 0)
    # Exact slot: its score is the slot's last float32.
    exact = valid & (offs >= num_vague)
    slot = first_exact + offs - num_vague
    blk = tl.load(block_table + r * stride_bt + slot // BLOCK_SIZE, mask=exact, other=0)
    phys = (blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + slot % BLOCK_SIZE
    index = phys * WIDTH32 + (WIDTH32 - 1)
    if QUANT:
        # Record: its score is the record's last float32, in the pages' byte stream
        # (4-aligned, so within one slot).
        vague = valid & (offs < num_vague)
        word = (offs.to(tl.int64) * RECORD + RECORD - 4) // 4
        vslot = word // WIDTH32
        vblk = tl.load(block_table + r * stride_bt + vslot // BLOCK_SIZE, mask=vague, other=0)
        vphys = (vblk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + vslot % BLOCK_SIZE
        index = tl.where(vague, vphys * WIDTH32 + word % WIDTH32, index)
    ptr = scores_f32 + index
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
    _launch(out, query, kv_cache, block_table, seq_lens, None, None, scale, score_window,
            None, split_size, tile, max_seq_len, num_sms)


def paged_decode_attention_quantized(out: torch.Tensor, query: torch.Tensor,
                                     kv_cache: torch.Tensor, block_table: torch.Tensor,
                                     exact_start: torch.Tensor, seq_lens: torch.Tensor,
                                     vague_tokens: torch.Tensor, scale: float, score_window: int,
                                     bits: int, group: int, value_bits: int = 0,
                                     split_size: int | None = None, tile: int | None = None,
                                     max_tokens: int | None = None,
                                     num_sms: int | None = None) -> None:
    """:func:`reference.paged_attention_quantized` for decode rows (one per request):
    one softmax over each request's ``vague_tokens[r]`` revived records (packed
    back to back in the bytes of its slots ``[0, exact_start[r])``, per KV head)
    followed by its exact slots ``[exact_start[r], seq_lens[r])``. Scoring adds
    the received attention to the exact slots' scores and to the records' score
    fields. ``max_tokens`` bounds ``vague_tokens + seq_lens - exact_start``
    (default: a bound from the block table's capacity, no sync)."""
    value_bits = value_bits or bits
    head_size = head_size_of(kv_cache)
    slot_bytes = kv_cache.shape[-1] * kv_cache.element_size()
    rec = record_bytes(head_size, bits, group, value_bits)
    assert 1 <= bits <= 8 and 1 <= value_bits <= 8 and head_size % group == 0
    assert rec % 4 == 0, "record scores must be 4-byte aligned"
    if max_tokens is None:
        capacity = block_table.shape[1] * kv_cache.shape[2]
        max_tokens = capacity + capacity * slot_bytes // rec
    lengths = (vague_tokens.to(torch.int32) + seq_lens - exact_start).to(torch.int32)
    _launch(out, query, kv_cache, block_table, lengths, exact_start.to(torch.int32),
            vague_tokens.to(torch.int32), scale, score_window, (bits, value_bits, group, rec),
            split_size, tile, max_tokens, num_sms)


def check_arguments(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                    *int32: torch.Tensor) -> None:
    """What the Triton kernels assume of their tensors (shared with
    ``triton_prefill``): ``query``/``out`` ``[rows, Hq, D]`` with unit stride in
    ``D``, a contiguous cache of ``D`` a power of two and 4-byte-aligned slots,
    and int32 index tensors."""
    head_size = query.shape[2]
    assert out.shape == query.shape and head_size == head_size_of(kv_cache)
    assert head_size >= 16 and head_size & (head_size - 1) == 0, "head size must be a power of two"
    assert query.shape[1] % kv_cache.shape[1] == 0
    assert kv_cache.is_contiguous() and query.stride(2) == 1 and out.stride(2) == 1
    assert all(t.dtype == torch.int32 for t in int32)
    assert (kv_cache.shape[3] * kv_cache.element_size()) % 4 == 0


def _launch(out, query, kv_cache, block_table, lengths, exact_start, vague_tokens, scale,
            score_window, quant, split_size, tile, max_len, num_sms) -> None:
    num_reqs, num_q_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    check_arguments(out, query, kv_cache, block_table, lengths)
    if num_reqs == 0:
        return
    group = num_q_heads // num_kv_heads
    group_pad = max(MIN_GROUP_ROWS, triton.next_power_of_2(group))
    max_len = max_len if max_len is not None else block_table.shape[1] * block_size
    max_len = max(int(max_len), 1)
    if split_size is None:
        if num_sms is None:
            # On the CPU Triton's interpreter runs one program at a time: fewest splits.
            num_sms = (torch.cuda.get_device_properties(query.device).multi_processor_count
                       if query.is_cuda else 1)
        split_size = choose_split_size(num_reqs, num_kv_heads, max_len, num_sms)
    assert split_size >= 16 and split_size & (split_size - 1) == 0, "split size: power of two >= 16"
    tile = tile or min(DEFAULT_TILE, split_size)
    assert 16 <= tile <= split_size and tile & (tile - 1) == 0
    num_splits = triton.cdiv(max_len, split_size)
    scores = score_window > 0
    dot_f32 = kv_cache.dtype == torch.float32 or interpreting()
    bits, value_bits, channels, rec = quant or (8, 8, 16, 4)
    slot_bytes = width * kv_cache.element_size()
    if exact_start is None:
        exact_start = vague_tokens = lengths  # unused placeholders

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
        query, kv_cache, kv_cache.view(torch.int16), kv_cache.view(torch.int32), block_table, lengths, exact_start, vague_tokens, part_max, part_sum, part_acc, logits,
        scale * LOG2E,
        query.stride(0), query.stride(1), block_table.stride(0),
        num_splits, max_len,
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad,
        HEAD=head_size, BLOCK_SIZE=block_size, WIDTH=width,
        SPLIT=split_size, TILE=tile, SCORES=scores, DOT_F32=dot_f32,
        QUANT=quant is not None, BITS=bits, VALUE_BITS=value_bits, CHANNELS=channels,
        RECORD=rec, SLOT_BYTES=slot_bytes,
        num_warps=4,
    )
    splits_pad = triton.next_power_of_2(num_splits)
    _merge_kernel[(num_reqs, num_q_heads)](
        out, part_max, part_sum, part_acc, stats, lengths,
        out.stride(0), out.stride(1),
        num_splits,
        NUM_Q_HEADS=num_q_heads, HEAD=head_size, SPLIT=split_size,
        SPLITS_PAD=splits_pad, CHUNK=min(16, splits_pad), SCORES=scores,
        num_warps=4,
    )
    if scores:
        score_tile = 128
        _score_kernel[(num_reqs, num_kv_heads, triton.cdiv(max_len, score_tile))](
            kv_cache.view(torch.float32), block_table, lengths, exact_start, vague_tokens,
            logits, stats,
            block_table.stride(0), max_len,
            NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=triton.next_power_of_2(group),
            BLOCK_SIZE=block_size, WIDTH32=slot_bytes // 4, TILE=score_tile,
            QUANT=quant is not None, RECORD=rec,
            num_warps=4,
        )
