"""The interface every vague store implements.

A store lives in the first slots of a request's exact-slot space, per layer and
KV head, as raw bytes: ``pages uint8 [num_slots, slot_bytes]``. Every method works
on one head's pages; the caller reads and writes them in the paged cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class VagueStore(ABC):
    slot_bytes: int

    @abstractmethod
    def slots_for(self, num_tokens: int) -> int:
        """Slots needed to hold ``num_tokens`` tokens (0 for none)."""

    @abstractmethod
    def capacity(self, num_slots: int) -> int:
        """Most tokens ``num_slots`` slots can hold."""

    @abstractmethod
    def revive(self, pages: torch.Tensor, num_tokens: int, seed: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed keys and values ``float32 [num_tokens, D]``."""

    def add_attention(self, pages: torch.Tensor, num_tokens: int, received: torch.Tensor
                      ) -> torch.Tensor | None:
        """New pages with each token's importance grown by ``received``, or None
        when the store keeps no per-token importance."""
        return None

    @abstractmethod
    def absorb(self, pages: torch.Tensor, num_tokens: int, keys: torch.Tensor,
               values: torch.Tensor, positions: torch.Tensor, scores: torch.Tensor,
               keep: int, seed: int) -> torch.Tensor:
        """Pages ``[slots_for(keep), slot_bytes]`` holding ``keep`` tokens: the old
        ones and the demoted ``keys/values [N, D]``, the least useful dropped."""
