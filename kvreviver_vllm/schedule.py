"""Scheduling of a compressed cache: KV spec, block manager and per-step plan.

A request holds its prompt while it reads it, then only its budget of blocks.
Sizing rule (one place, used by the scheduler's manager, the startup memory check
and the attention metadata builder, so they always agree):

* ``budget_tokens(n)``: slots a request of ``n`` logical tokens keeps after a
  compaction (its budget, never below sink + recent, never above ``n``);
* while its prompt is read (chunked or not) a request holds every prompt token
  exact: the prompt's end (the question) has not scored them yet, and cutting
  earlier drops what it will ask for (measured in README: multikey at 25%, 0/8
  against 5/8);
* its first decode step compacts it to ``budget_tokens(n)``; after that step has
  run, the manager frees the blocks past ``decode_limit(n)``, the slots a decoding
  request may fill (its budget plus ``decode_room`` new tokens, in whole blocks)
  before it is compacted back to its budget.

The freed blocks are a gap in the request's block list (vLLM's null block, as for
R-SWA); :meth:`KVReviverSpec.cut` says where it is, and the builder skips it when
it maps slots to blocks. A preempted request starts over and is cut again.

:func:`plan_request` is the builder's per-request decision for one step (where
its slots are, whether it compacts and to what); it is pure, so it is unit-tested
without an engine, and :func:`is_decode_step` is the one rule the manager and the
builder use to tell a decode step from a prompt chunk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch

from vllm.utils.math_utils import cdiv, round_up
from vllm.utils.torch_utils import get_dtype_size
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from kvreviver_vllm.config import KVReviverConfig, budget_tokens
from kvreviver_vllm.layout import META_BYTES

if TYPE_CHECKING:
    from vllm.config import VllmConfig

    from kvreviver_vllm.stores import VagueStore

# New tokens a decoding request takes between compactions: a compaction every
# ~32 steps costs little, and the room is ~1.5% of a 2k context.
DECODE_ROOM = 32


def is_decode_step(new_tokens: int, prompt_done: bool) -> bool:
    """A decoding request gets one token per step after its whole prompt, until it
    finishes or is preempted (which restarts it empty); anything else may get a
    chunk of its prompt (or, after a preemption, of its replayed output)."""
    return new_tokens == 1 and prompt_done


@dataclass(frozen=True)
class Cut:
    """Where a decoding request's block list skips the blocks freed after its
    first decode step: entries ``[kept, prompt_blocks)`` are vLLM's null block."""

    kept: int
    prompt_blocks: int

    @property
    def gap(self) -> int:
        return self.prompt_blocks - self.kept


