"""Triton FlashAttention over the paged KV cache for prompt chunks (and any
request whose tokens are all exact slots).

Same semantics as :func:`kvreviver_vllm.ops.reference.paged_attention` for the
requests it is given: request ``r``'s ``n`` query rows
``query_start_loc[r]:query_start_loc[r+1]`` attend causally (bottom-right
aligned) over its first ``seq_lens[r]`` slots, and with ``score_window >= 1``
each slot's score grows by the attention probability it received from the last
``score_window`` rows, summed over them and the query heads of its GQA group.

Why exact slots suffice: a request reads its whole prompt as exact slots and is
compacted (its store filled) only at its first decode step, so a prompt chunk
never attends to revived records. Decode rows of requests that hold records go
through :mod:`triton_decode` in the same step.

Design (FlashAttention-2, two launches):

1. ``_prefill_kernel``, grid ``(request, KV head, query tile)``. A program's
   rows are ``Q_TILE`` queries times the ``Hq / Hkv`` query heads of one GQA
   group (padded to a power of two), so each K and V tile is loaded once for the
   group and the dots ``[rows, D] x [D, TILE]`` run on the tensor cores (16-bit
   caches; float32 caches and Triton's interpreter compute in float32). Online
   softmax in float32 (base 2); the loop stops at the tile's causal diagonal.
   Writes ``out`` and, when scoring, each row's final ``(max, sum)``.
2. ``_window_score_kernel``, grid ``(request, KV head, tile of slots)``, only
   when ``score_window > 0``: recomputes the window rows' logits against each K
   tile (a second read of K only, for those rows), ``exp2(logit - max) / sum``
   summed over rows and group, added to each slot's score field.

Bytes per call: pass 1 reads each request's K and V (``2 * D * itemsize`` per
slot per KV head) once per query tile that reaches it, about ``n / (2 Q_TILE)``
times for a chunk of ``n`` new tokens over a long context, and is bound by the
tensor cores, not by memory, once ``Q_TILE * group >= 64``; pass 2 reads K once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvreviver_vllm.ops.triton_decode import LOG2E, check_arguments, interpreting

ROWS = 64  # query rows (queries x group heads) per program: a tensor-core tile
DEFAULT_TILE = 64


@triton.jit
def _prefill_kernel(
    query, out, kv_cache, block_table, seq_lens, query_start_loc, requests, row_max, row_sum,
    qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr,
    Q_TILE: tl.constexpr, TILE: tl.constexpr, STATS: tl.constexpr, DOT_F32: tl.constexpr,
):
    r = tl.load(requests + tl.program_id(0))
    kvh = tl.program_id(1)
    first_q = tl.program_id(2) * Q_TILE
    q_start = tl.load(query_start_loc + r)
    num_q = tl.load(query_start_loc + r + 1) - q_start
    if first_q < num_q:
        seq_len = tl.load(seq_lens + r)
        num_q_heads = NUM_KV_HEADS * GROUP
        rows = tl.arange(0, Q_TILE * GROUP_PAD)
        qi = first_q + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (qi < num_q) & (g < GROUP)
        heads = kvh * GROUP + g
        d = tl.arange(0, HEAD)
        q = tl.load(query + (q_start + qi).to(tl.int64)[:, None] * stride_qt
                    + heads[:, None] * stride_qh + d[None, :], mask=row_ok[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        last = seq_len - num_q + qi  # last slot each row sees (causal, bottom-right)
        end = tl.minimum(seq_len, seq_len - num_q + first_q + Q_TILE)
        row_bt = r.to(tl.int64) * stride_bt

        m_i = tl.full([Q_TILE * GROUP_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([Q_TILE * GROUP_PAD], tl.float32)
        acc = tl.zeros([Q_TILE * GROUP_PAD, HEAD], tl.float32)
        t_off = tl.arange(0, TILE)
        # Slot 0 is in the first tile and every row sees it, so m_i is finite
        # from then on (no -inf - -inf).
        for t in range(0, end, TILE):
            offs = t + t_off
            valid = offs < end
            blk = tl.load(block_table + row_bt + offs // BLOCK_SIZE, mask=valid, other=0)
            slot = ((blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE
                    + offs % BLOCK_SIZE) * WIDTH
            k = tl.load(kv_cache + slot[:, None] + d[None, :], mask=valid[:, None], other=0.0)
            v = tl.load(kv_cache + slot[:, None] + HEAD + d[None, :], mask=valid[:, None],
                        other=0.0)
            if DOT_F32:
                qk = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:
                qk = tl.dot(q, tl.trans(k))
            seen = valid[None, :] & (offs[None, :] <= last[:, None])
            qk = tl.where(seen, qk * qk_scale, float("-inf"))  # base-2 logits
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DOT_F32:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        token = (q_start + qi).to(tl.int64)
        tl.store(out + token[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 (acc / l_i[:, None]).to(out.dtype.element_ty), mask=row_ok[:, None])
        if STATS:
            stat = token * num_q_heads + heads
            tl.store(row_max + stat, m_i, mask=row_ok)
            tl.store(row_sum + stat, l_i, mask=row_ok)


@triton.jit
def _window_score_kernel(
    query, kv_cache, scores_f32, block_table, seq_lens, query_start_loc, requests, row_max,
    row_sum, qk_scale, score_window,
    stride_qt, stride_qh, stride_bt,
    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, WIDTH: tl.constexpr, WIDTH32: tl.constexpr,
    WINDOW_PAD: tl.constexpr, TILE: tl.constexpr, DOT_F32: tl.constexpr,
):
    r = tl.load(requests + tl.program_id(0))
    kvh = tl.program_id(1)
    offs = tl.program_id(2) * TILE + tl.arange(0, TILE)
    seq_len = tl.load(seq_lens + r)
    q_start = tl.load(query_start_loc + r)
    num_q = tl.load(query_start_loc + r + 1) - q_start
    if (tl.program_id(2) * TILE < seq_len) & (num_q > 0):
        num_q_heads = NUM_KV_HEADS * GROUP
        window = tl.minimum(score_window, num_q)
        rows = tl.arange(0, WINDOW_PAD * GROUP_PAD)
        qi = num_q - window + rows // GROUP_PAD
        g = rows % GROUP_PAD
        row_ok = (rows // GROUP_PAD < window) & (g < GROUP)
        heads = kvh * GROUP + g
        d = tl.arange(0, HEAD)
        token = (q_start + qi).to(tl.int64)
        q = tl.load(query + token[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_ok[:, None], other=0.0)
        stat = token * num_q_heads + heads
        m = tl.load(row_max + stat, mask=row_ok, other=0.0)
        l = tl.load(row_sum + stat, mask=row_ok, other=1.0)

        valid = offs < seq_len
        blk = tl.load(block_table + r.to(tl.int64) * stride_bt + offs // BLOCK_SIZE, mask=valid,
                      other=0)
        phys = (blk.to(tl.int64) * NUM_KV_HEADS + kvh) * BLOCK_SIZE + offs % BLOCK_SIZE
        k = tl.load(kv_cache + phys[:, None] * WIDTH + d[None, :], mask=valid[:, None],
                    other=0.0)
        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        seen = row_ok[:, None] & valid[None, :] & (offs[None, :] <= (seq_len - num_q + qi)[:, None])
        p = tl.where(seen, tl.exp2(qk * qk_scale - m[:, None]) / l[:, None], 0.0)
        received = tl.sum(p, 0)
        # A slot's score is its last float32 (``WIDTH32`` of them per slot).
        ptr = scores_f32 + phys * WIDTH32 + (WIDTH32 - 1)
        old = tl.load(ptr, mask=valid, other=0.0)
        tl.store(ptr, old + received, mask=valid)


def paged_prefill_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_lens: torch.Tensor,
                            query_start_loc: torch.Tensor, scale: float, score_window: int,
                            requests: torch.Tensor, max_query_len: int, max_seq_len: int,
                            tile: int | None = None) -> None:
    """:func:`reference.paged_attention` for the requests ``requests`` (int32
    indices into ``block_table``, ``seq_lens`` and ``query_start_loc``, on the
    cache's device), in place; other requests' rows of ``out`` are not touched.

    ``query``/``out`` ``[T, Hq, D]``; ``max_query_len`` and ``max_seq_len``
    (host ints) bound those requests' query rows and slots: they size the grid."""
    num_tokens, num_q_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, width = kv_cache.shape
    check_arguments(out, query, kv_cache, block_table, seq_lens, query_start_loc, requests)
    num_reqs = requests.shape[0]
    if num_reqs == 0 or max_query_len == 0:
        return
    group = num_q_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    q_tile = max(1, ROWS // group_pad)
    tile = tile or DEFAULT_TILE
    assert tile >= 16 and tile & (tile - 1) == 0
    dot_f32 = kv_cache.dtype == torch.float32 or interpreting()
    scores = score_window > 0
    dev = query.device
    if scores:
        row_max = torch.empty(num_tokens, num_q_heads, dtype=torch.float32, device=dev)
        row_sum = torch.empty_like(row_max)
    else:
        row_max = row_sum = out  # unused placeholders
    _prefill_kernel[(num_reqs, num_kv_heads, triton.cdiv(max_query_len, q_tile))](
        query, out, kv_cache, block_table, seq_lens, query_start_loc, requests, row_max, row_sum,
        scale * LOG2E,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1), block_table.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD=head_size,
        BLOCK_SIZE=block_size, WIDTH=width, Q_TILE=q_tile, TILE=tile, STATS=scores,
        DOT_F32=dot_f32, num_warps=4,
    )
    if scores:
        window_pad = max(triton.next_power_of_2(min(score_window, max_query_len)),
                         max(1, 16 // group_pad))  # tl.dot: at least 16 rows
        _window_score_kernel[(num_reqs, num_kv_heads, triton.cdiv(max(max_seq_len, 1), tile))](
            query, kv_cache, kv_cache.view(torch.float32), block_table, seq_lens,
            query_start_loc, requests, row_max, row_sum, scale * LOG2E, score_window,
            query.stride(0), query.stride(1), block_table.stride(0),
            NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=group_pad, HEAD=head_size,
            BLOCK_SIZE=block_size, WIDTH=width, WIDTH32=width * kv_cache.element_size() // 4,
            WINDOW_PAD=window_pad, TILE=tile,
            DOT_F32=dot_f32, num_warps=4,
        )
