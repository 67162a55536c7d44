"""KV cache spec and block manager: a request holds at most its budget of blocks.

Sizing rule (one place, used by the scheduler's manager, the startup memory check
and the attention metadata builder, so the three always agree):

* ``budget_tokens(n)``: slots a request of ``n`` logical tokens keeps after a
  compaction (its budget, never below sink + recent, never above ``n``);
* ``limit_tokens(n) = round_up(budget_tokens(n) + staging, block_size)``: slots it
  may hold. The staging room takes the next step's new tokens (at most
  ``--max-num-batched-tokens`` of them) before the next compaction;
* the manager allocates ``min(n, limit_tokens(n))`` slots' worth of blocks.

The builder compacts a request whenever its occupancy plus the most tokens its
next step can bring (one while decoding, the staging room ``s`` otherwise) would
exceed ``limit_tokens(n)``: a decoding request down to ``budget_tokens(n)``, a
prompt chunk down to ``budget_tokens(n + s)``. Since a budget grows by at most
one slot per token, occupancy plus the next step's ``q <= s`` tokens then fits
in the ``held_tokens(n + q)`` slots the manager gives it. A request's first
decode step also compacts it to ``budget_tokens(n)``, so from its second output
token on it attends to at most its budget plus the tokens generated since.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from vllm.utils.math_utils import cdiv, round_up
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

if TYPE_CHECKING:
    from vllm.config import VllmConfig


@dataclass(frozen=True, kw_only=True)
class KVReviverSpec(FullAttentionSpec):
    budget: float = 1.0
    """Fraction of the context in (0, 1], or (> 1) a number of tokens."""
    floor_tokens: int = 0
    """Fewest slots kept after compaction (sink + recent)."""
    staging_tokens: int = 0
    """Room for one step's new tokens between compactions."""

    @property
    def prefix_cacheable(self) -> bool:
        # Compaction rewrites blocks, so their contents no longer match a hash.
        return False

    def budget_tokens(self, num_tokens: int) -> int:
        kept = int(self.budget) if self.budget > 1 else math.ceil(self.budget * num_tokens)
        # Sink + recent are never dropped, whatever the budget says.
        return min(num_tokens, max(kept, self.floor_tokens))

    def limit_tokens(self, num_tokens: int) -> int:
        return round_up(self.budget_tokens(num_tokens) + self.staging_tokens, self.block_size)

    def compaction_target(self, used: int, num_tokens: int, decoding: bool,
                          settled: bool) -> int | None:
        """The length whose ``budget_tokens`` a request is compacted to after this
        step, or None to leave it. ``used``: slots it holds with this step's
        tokens; ``num_tokens``: its logical length; ``settled``: whether it had
        a decode step before."""
        if decoding and not settled:
            # The prompt is whole and its end (the question) has scored every
            # token: now cut to the budget.
            return num_tokens if used > self.budget_tokens(num_tokens) else None
        next_tokens = 1 if decoding else self.staging_tokens
        if used + next_tokens <= self.limit_tokens(num_tokens):
            return None
        # A prompt chunk keeps all that the next chunk's cap leaves room for: its
        # tokens were scored without the prompt's end, so cut them least. A
        # decoding request goes back to its budget, leaving room to grow for
        # many steps.
        return num_tokens if decoding else num_tokens + next_tokens

    def held_tokens(self, num_tokens: int) -> int:
        """Slots the manager backs with blocks for a request of ``num_tokens``."""
        return min(num_tokens, self.limit_tokens(num_tokens))

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        max_len = vllm_config.model_config.max_model_len
        return cdiv(self.held_tokens(max_len), self.block_size) * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[KVReviverSpec]) -> KVReviverSpec:
        merged = super().merge(specs)  # rebuilds cls(...) with default budget fields
        own = [f.name for f in fields(cls) if f.name not in {g.name for g in fields(FullAttentionSpec)}]
        values = {name: getattr(specs[0], name) for name in own}
        assert all(getattr(s, name) == v for s in specs for name, v in values.items()), (
            "All KVReviver layers in a KV cache group must share one budget."
        )
        return cls(**{**{f.name: getattr(merged, f.name) for f in fields(merged) if f.init}, **values})


class KVReviverManager(FullAttentionManager):
    """Full-attention manager whose requests hold at most their budget of blocks."""

    kv_cache_spec: KVReviverSpec

    def _held(self, num_tokens: int) -> int:
        return self.kv_cache_spec.held_tokens(num_tokens)

    def get_num_blocks_to_allocate(
        self,
        request_id: str,
        num_tokens: int,
        new_computed_blocks,
        total_computed_tokens: int,
        num_local_computed_tokens: int,
        num_tokens_main_model: int,
        apply_admission_cap: bool = False,
        prefill_end: int = 0,
    ) -> int:
        return super().get_num_blocks_to_allocate(
            request_id,
            self._held(num_tokens),
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            self._held(num_tokens_main_model),
            apply_admission_cap,
            prefill_end,
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id, self._held(num_tokens), self._held(num_tokens_main_model)
        )


def kvreviver_spec(spec: AttentionSpec, meta_bytes: int, budget: float, floor_tokens: int,
                   staging_tokens: int) -> KVReviverSpec:
    """The layer's stock spec rebuilt with our slot size and budget."""
    dense = (spec.head_size + spec.head_size_v) * get_dtype_size(spec.dtype)
    return replace_as(
        spec,
        KVReviverSpec,
        state_content_bytes=dense + meta_bytes,
        budget=budget,
        floor_tokens=floor_tokens,
        staging_tokens=staging_tokens,
    )


def register_kv_cache_spec() -> None:
    """Register spec + manager with vLLM (every process; idempotent)."""
    # Registering into an empty registry would stop vLLM registering its built-ins.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVReviverSpec, KVReviverManager, uniform_type_base_spec=FullAttentionSpec
    )