@dataclass(frozen=True, kw_only=True)
class KVReviverSpec(FullAttentionSpec):
    budget: float = 1.0
    """Fraction of the context in (0, 1], or (> 1) a number of tokens."""
    floor_tokens: int = 0
    """Fewest slots kept after compaction (sink + recent)."""
    decode_room: int = 0
    """New tokens a decoding request takes between two compactions."""

    @property
    def prefix_cacheable(self) -> bool:
        # Compaction rewrites blocks, so their contents no longer match a hash.
        return False

    def budget_tokens(self, num_tokens: int) -> int:
        return budget_tokens(self.budget, num_tokens, self.floor_tokens)

    def decode_limit(self, num_tokens: int) -> int:
        """Slots a decoding request of ``num_tokens`` may fill before it is
        compacted back to its budget."""
        return round_up(self.budget_tokens(num_tokens) + self.decode_room, self.block_size)

    def decode_slots(self, num_tokens: int) -> int:
        """Slots the manager backs for a decoding request after its cut."""
        return min(num_tokens, self.decode_limit(num_tokens))

    def cut(self, prompt_end: int) -> Cut:
        """The gap of a request whose first decode step is logical token
        ``prompt_end`` (its prompt, or after a preemption its prompt and replayed
        output, is ``prompt_end`` tokens)."""
        prompt_blocks = cdiv(prompt_end + 1, self.block_size)
        kept = min(prompt_blocks, cdiv(self.decode_slots(prompt_end + 1), self.block_size))
        return Cut(kept, prompt_blocks)

    def num_entries(self, num_tokens: int, prompt_end: int | None) -> int:
        """Entries (real blocks and the gap) of a request's block list at
        ``num_tokens`` tokens; ``prompt_end`` None while the prompt is read."""
        if prompt_end is None or num_tokens <= prompt_end:
            return cdiv(num_tokens, self.block_size)
        cut = self.cut(prompt_end)
        live = cdiv(self.decode_slots(num_tokens), self.block_size)
        return cut.prompt_blocks + max(0, live - cut.kept)

    def compaction_target(self, used: int, num_tokens: int, decoding: bool,
                          settled: bool) -> int | None:
        """The length whose ``budget_tokens`` a request is compacted to after this
        step, or None to leave it. ``used``: slots it holds with this step's
        tokens; ``num_tokens``: its logical length; ``settled``: whether it had
        a decode step before."""
        if not decoding:
            return None  # the prompt stays whole until its end has scored it
        if not settled:
            return num_tokens if used > self.budget_tokens(num_tokens) else None
        return num_tokens if used + 1 > self.decode_limit(num_tokens) else None

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # A prompt of max_model_len tokens is held whole while it is read.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

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
    """Full-attention manager whose decoding requests hold only their budget.

    A request's block list grows as for full attention while its prompt is read.
    At its first decode step (one new token, its prompt computed: what the
    builder calls decoding) the manager records where the prompt ended; once
    that step has run, the blocks of :meth:`KVReviverSpec.cut`'s gap are freed,
    and later growth is appended after the gap."""

    kv_cache_spec: KVReviverSpec

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Request id -> its prompt length (vLLM hands it to remove_skipped_blocks
        # only, which runs first in every allocate_slots call).
        self.num_prompt: dict[str, int] = {}
        # Request id -> its prompt_end (see KVReviverSpec.cut), from its first
        # decode step until it is freed or preempted.
        self.prompt_end: dict[str, int] = {}

    def _entries_as_tokens(self, request_id: str, num_tokens: int) -> int:
        spec = self.kv_cache_spec
        return spec.num_entries(num_tokens, self.prompt_end.get(request_id)) * spec.block_size

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
        # A decode step as the builder sees one: one new token after the whole
        # prompt (a preempted request replaying its output is not decoding).
        # The admission check (apply_admission_cap) only asks whether a waiting
        # request fits.
        prompt_done = total_computed_tokens >= self.num_prompt.get(request_id, num_tokens)
        if (not apply_admission_cap and request_id not in self.prompt_end
                and request_id in self.req_to_blocks
                and is_decode_step(num_tokens - total_computed_tokens, prompt_done)):
            self.prompt_end[request_id] = total_computed_tokens
        return super().get_num_blocks_to_allocate(
            request_id,
            self._entries_as_tokens(request_id, num_tokens),
            new_computed_blocks,
            total_computed_tokens,
            num_local_computed_tokens,
            self._entries_as_tokens(request_id, num_tokens_main_model),
            apply_admission_cap,
            prefill_end,
        )

    def allocate_new_blocks(self, request_id: str, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id,
            self._entries_as_tokens(request_id, num_tokens),
            self._entries_as_tokens(request_id, num_tokens_main_model),
        )

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is not None:
            self.num_prompt[request_id] = num_prompt_tokens
        prompt_end = self.prompt_end.get(request_id)
        # Past prompt_end: the first decode step, which compacts the request
        # out of the gap, has run (processed tokens exclude in-flight steps).
        if prompt_end is not None and processed_computed_tokens > prompt_end:
            cut = self.kv_cache_spec.cut(prompt_end)
            self._remove_blocks_in_range(request_id, cut.kept, cut.prompt_blocks)

    def pop_blocks_for_free(self, request_id: str):
        self.prompt_end.pop(request_id, None)
        self.num_prompt.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def kvreviver_spec(spec: AttentionSpec, config: KVReviverConfig) -> KVReviverSpec:
    """The layer's stock spec rebuilt with our slot size and budget."""
    dense = (spec.head_size + spec.head_size_v) * get_dtype_size(spec.dtype)
    return replace_as(
        spec,
        KVReviverSpec,
        state_content_bytes=dense + META_BYTES,
        budget=float(config.budget),
        floor_tokens=config.floor_tokens,
        decode_room=DECODE_ROOM,
    )


def register_kv_cache_spec() -> None:
    """Register spec + manager with vLLM (every process; idempotent)."""
    # Registering into an empty registry would stop vLLM registering its built-ins.
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        KVReviverSpec, KVReviverManager, uniform_type_base_spec=FullAttentionSpec
    )


