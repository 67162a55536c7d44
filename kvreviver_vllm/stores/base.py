"""The interface every vague store implements.

A store lives in the first slots of a request's exact-slot space, per layer and
KV head, as raw bytes: ``pages uint8 [num_slots, slot_bytes]``. The backend calls
two methods per store, :meth:`VagueStore.attend` and :meth:`VagueStore.compact`,
which work on the whole paged cache. Their default runs the store-generic
reference routines over the per-head methods (``revive``, ``absorb``,
``add_attention``); a store with kernels of its own overrides them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from kvreviver_vllm.ops import reference


class VagueStore(ABC):
    slot_bytes: int

    @abstractmethod
    def slots_for(self, num_tokens: int) -> int:
        """Slots needed to hold ``num_tokens`` tokens (0 for none)."""

    @abstractmethod
    def capacity(self, num_slots: int) -> int:
        """Most tokens ``num_slots`` slots can hold."""

    # -- per head -------------------------------------------------------------
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

    # -- whole cache (what the backend calls) -----------------------------------
    def attend(self, out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
               block_table: torch.Tensor, exact_start: torch.Tensor, seq_lens: torch.Tensor,
               vague_tokens: torch.Tensor, query_start_loc: torch.Tensor, scale: float,
               score_window: int, layer_seed: int) -> None:
        """Attention over each request's revived store and exact slots
        (:func:`reference.revived_attention`)."""
        reference.revived_attention(out, query, kv_cache, block_table, exact_start, seq_lens,
                                    vague_tokens, query_start_loc, scale, score_window, self,
                                    layer_seed)

    def compact(self, kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int,
                seq_len: int, num_vague: int, kept_exact: torch.Tensor, keep_vague: int,
                layer_seed: int) -> None:
        """One request's compaction into the store (:func:`reference.compact_into_store`)."""
        reference.compact_into_store(kv_cache, block_row, exact_start, seq_len, num_vague,
                                     kept_exact, keep_vague, self, layer_seed)
