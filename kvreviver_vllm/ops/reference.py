"""Pure-PyTorch reference of every KVReviver op: the spec the kernels in ``csrc/`` match.

Written for clarity, not speed. Each op here has the name, signature and
semantics of the ``torch.ops.kvreviver`` op that ``kvreviver_vllm.ops`` wraps
(schemas: ``csrc/bindings.cpp``); byte layouts are in ``kvreviver_vllm.layout``.
Two store-generic routines (:func:`revived_attention`, :func:`compact_into_store`)
define attention and compaction for any vague store; the quantized store's ops
are those routines over :class:`QuantizedRecords`, the reference semantics of its
records. Importing this module needs torch only (no vLLM), so the GPU checks run
where vLLM is not installed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kvreviver_vllm.layout import (
    META_BYTES,
    gather_kv,
    head_seed,
    head_size_of,
    physical_slots,
    physical_span,
    record_bytes,
    record_group,
    record_meta,
    slot_meta,
    slot_range,
    store_pages,
    with_record_scores,
    write_slot_range,
    write_store_pages,
)
from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, POOL_DECAY, pooled_scores


def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, positions: torch.Tensor) -> None:
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


def paged_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, score_window: int) -> None:
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


def compact_slots(kv_cache: torch.Tensor, block_row: torch.Tensor, kept_slots: torch.Tensor) -> None:
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


def revived_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                      block_table: torch.Tensor, exact_start: torch.Tensor,
                      seq_lens: torch.Tensor, vague_tokens: torch.Tensor,
                      query_start_loc: torch.Tensor, scale: float, score_window: int, store,
                      layer_seed: int) -> None:
    """Attention over any vague store (``store``: ``revive``, ``add_attention``).

    One softmax per query over the request's revived vague tokens
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


