"""The low-bit per-token vague store (variant ``quantized``).

Every token demoted from the exact cache is kept as a fixed-size *record*:

    [ K codes | V codes | K (scale, min) per group | V (scale, min) per group | position | score ]

Keys and values are quantized per token, asymmetric min/max, in groups of
``group`` channels (32, or 16 where 32 does not divide the head size), key
codes packed little-endian at ``bits`` bits and value codes at ``value_bits``
(the same by default); scale and min are float16, position int32, score
float32 (``sketch.quantize_records``, compiled in ``csrc/``). Records are packed
back to back into the request's own paged slots (a record may straddle two slots, so no byte is
wasted), so revival needs no memory outside the request's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_vllm import ops, sketch
from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, pooled_scores
from kvreviver_vllm.stores.base import VagueStore


@dataclass(frozen=True)
class QuantizedStore(VagueStore):
    head_size: int
    bits: int
    slot_bytes: int
    value_bits: int = 0  # 0: ``bits``
    pool_before: int = POOL_BEFORE  # records rank by scores pooled as exact slots are
    pool_after: int = POOL_AFTER

    def __post_init__(self) -> None:
        object.__setattr__(self, "value_bits", self.value_bits or self.bits)

    @property
    def group(self) -> int:
        return 32 if self.head_size % 32 == 0 else 16

    @property
    def record_bytes(self) -> int:
        return sketch.record_bytes(self.head_size, self.bits, self.group, self.value_bits)

    def slots_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.record_bytes // self.slot_bytes)

    def capacity(self, num_slots: int) -> int:
        return max(0, num_slots) * self.slot_bytes // self.record_bytes

    # -- records (ops.quantize_records / ops.dequantize_records) ---------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, D]`` -> codes ``uint8 [N, D]``, scale and min ``float16 [N, G]``."""
        return sketch.quantize_groups(x, self.bits, self.group)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        return sketch.dequantize_groups(codes, scale, lo)

    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor) -> torch.Tensor:
        """Records ``uint8 [N, record_bytes]`` of tokens ``keys/values [N, D]``."""
        return ops.quantize_records(keys, values, positions, scores, self.bits, self.group,
                                    self.value_bits)

    def decode(self, records: torch.Tensor):
        """``(keys, values)`` float32 ``[N, D]``, positions int32 and scores float32 ``[N]``."""
        keys, values = ops.dequantize_records(records, self.head_size, self.bits, self.group,
                                              self.value_bits)
        return keys, values, *self.meta(records)

    @staticmethod
    def meta(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (int32) and scores (float32) ``[N]`` of records, read without
        unpacking their codes."""
        meta = records[:, -8:].contiguous().view(torch.int32)
        return meta[:, 0], meta[:, 1].view(torch.float32)

    def with_scores(self, records: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = records.clone()
        out[:, -4:] = scores.float().contiguous().view(torch.uint8).view(-1, 4)
        return out

    # -- pages ----------------------------------------------------------------
    def to_pages(self, records: torch.Tensor) -> torch.Tensor:
        """``[N, record_bytes]`` -> ``uint8 [slots_for(N), slot_bytes]``."""
        n = records.shape[0]
        pages = records.new_zeros(self.slots_for(n) * self.slot_bytes)
        pages[: n * self.record_bytes] = records.reshape(-1)
        return pages.view(-1, self.slot_bytes)

    def from_pages(self, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
        used = pages.reshape(-1)[: num_tokens * self.record_bytes]
        return used.view(num_tokens, self.record_bytes)

    # -- VagueStore -----------------------------------------------------------
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
        the last compaction, max-pooled over neighbouring records, so a needle's
        tokens survive together rather than its one most-attended token.
        ``ops.compact_into_store`` runs the same in one compiled op."""
        records = torch.cat(
            [self.from_pages(pages, num_tokens), self.encode(keys, values, positions, scores)]
        )
        rec_positions, rec_scores = self.meta(records)
        records = records[rec_positions.argsort()]
        _, rec_scores = self.meta(records)
        # A stable sort, so ties (pooling makes plateaus) go to the older record,
        # as in the compiled compaction.
        ranked = pooled_scores(rec_scores[None], self.pool_before, self.pool_after)[0]
        ranked = ranked.sort(descending=True, stable=True)
        best = ranked.indices[:keep].sort().values
        return self.to_pages(self.with_scores(records[best], torch.zeros(keep)))
