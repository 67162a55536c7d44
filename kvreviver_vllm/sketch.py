"""Pure-PyTorch reference of every KVReviver op: the spec the compiled kernels match.

Written for clarity, not speed. Each function here has the same signature and
semantics as the op of the same name that ``ops.py`` exposes.

Paged cache layout (one layer): ``kv_cache[num_blocks, num_kv_heads, block_size, W]``.
A request's physical slot ``s`` is offset ``s % block_size`` of block
``block_table[req, s // block_size]``. Each slot holds, per KV head,

    [ key (D elements) | value (D elements) | position (int32) | score (float32) ]

so ``W = 2 * D + META_BYTES / itemsize``. The position is the token's logical
(RoPE) position; the score is the attention mass the token received since the
request's last compaction (summed over the query heads of its GQA group).
"""

from __future__ import annotations

import torch

META_BYTES = 8  # int32 position + float32 score


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


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    positions: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[T, Hkv, D]`` and each token's logical position at
    its slot (global slot id ``block * block_size + offset``) with score 0.
    Slots < 0 are padding and skipped."""
    block_size = kv_cache.shape[2]
    head_size = key.shape[-1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value, positions = (
            slot_mapping[valid], key[valid], value[valid], positions[valid]
        )
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, :, offsets, :head_size] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size : 2 * head_size] = value.to(kv_cache.dtype)
    pos, score = slot_meta(kv_cache)
    pos[blocks, :, offsets] = positions.to(torch.int32)[:, None]
    score[blocks, :, offsets] = 0.0


def slot_range(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Whole slots ``[Hkv, end - start, W]`` of one request's slots ``[start, end)``."""
    blocks, offsets = physical_span(kv_cache, block_row, start, end)
    return kv_cache[blocks, :, offsets].transpose(0, 1)


def gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[Hkv, num_tokens, D]`` of one request's first ``num_tokens`` slots."""
    head_size = head_size_of(kv_cache)
    slots = slot_range(kv_cache, block_row, 0, num_tokens)
    return slots[..., :head_size], slots[..., head_size : 2 * head_size]


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    score_window: int,
) -> None:
    """Causal attention of each request's queries over its first ``seq_lens`` slots.

    ``query``/``out`` are ``[T, Hq, D]``; request ``r`` owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]``. Query row ``i`` of a request with
    ``n`` queries sees slots ``[0, seq_len - n + i]``. GQA: query head ``h`` reads
    KV head ``h // (Hq // Hkv)``. Softmax and accumulation are in float32.
    Each slot's score grows by the attention probability it received from the
    last ``score_window`` query rows of the request (SnapKV's observation
    window; 0 scores nothing), summed over those rows and its group's heads.
    """
    num_kv_heads = kv_cache.shape[1]
    group = query.shape[1] // num_kv_heads
    _, score = slot_meta(kv_cache)
    starts = query_start_loc.tolist()
    for r, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[r], starts[r + 1]
        num_queries = q1 - q0
        if num_queries == 0:
            continue
        keys, values = gather_kv(kv_cache, block_table[r], seq_len)
        keys = keys.float().repeat_interleave(group, 0)  # [Hq, L, D]
        values = values.float().repeat_interleave(group, 0)
        q = query[q0:q1].transpose(0, 1).float()  # [Hq, n, D]
        logits = (q @ keys.transpose(1, 2)) * scale  # [Hq, n, L]
        rows = torch.arange(num_queries, device=q.device)[:, None]
        cols = torch.arange(seq_len, device=q.device)[None, :]
        # Row i sees slots j <= seq_len - n + i (bottom-right aligned causal mask).
        logits = logits.masked_fill(cols > rows + (seq_len - num_queries), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[q0:q1] = (probs @ values).transpose(0, 1).to(out.dtype)
        if score_window > 0:
            received = window_mass(probs, score_window, num_kv_heads)
            blocks, offsets = physical_span(kv_cache, block_table[r], 0, seq_len)
            score[blocks, :, offsets] += received.transpose(0, 1)


def window_mass(probs: torch.Tensor, score_window: int, num_kv_heads: int) -> torch.Tensor:
    """Attention ``[Hkv, L]`` each key received from the last ``score_window``
    query rows of ``probs [Hq, n, L]``, summed over rows and each GQA group."""
    num_q_heads, _, num_keys = probs.shape
    received = probs[:, -score_window:].sum(dim=1)
    return received.view(num_kv_heads, num_q_heads // num_kv_heads, num_keys).sum(dim=1)


def compact(kv_cache: torch.Tensor, block_row: torch.Tensor, kept_slots: torch.Tensor) -> None:
    """Move each KV head's kept slots ``kept_slots[h]`` (ascending, ``[Hkv, keep]``)
    of one request to its slots ``[0, keep)``, in order, and zero their scores."""
    num_kv_heads, keep = kept_slots.shape
    block_size = kv_cache.shape[2]
    heads = torch.arange(num_kv_heads, device=kv_cache.device)[:, None]
    src_blocks, src_offsets = physical_slots(block_row, kept_slots, block_size)
    kept = kv_cache[src_blocks, heads, src_offsets]  # a copy: sources may be overwritten
    dst_blocks, dst_offsets = physical_span(kv_cache, block_row, 0, keep)
    kv_cache[dst_blocks[None], heads, dst_offsets[None]] = kept
    _, score = slot_meta(kv_cache)
    score[dst_blocks, :, dst_offsets] = 0.0


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

# ---------------------------------------------------------------------------
# Revival: attention over exact slots plus the vague store, and compaction
# into it. A request's slots are laid out as
#     [0, exact_start)          vague-store pages (records, see stores/quantized.py)
#     [exact_start, seq_len)    exact slots in position order, this step's last
# ---------------------------------------------------------------------------


def write_slot_range(kv_cache: torch.Tensor, block_row: torch.Tensor, start: int,
                     slots: torch.Tensor) -> None:
    """Write ``slots [Hkv, n, W]`` (cache dtype) to one request's slots ``[start, start + n)``."""
    blocks, offsets = physical_span(kv_cache, block_row, start, start + slots.shape[1])
    kv_cache[blocks, :, offsets] = slots.transpose(0, 1)


def store_pages(kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int) -> torch.Tensor:
    """One request's vague-store pages, raw: ``uint8 [Hkv, exact_start, slot_bytes]``."""
    return slot_range(kv_cache, block_row, 0, exact_start).contiguous().view(torch.uint8)


def write_store_pages(kv_cache: torch.Tensor, block_row: torch.Tensor, pages: torch.Tensor) -> None:
    """Write ``pages uint8 [Hkv, P, slot_bytes]`` to one request's slots ``[0, P)``."""
    write_slot_range(kv_cache, block_row, 0, pages.view(kv_cache.dtype))


def head_seed(layer_seed: int, head: int) -> int:
    """Hash seed of one (layer, KV head); stores derive one per row from it."""
    return layer_seed * 1_000_003 + head


def paged_attention_revived(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    exact_start: torch.Tensor,
    seq_lens: torch.Tensor,
    vague_tokens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
    score_window: int,
    store,
    layer_seed: int,
) -> None:
    """One softmax per query over the request's revived vague tokens
    (reconstructed by ``store`` from its pages; all older than every query of the
    step) and its exact slots ``[exact_start, seq_len)`` (causal as in
    :func:`paged_attention`). Exact slots, and vague tokens where the store
    keeps importance, gain the attention they received from the last
    ``score_window`` query rows."""
    num_kv_heads = kv_cache.shape[1]
    group = query.shape[1] // num_kv_heads
    head_size = head_size_of(kv_cache)
    _, score = slot_meta(kv_cache)
    starts = query_start_loc.tolist()
    for r, (p, end, nv) in enumerate(zip(exact_start.tolist(), seq_lens.tolist(), vague_tokens.tolist())):
        q0, q1 = starts[r], starts[r + 1]
        n = q1 - q0
        if n == 0:
            continue
        exact = slot_range(kv_cache, block_table[r], p, end)
        keys, values = exact[..., :head_size].float(), exact[..., head_size : 2 * head_size].float()
        pages = store_pages(kv_cache, block_table[r], p) if nv else None
        if pages is not None:
            revived = [store.revive(pages[h], nv, head_seed(layer_seed, h)) for h in range(num_kv_heads)]
            keys = torch.cat([torch.stack([k for k, _ in revived]), keys], dim=1)
            values = torch.cat([torch.stack([v for _, v in revived]), values], dim=1)
        keys = keys.repeat_interleave(group, 0)
        values = values.repeat_interleave(group, 0)
        q = query[q0:q1].transpose(0, 1).float()
        logits = (q @ keys.transpose(1, 2)) * scale  # [Hq, n, nv + exact]
        num_exact = end - p
        rows = torch.arange(n, device=q.device)[:, None]
        cols = torch.arange(nv + num_exact, device=q.device)[None, :] - nv  # vague < 0
        logits = logits.masked_fill(cols > rows + (num_exact - n), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        out[q0:q1] = (probs @ values).transpose(0, 1).to(out.dtype)
        if score_window <= 0:
            continue
        received = window_mass(probs, score_window, num_kv_heads)
        blocks, offsets = physical_span(kv_cache, block_table[r], p, end)
        score[blocks, :, offsets] += received[:, nv:].transpose(0, 1)
        if pages is not None:
            updated = [store.add_attention(pages[h], nv, received[h, :nv]) for h in range(num_kv_heads)]
            if updated[0] is not None:
                write_store_pages(kv_cache, block_table[r], torch.stack(updated))


def compact_into_store(
    kv_cache: torch.Tensor,
    block_row: torch.Tensor,
    exact_start: int,
    seq_len: int,
    num_vague: int,
    kept_exact: torch.Tensor,
    keep_vague: int,
    store,
    layer_seed: int,
) -> None:
    """Per KV head: keep exact slots ``kept_exact[h]`` (indices into the exact
    range, ascending), demote the other exact tokens into the store, which keeps
    ``keep_vague`` tokens; then lay the request out again: store pages at
    ``[0, slots_for(keep_vague))``, kept exact slots right after, scores reset."""
    head_size = head_size_of(kv_cache)
    exact = slot_range(kv_cache, block_row, exact_start, seq_len)  # copies
    old_pages = store_pages(kv_cache, block_row, exact_start)
    positions, scores = slot_meta(exact)
    new_pages, new_exact = [], []
    for h in range(kv_cache.shape[1]):
        demoted = torch.ones(exact.shape[1], dtype=torch.bool)
        demoted[kept_exact[h]] = False
        new_pages.append(store.absorb(
            old_pages[h], num_vague,
            exact[h, demoted, :head_size], exact[h, demoted, head_size : 2 * head_size],
            positions[h, demoted], scores[h, demoted], keep_vague, head_seed(layer_seed, h),
        ))
        new_exact.append(exact[h, kept_exact[h]])
    write_store_pages(kv_cache, block_row, torch.stack(new_pages))
    kept = torch.stack(new_exact)
    first = store.slots_for(keep_vague)
    write_slot_range(kv_cache, block_row, first, kept)
    _, score = slot_meta(kv_cache)
    blocks, offsets = physical_span(kv_cache, block_row, first, first + kept.shape[1])
    score[blocks, :, offsets] = 0.0


# -- vague-store ops: quantized records ----------------------------------------
#
# A record is one token: [K codes | V codes | K scale, K min, V scale, V min
# (float16, one per group of ``group`` channels) | position int32 | score float32],
# key codes of ``bits`` bits and value codes of ``value_bits`` (0: ``bits``) packed
# little-endian, asymmetric min/max per group.

def record_bytes(head_size: int, bits: int, group: int, value_bits: int = 0) -> int:
    value_bits = value_bits or bits
    return head_size * (bits + value_bits) // 8 + 8 * (head_size // group) + META_BYTES


def quantize_groups(x: torch.Tensor, bits: int, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, D]`` -> codes ``uint8 [N, D]``, scale and min ``float16 [N, D / group]``."""
    levels = 2**bits - 1
    g = x.float().view(x.shape[0], x.shape[1] // group, group)
    lo = g.amin(dim=2).half()
    scale = ((g.amax(dim=2) - lo.float()) / levels).half()
    safe = scale.float().clamp(min=1e-8)
    codes = ((g - lo.float()[..., None]) / safe[..., None]).round().clamp(0, levels)
    return codes.to(torch.uint8).view(x.shape), scale, lo


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    g = codes.float().view(codes.shape[0], scale.shape[1], codes.shape[1] // scale.shape[1])
    return (g * scale.float()[..., None] + lo.float()[..., None]).view(codes.shape)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``uint8 [N, D]`` codes -> ``uint8 [N, D * bits / 8]`` little-endian bit stream."""
    n, d = codes.shape
    shifts = torch.arange(bits)
    stream = ((codes[..., None].long() >> shifts) & 1).view(n, d * bits // 8, 8)
    return (stream << torch.arange(8)).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    n = packed.shape[0]
    stream = ((packed[..., None].long() >> torch.arange(8)) & 1).view(n, packed.shape[1] * 8 // bits, bits)
    return (stream << torch.arange(bits)).sum(-1).to(torch.uint8)


def quantize_records(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scores: torch.Tensor, bits: int, group: int, value_bits: int = 0) -> torch.Tensor:
    """Records ``uint8 [N, record_bytes]`` of tokens ``keys/values [N, D]``."""
    n = keys.shape[0]
    value_bits = value_bits or bits
    kc, ks, kl = quantize_groups(keys, bits, group)
    vc, vs, vl = quantize_groups(values, value_bits, group)
    params = torch.stack([ks, kl, vs, vl], dim=1).view(torch.uint8).reshape(n, 8 * ks.shape[1])
    meta = torch.stack([positions.to(torch.int32), scores.float().view(torch.int32)], dim=1)
    return torch.cat(
        [pack_codes(kc, bits), pack_codes(vc, value_bits), params, meta.view(torch.uint8).reshape(n, 8)],
        dim=1,
    )


def dequantize_records(records: torch.Tensor, head_size: int, bits: int, group: int,
                       value_bits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``float32 [N, D]`` of records ``uint8 [N, record_bytes]``."""
    value_bits = value_bits or bits
    n, kb, vb = records.shape[0], head_size * bits // 8, head_size * value_bits // 8
    params = records[:, kb + vb : -META_BYTES].contiguous().view(torch.float16)
    params = params.view(n, 4, head_size // group)
    keys = dequantize_groups(unpack_codes(records[:, :kb], bits), params[:, 0], params[:, 1])
    values = dequantize_groups(unpack_codes(records[:, kb : kb + vb], value_bits),
                               params[:, 2], params[:, 3])
    return keys, values


# -- vague-store ops: count sketch ---------------------------------------------
#
# ``rows x buckets`` sums of signed tokens. Row r hashes position p with its
# coefficients (a, b, c, d) = coefficients[r] to bucket (a p + b) mod P mod
# buckets and sign 1 - 2 ((c p + d) mod P mod 2), P = 2**31 - 1.

SKETCH_PRIME = 2_147_483_647


def sketch_hashes(positions: torch.Tensor, coefficients: torch.Tensor, buckets: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket index (int64) and sign (float32) ``[rows, N]`` of each position."""
    p = positions.long()[None]
    a, b, c, d = (coefficients[:, i, None].long() for i in range(4))
    index = (a * p + b) % SKETCH_PRIME % buckets
    sign = 1 - 2 * ((c * p + d) % SKETCH_PRIME % 2)
    return index, sign.float()


def count_sketch_add(bucket_keys: torch.Tensor, bucket_values: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, positions: torch.Tensor,
                     coefficients: torch.Tensor) -> None:
    """Adds ``keys/values [N, D]``, signed, to their buckets of
    ``bucket_keys/bucket_values float32 [rows, buckets, D]`` (in place)."""
    index, sign = sketch_hashes(positions, coefficients, bucket_keys.shape[1])
    for r in range(bucket_keys.shape[0]):
        bucket_keys[r].index_add_(0, index[r], keys.float() * sign[r, :, None])
        bucket_values[r].index_add_(0, index[r], values.float() * sign[r, :, None])


def count_sketch_estimate(buckets: torch.Tensor, positions: torch.Tensor,
                          coefficients: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``s_r(p) * buckets[r, h_r(p)]``: ``float32 [N, D]``."""
    index, sign = sketch_hashes(positions, coefficients, buckets.shape[1])
    rows = torch.arange(buckets.shape[0])[:, None]
    return (buckets.float()[rows, index] * sign[..., None]).mean(dim=0)


def count_sketch_logits(query: torch.Tensor, bucket_keys: torch.Tensor, positions: torch.Tensor,
                        coefficients: torch.Tensor) -> torch.Tensor:
    """``query [Q, D]`` times every token's key estimate: ``float32 [Q, N]``,
    computed in bucket space (one dot product per bucket, then a gather per
    token), equal to ``query @ count_sketch_estimate(bucket_keys, ...).T``."""
    per_bucket = torch.einsum("qd,rbd->qrb", query.float(), bucket_keys.float())
    index, sign = sketch_hashes(positions, coefficients, bucket_keys.shape[1])
    rows = torch.arange(bucket_keys.shape[0])[:, None]
    return (per_bucket[:, rows, index] * sign).mean(dim=1)