def compact_into_store(kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int,
                       seq_len: int, num_vague: int, kept_exact: torch.Tensor, keep_vague: int,
                       store, layer_seed: int) -> None:
    """Compaction into any vague store (``store``: ``absorb``, ``slots_for``).

    Per KV head: keep exact slots ``kept_exact[h]`` (indices into the exact
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

def quantize_groups(x: torch.Tensor, bits: int, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [N, D]`` -> codes ``uint8 [N, D]``, scale and min ``float16 [N, D / group]``.

    Rounding rule (the one definition; the compiled kernels run it as
    ``quantize_group`` in csrc/common/quantize_group.h, CPU and CUDA alike):
    every step is one IEEE float32 operation rounded to nearest even -- the
    min rounded to fp16 first, the scale's ``max - lo`` and ``/ levels`` from
    that rounded min, then the scale rounded to fp16 -- and fp16 conversion and
    ``round`` are to nearest even: no fused multiply-add, no multiplication by
    a reciprocal, no fast-math. ``levels`` is a tensor, not a Python number:
    torch on CUDA divides by a CPU scalar as a multiplication by its
    reciprocal, which is not this rule.
    """
    levels = 2**bits - 1
    g = x.float().view(x.shape[0], x.shape[1] // group, group)
    lo = g.amin(dim=2).half()
    span = g.amax(dim=2) - lo.float()
    scale = (span / torch.full_like(span, levels)).half()
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


@dataclass(frozen=True)
class QuantizedRecords:
    """The quantized store's records in a head's pages, and its per-head
    semantics: the reference that ``paged_attention_quantized`` and
    ``compact_quantized`` are defined by. Records are packed back to back (one may
    straddle two slots, so no byte is wasted)."""

    head_size: int
    bits: int
    slot_bytes: int
    value_bits: int = 0  # 0: ``bits``
    pool_before: int = POOL_BEFORE  # records rank by scores pooled as exact slots are
    pool_after: int = POOL_AFTER
    group: int = 0  # 0: ``layout.record_group(head_size)``
    pool_decay: float = POOL_DECAY

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_bits", self.value_bits or self.bits)
        object.__setattr__(self, "group", self.group or record_group(self.head_size))

    @property
    def record_bytes(self) -> int:
        return record_bytes(self.head_size, self.bits, self.group, self.value_bits)

    def slots_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.record_bytes // self.slot_bytes)

    def capacity(self, num_slots: int) -> int:
        return max(0, num_slots) * self.slot_bytes // self.record_bytes

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor) -> torch.Tensor:
        """Records ``uint8 [N, record_bytes]`` of tokens ``keys/values [N, D]``."""
        return quantize_records(keys, values, positions, scores, self.bits, self.group,
                                self.value_bits)

    def decode(self, records: torch.Tensor):
        """``(keys, values)`` float32 ``[N, D]``, positions int32 and scores float32 ``[N]``."""
        keys, values = dequantize_records(records, self.head_size, self.bits, self.group,
                                          self.value_bits)
        return keys, values, *record_meta(records)

    meta = staticmethod(record_meta)
    with_scores = staticmethod(with_record_scores)

    def to_pages(self, records: torch.Tensor) -> torch.Tensor:
        """``[N, record_bytes]`` -> ``uint8 [slots_for(N), slot_bytes]``."""
        n = records.shape[0]
        pages = records.new_zeros(self.slots_for(n) * self.slot_bytes)
        pages[: n * self.record_bytes] = records.reshape(-1)
        return pages.view(-1, self.slot_bytes)

    def from_pages(self, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
        used = pages.reshape(-1)[: num_tokens * self.record_bytes]
        return used.view(num_tokens, self.record_bytes)

    def revive(self, pages: torch.Tensor, num_tokens: int, seed: int):
        keys, values, _, _ = self.decode(self.from_pages(pages, num_tokens))
        return keys, values

    def add_attention(self, pages: torch.Tensor, num_tokens: int, received: torch.Tensor):
        records = self.from_pages(pages, num_tokens)
        return self.to_pages(self.with_scores(records, self.meta(records)[1] + received))

    def absorb(self, pages, num_tokens, keys, values, positions, scores, keep, seed):
        """Old records plus the demoted tokens' records; the ``keep`` best survive,
        stored in position order with their importance reset. Records are ranked
        as exact slots are (:func:`policy.pooled_scores`): by the importance since
        the last compaction, pooled over neighbouring records, so a needle's
        tokens survive together rather than its one most-attended token."""
        records = torch.cat(
            [self.from_pages(pages, num_tokens), self.encode(keys, values, positions, scores)]
        )
        records = records[self.meta(records)[0].argsort()]
        _, rec_scores = self.meta(records)
        # A stable sort, so ties (pooling makes plateaus) go to the older record.
        ranked = pooled_scores(rec_scores[None], self.pool_before, self.pool_after,
                               self.pool_decay)[0]
        ranked = ranked.sort(descending=True, stable=True)
        best = ranked.indices[:keep].sort().values
        return self.to_pages(self.with_scores(records[best], torch.zeros(keep)))


def _records_of(kv_cache: torch.Tensor, bits: int, group: int, value_bits: int,
                pool_before: int = POOL_BEFORE, pool_after: int = POOL_AFTER,
                pool_decay: float = POOL_DECAY) -> QuantizedRecords:
    slot_bytes = kv_cache.shape[-1] * kv_cache.element_size()
    return QuantizedRecords(head_size_of(kv_cache), bits, slot_bytes, value_bits, pool_before,
                            pool_after, group, pool_decay)


def paged_attention_quantized(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                              block_table: torch.Tensor, exact_start: torch.Tensor,
                              seq_lens: torch.Tensor, vague_tokens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float, score_window: int,
                              bits: int, group: int, value_bits: int = 0) -> None:
    """:func:`revived_attention` over the quantized store's records."""
    revived_attention(out, query, kv_cache, block_table, exact_start, seq_lens, vague_tokens,
                      query_start_loc, scale, score_window,
                      _records_of(kv_cache, bits, group, value_bits), 0)


def compact_quantized(kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int,
                      seq_len: int, num_vague: int, kept_exact: torch.Tensor, keep_vague: int,
                      bits: int, group: int, value_bits: int, pool_before: int,
                      pool_after: int, pool_decay: float) -> None:
    """:func:`compact_into_store` into the quantized store's records, ranked by
    scores pooled ``pool_before`` / ``pool_after`` records each way, lending
    ``pool_decay`` of each score."""
    records = _records_of(kv_cache, bits, group, value_bits, pool_before, pool_after, pool_decay)
    compact_into_store(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                       keep_vague, records, 0)


# -- vague-store ops: count sketch ---------------------------------------------
#
# ``rows x buckets`` sums of signed tokens. Row r hashes position p with its
# coefficients (a, b, c, d) = coefficients[r] to bucket (a p + b) mod P mod
# buckets and sign 1 - 2 ((c p + d) mod P mod 2), P = 2**31 - 1.

SKETCH_PRIME = 2_147_483_647


def sketch_coefficients(rows: int, seed: int) -> torch.Tensor:
    """Hash coefficients ``int64 [rows, 4]`` of one (layer, KV head), each in [1, P)."""
    rng = random.Random(seed)
    return torch.tensor([[rng.randrange(1, SKETCH_PRIME) for _ in range(4)] for _ in range(rows)],
                        dtype=torch.int64)


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
