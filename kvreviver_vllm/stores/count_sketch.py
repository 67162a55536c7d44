"""The paper's Count Sketch vague store (variant ``sketch``).

``rows x buckets`` bucket slots, each holding one key vector and one value
vector (a slot of the cache dtype, like any token's), then the positions of the
tokens folded in, ``int32``, packed ``slot_bytes // 4`` to a slot. A token at
position ``p`` is added to bucket ``h_r(p)`` of every row ``r`` with sign
``s_r(p)``; it is revived as the mean over rows of ``s_r(p) * bucket[r, h_r(p)]``.
The mean is linear, so its logits can also be computed in bucket space (one dot
product per bucket, then a gather per token). Hashes are seeded per (layer, KV
head, row).

Bucket sums cannot forget a token: when the position list overflows the budget,
the oldest positions are dropped (those tokens are no longer revived) while
their contribution stays in the sums. Our prototype measured this store as far
worse than eviction; it exists so that the comparison is made in the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_vllm import ops
from kvreviver_vllm.ops import reference
from kvreviver_vllm.stores.base import VagueStore


@dataclass(frozen=True)
class CountSketchStore(VagueStore):
    head_size: int
    rows: int
    buckets: int
    slot_bytes: int
    dtype: torch.dtype

    @property
    def sketch_slots(self) -> int:
        return self.rows * self.buckets

    @property
    def positions_per_slot(self) -> int:
        return self.slot_bytes // 4

    def slots_for(self, num_tokens: int) -> int:
        if num_tokens == 0:
            return 0
        return self.sketch_slots + -(-num_tokens // self.positions_per_slot)

    def capacity(self, num_slots: int) -> int:
        return max(0, num_slots - self.sketch_slots) * self.positions_per_slot

    # -- hashing --------------------------------------------------------------
    def coefficients(self, seed: int) -> torch.Tensor:
        """Hash coefficients ``int64 [rows, 4]`` (see :func:`reference.sketch_hashes`)."""
        return reference.sketch_coefficients(self.rows, seed)

    def hashes(self, positions: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket index and sign ``[rows, N]`` of each position."""
        return reference.sketch_hashes(positions, self.coefficients(seed), self.buckets)

    # -- layout ---------------------------------------------------------------
    def bucket_sums(self, pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket keys and values ``float32 [rows, buckets, D]``, contiguous copies
        (``ops.count_sketch_add`` adds to them in place)."""
        sums = pages[: self.sketch_slots].contiguous().view(self.dtype).float()
        d = self.head_size
        shape = (self.rows, self.buckets, d)
        return (sums[:, :d].contiguous().view(shape),
                sums[:, d : 2 * d].contiguous().view(shape))

    def positions_of(self, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Positions of the tokens folded in, ascending."""
        return pages[self.sketch_slots :].contiguous().view(torch.int32).reshape(-1)[:num_tokens]

    def _pages(self, bucket_keys: torch.Tensor, bucket_values: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
        num_slots = self.slots_for(len(positions))
        pages = torch.zeros(num_slots, self.slot_bytes, dtype=torch.uint8)
        if num_slots == 0:
            return pages
        d = self.head_size
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        sums = torch.zeros(self.sketch_slots, self.slot_bytes // itemsize, dtype=self.dtype)
        sums[:, :d] = bucket_keys.reshape(-1, d).to(self.dtype)
        sums[:, d : 2 * d] = bucket_values.reshape(-1, d).to(self.dtype)
        pages[: self.sketch_slots] = sums.view(torch.uint8)
        packed = torch.zeros((num_slots - self.sketch_slots) * self.positions_per_slot, dtype=torch.int32)
        packed[: len(positions)] = positions.to(torch.int32)
        pages[self.sketch_slots :] = packed.view(torch.uint8).view(-1, self.slot_bytes)
        return pages

    # -- VagueStore -----------------------------------------------------------
    def estimate(self, buckets: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
        """Mean over rows of ``s_r(p) * bucket[r, h_r(p)]``: ``[N, D]``."""
        return ops.count_sketch_estimate(buckets, positions, self.coefficients(seed))

    def bucket_logits(self, query: torch.Tensor, bucket_keys: torch.Tensor,
                      positions: torch.Tensor, seed: int) -> torch.Tensor:
        """Logits ``query [Q, D] . key estimate`` for every token ``[Q, N]``, computed
        once per bucket and gathered per token (equal to ``query @ estimate().T``)."""
        return ops.count_sketch_logits(query, bucket_keys, positions, self.coefficients(seed))

    def revive(self, pages, num_tokens, seed):
        bucket_keys, bucket_values = self.bucket_sums(pages)
        positions = self.positions_of(pages, num_tokens)
        return (self.estimate(bucket_keys, positions, seed),
                self.estimate(bucket_values, positions, seed))

    def absorb(self, pages, num_tokens, keys, values, positions, scores, keep, seed):
        """Adds the demoted tokens to the sums; keeps the ``keep`` newest positions."""
        if num_tokens:
            bucket_keys, bucket_values = self.bucket_sums(pages)
            old_positions = self.positions_of(pages, num_tokens)
        else:
            bucket_keys = torch.zeros(self.rows, self.buckets, self.head_size)
            bucket_values = torch.zeros_like(bucket_keys)
            old_positions = positions[:0].to(torch.int32)
        ops.count_sketch_add(bucket_keys, bucket_values, keys, values, positions,
                             self.coefficients(seed))
        all_positions = torch.cat([old_positions, positions.to(torch.int32)]).sort().values
        return self._pages(bucket_keys, bucket_values, all_positions[len(all_positions) - keep :])
