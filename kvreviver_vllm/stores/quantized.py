"""The low-bit per-token vague store (variant ``quantized``, the default).

Every token demoted from the exact cache is kept as a fixed-size *record*
(``layout.py``): keys and values quantized per token, asymmetric min/max, in
groups of 32 channels (16 where 32 does not divide the head size), key codes at
``bits`` bits and value codes at ``value_bits`` (the same by default), with the
token's position and score. Records are packed back to back into the request's
own paged slots, so revival needs no memory outside the request's blocks.

The records' semantics are :class:`reference.QuantizedRecords`; this store runs
them through the compiled ops: attention dequantizes records in registers inside
``paged_attention_quantized``, and a compaction is one ``compact_quantized`` call.
"""

from __future__ import annotations

import torch

from kvreviver_vllm import ops
from kvreviver_vllm.ops.reference import QuantizedRecords
from kvreviver_vllm.stores.base import VagueStore


class QuantizedStore(QuantizedRecords, VagueStore):

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor) -> torch.Tensor:
        return ops.quantize_records(keys, values, positions, scores, self.bits, self.group,
                                    self.value_bits)

    def decode(self, records: torch.Tensor):
        keys, values = ops.dequantize_records(records, self.head_size, self.bits, self.group,
                                              self.value_bits)
        return keys, values, *self.meta(records)

    def attend(self, out, query, kv_cache, block_table, exact_start, seq_lens, vague_tokens,
               query_start_loc, scale, score_window, layer_seed) -> None:
        ops.paged_attention_quantized(out, query, kv_cache, block_table, exact_start, seq_lens,
                                      vague_tokens, query_start_loc, scale, score_window,
                                      self.bits, self.group, self.value_bits)

    def compact(self, kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                keep_vague, layer_seed) -> None:
        ops.compact_quantized(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                              keep_vague, self.bits, self.group, self.value_bits,
                              self.pool_before, self.pool_after, self.pool_decay)
