"""Pure-PyTorch reference of every KVReviver op: the spec the compiled kernels match.

Written for clarity, not speed. Each function here has the same signature and
semantics as the op of the same name that ``ops.py`` exposes.

Paged cache layout (one layer): ``kv_cache[num_blocks, num_kv_heads, block_size, 2 * D]``;
token slot ``s`` lives at block ``s // block_size``, offset ``s % block_size``; its key
is ``[..., :D]`` and its value ``[..., D:]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def write_kv(
    kv_cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store ``key``/``value`` ``[T, Hkv, D]`` at their slots; slots < 0 are padding."""
    block_size = kv_cache.shape[2]
    head_size = key.shape[-1]
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        slot_mapping, key, value = slot_mapping[valid], key[valid], value[valid]
    blocks = slot_mapping // block_size
    offsets = slot_mapping % block_size
    kv_cache[blocks, :, offsets, :head_size] = key.to(kv_cache.dtype)
    kv_cache[blocks, :, offsets, head_size:] = value.to(kv_cache.dtype)


def gather_kv(
    kv_cache: torch.Tensor, block_row: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values ``[Hkv, num_tokens, D]`` of one request's first ``num_tokens`` slots."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    used = -(-num_tokens // block_size)
    kv = kv_cache[block_row[:used].long()]  # [used, Hkv, bs, 2D]
    kv = kv.transpose(0, 1).reshape(num_kv_heads, used * block_size, two_d)[:, :num_tokens]
    head_size = two_d // 2
    return kv[..., :head_size], kv[..., head_size:]


def paged_attention(
    out: torch.Tensor,
    query: torch.Tensor,
    kv_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    scale: float,
) -> None:
    """Causal attention of each request's queries over its paged context.

    ``query``/``out`` are ``[T, Hq, D]``; request ``r`` owns query rows
    ``query_start_loc[r]:query_start_loc[r+1]`` and ``seq_lens[r]`` context tokens
    (the new ones included). Query row ``i`` of a request with ``n`` queries sees
    context tokens ``[0, seq_len - n + i]``. GQA: query head ``h`` reads KV head
    ``h // (Hq // Hkv)``. Softmax and accumulation are in float32.
    """
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for r, seq_len in enumerate(lens):
        q0, q1 = starts[r], starts[r + 1]
        num_queries = q1 - q0
        if num_queries == 0:
            continue
        keys, values = gather_kv(kv_cache, block_table[r], seq_len)
        q = query[q0:q1].transpose(0, 1).float()  # [Hq, n, D]
        mask = None
        if num_queries > 1:
            # Row i sees keys j <= seq_len - n + i (bottom-right aligned causal mask).
            rows = torch.arange(num_queries, device=q.device)[:, None]
            cols = torch.arange(seq_len, device=q.device)[None, :]
            mask = cols <= rows + (seq_len - num_queries)
        attn = F.scaled_dot_product_attention(
            q,
            keys.float(),
            values.float(),
            attn_mask=mask,
            scale=scale,
            enable_gqa=True,
        )
        out[q0:q1] = attn.transpose(0, 1).to(out.dtype)