# -- the builder's plan for one request and step --------------------------------

@dataclass(frozen=True)
class RequestState:
    """What a request holds after a step: tokens in its vague store, exact slots,
    and the gap in its block list (set by its first decode step)."""

    vague: int = 0
    exact: int = 0
    cut: Cut | None = None


@dataclass(frozen=True)
class RequestPlan:
    """One request's layout and actions in one step."""

    exact_start: int
    """First exact slot: the store's pages fill ``[0, exact_start)``."""
    write_start: int
    """Slot of this step's first new token (after the exact slots it holds)."""
    vague: int
    """Tokens in the vague store during this step."""
    decoding: bool
    rescore: tuple[int, int] | None
    """Slots whose scores are reset before attention: a prompt chunk's older
    slots, so that the prompt's last chunk (its end, the question) alone ranks
    the prompt at the first decode step."""
    compaction: tuple[int, int] | None
    """(exact tokens kept, vague tokens kept) by a compaction after attention."""
    gap: Cut | None
    """The freed blocks this step's block-table row skips."""
    after: RequestState


def plan_request(
    spec: KVReviverSpec,
    state: RequestState | None,
    new_tokens: int,
    num_tokens: int,
    prompt_done: bool,
    store: VagueStore | None,
    split: Callable[[int, int, int], tuple[int, int]],
) -> RequestPlan:
    """The plan of a request that gets ``new_tokens`` this step, bringing it to
    ``num_tokens`` logical tokens; ``state`` is what it held after its last step
    (None: it starts, or after a preemption restarts, from an empty cache);
    ``split(budget_slots, exact, vague)`` is the budget split
    (:func:`policy.split_budget` with the engine's settings)."""
    if state is None or num_tokens == new_tokens:
        state = RequestState()
    settled = state.cut is not None
    pages = store.slots_for(state.vague) if state.vague else 0
    used = pages + state.exact + new_tokens
    held = spec.decode_slots(num_tokens) if settled else num_tokens
    if used > held:
        raise RuntimeError(f"KVReviver request needs {used} slots but holds {held}")
    decoding = is_decode_step(new_tokens, prompt_done)
    rescore = None
    if not decoding and not settled and used > new_tokens:
        rescore = (pages, used - new_tokens)
    cut = state.cut
    target = spec.compaction_target(used, num_tokens, decoding, settled)
    if decoding and not settled:
        cut = spec.cut(num_tokens - 1)
    exact, vague, compaction = state.exact + new_tokens, state.vague, None
    if target is not None:
        exact, vague = split(spec.budget_tokens(target), exact, vague)
        compaction = (exact, vague)
    return RequestPlan(
        exact_start=pages,
        write_start=pages + state.exact,
        vague=state.vague,
        decoding=decoding,
        rescore=rescore,
        compaction=compaction,
        gap=state.cut if settled and state.cut.gap else None,
        after=RequestState(vague, exact, cut),
    )


def skip_gaps(block_table: torch.Tensor, gaps: dict[int, Cut]) -> torch.Tensor:
    """``block_table`` (host) with each row's gap removed, so that slot ``s`` of
    row ``r`` is in block ``s // block_size`` of the row (a copy if any gap)."""
    if not gaps:
        return block_table
    table = block_table.clone()
    width = table.shape[1]
    for row, cut in gaps.items():
        table[row, cut.kept : width - cut.gap] = block_table[row, cut.prompt_blocks :]
    return table


def map_slots(block_table: torch.Tensor, query_start_loc: torch.Tensor, write_start: list[int],
              block_size: int, num_slots: int) -> torch.Tensor:
    """Global slot ``int64 [num_slots]`` of every new token (-1: padding): request
    ``r``'s tokens go to its slots from ``write_start[r]`` on, through its row of
    ``block_table`` (host, gaps removed)."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    num_new = int(query_start_loc[-1])
    token_row = torch.repeat_interleave(torch.arange(len(write_start)), q_lens)
    offset = torch.arange(num_new) - query_start_loc[token_row].long()
    physical = torch.tensor(write_start, dtype=torch.long)[token_row] + offset
    slots = torch.full((num_slots,), -1, dtype=torch.long)
    slots[:num_new] = (block_table[token_row, physical // block_size].long() * block_size
                       + physical % block_size)
    return slots
