"""Mixed bit widths by score (variant ``quantized`` with ``low_bits`` set).

A research store, PyTorch only (it runs through the reference attention and
compaction ops): of the ``n`` records a head keeps, the best-ranked
``ceil(high_share * n)`` are ``bits``-bit records, the rest ``low_bits``-bit,
laid out back to back as ``[high records | low records]``, each part in
position order. It asks whether holding more of the prompt at a coarser width
beats holding fewer tokens at one width when the store cannot hold them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, POOL_DECAY, pooled_scores
from kvreviver_vllm.stores.base import VagueStore
from kvreviver_vllm.stores.quantized import QuantizedStore


@dataclass(frozen=True)
class MixedQuantizedStore(VagueStore):
    head_size: int
    bits: int
    low_bits: int
    high_share: float
    slot_bytes: int
    pool_before: int = POOL_BEFORE
    pool_after: int = POOL_AFTER
    pool_decay: float = POOL_DECAY

    @property
    def high(self) -> QuantizedStore:
        return QuantizedStore(self.head_size, self.bits, self.slot_bytes)

    @property
    def low(self) -> QuantizedStore:
        return QuantizedStore(self.head_size, self.low_bits, self.slot_bytes)

    def split(self, num_tokens: int) -> tuple[int, int]:
        """(high-width, low-width) records of a store holding ``num_tokens``."""
        num_high = min(num_tokens, math.ceil(self.high_share * num_tokens))
        return num_high, num_tokens - num_high

    def _bytes(self, num_tokens: int) -> int:
        num_high, num_low = self.split(num_tokens)
        return num_high * self.high.record_bytes + num_low * self.low.record_bytes

    def slots_for(self, num_tokens: int) -> int:
        return -(-self._bytes(num_tokens) // self.slot_bytes)

    def capacity(self, num_slots: int) -> int:
        room = max(0, num_slots) * self.slot_bytes
        n = room // self.low.record_bytes  # an upper bound: every record low-width
        while n > 0 and self._bytes(n) > room:
            n -= 1
        return n

    # -- pages ------------------------------------------------------------------
    def _parts(self, pages: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        num_high, num_low = self.split(num_tokens)
        flat = pages.reshape(-1)
        cut = num_high * self.high.record_bytes
        high = flat[:cut].view(num_high, self.high.record_bytes)
        low = flat[cut : cut + num_low * self.low.record_bytes].view(num_low, self.low.record_bytes)
        return high, low

    def _to_pages(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        num = high.shape[0] + low.shape[0]
        pages = high.new_zeros(self.slots_for(num) * self.slot_bytes)
        cut = high.numel()
        pages[:cut] = high.reshape(-1)
        pages[cut : cut + low.numel()] = low.reshape(-1)
        return pages.view(-1, self.slot_bytes)

    # -- VagueStore ---------------------------------------------------------------
    def revive(self, pages, num_tokens, seed):
        """Keys and values in page order: the high-width records, then the low."""
        high, low = self._parts(pages, num_tokens)
        kh, vh, _, _ = self.high.decode(high)
        kl, vl, _, _ = self.low.decode(low)
        return torch.cat([kh, kl]), torch.cat([vh, vl])

    def add_attention(self, pages, num_tokens, received):
        high, low = self._parts(pages, num_tokens)
        num_high = high.shape[0]
        high = self.high.with_scores(high, self.high.meta(high)[1] + received[:num_high])
        low = self.low.with_scores(low, self.low.meta(low)[1] + received[num_high:])
        return self._to_pages(high, low)

    def absorb(self, pages, num_tokens, keys, values, positions, scores, keep, seed):
        """Old records (revived) plus the demoted tokens; the ``keep`` best by
        pooled score survive (as in :class:`QuantizedStore`), the best
        ``split(keep)[0]`` of them at the high width, importance reset."""
        high, low = self._parts(pages, num_tokens)
        parts = [self.high.decode(high), self.low.decode(low)]
        all_keys = torch.cat([p[0] for p in parts] + [keys.float()])
        all_values = torch.cat([p[1] for p in parts] + [values.float()])
        all_pos = torch.cat([p[2] for p in parts] + [positions.to(torch.int32)])
        all_scores = torch.cat([p[3] for p in parts] + [scores.float()])
        order = all_pos.argsort()
        pooled = pooled_scores(all_scores[order][None], self.pool_before, self.pool_after,
                               self.pool_decay)[0]
        ranked = pooled.sort(descending=True, stable=True).indices[:keep]
        num_high, _ = self.split(keep)
        is_high = torch.zeros(order.shape[0], dtype=torch.bool)
        is_high[ranked[:num_high]] = True
        kept = torch.zeros_like(is_high)
        kept[ranked] = True

        def encode(store: QuantizedStore, chosen: torch.Tensor) -> torch.Tensor:
            idx = order[chosen]  # ascending positions
            return store.encode(all_keys[idx], all_values[idx], all_pos[idx],
                                torch.zeros(idx.shape[0]))

        return self._to_pages(encode(self.high, is_high), encode(self.low, kept & ~is_high))
