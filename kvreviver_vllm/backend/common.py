"""The KVReviver attention backend, shared by the CPU and CUDA classes.

Four pieces with vLLM's fixed roles: the backend class (static facts), the
metadata dataclass, the metadata builder (scheduler state -> tensors, once per
step) and the impl (the math, through ``kvreviver_vllm.ops``).

The impl writes the KV cache itself (``forward_includes_kv_cache_update``) at
physical slots the builder chooses: a request's exact tokens fill its slots
``[0, occupancy)`` in position order and each step's new tokens are appended.
At a request's first decode step, and whenever a decoding request outgrows its
budget (``kv_cache.py``), the builder schedules a compaction after the step and
the impl keeps the sink, the recent window and the best-scored tokens, moved to
the front of the request's slots. After its first decode step a request's slots
skip the blocks the manager freed (``KVReviverSpec.cut``). With compression off,
physical slots equal vLLM's positional slots.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvreviver_vllm import ops, policy, sketch
from kvreviver_vllm.config import KVReviverConfig
from kvreviver_vllm.kv_cache import Cut, KVReviverSpec, kvreviver_spec
from kvreviver_vllm.sketch import META_BYTES
from kvreviver_vllm.stores import VagueStore, make_store

# Under the "vllm" logger so messages show in vLLM's own log output.
logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "KVREVIVER"

# New tokens a decoding request takes between compactions (kv_cache.py): a
# compaction every ~32 steps costs little, and the room is ~1.5% of a 2k context.
DECODE_ROOM = 32

# The budget parameters of this process's engine. vLLM calls customize_spec
# without its config in scope, so the impls (built with the config in scope,
# before the KV spec is asked for) record them here.
_SPEC_PARAMS: dict[str, float | int] | None = None


def _remember_spec_params(vllm_config: VllmConfig, config: KVReviverConfig) -> None:
    global _SPEC_PARAMS
    _SPEC_PARAMS = dict(
        budget=float(config.budget),
        floor_tokens=config.sink + config.recent,
        decode_room=DECODE_ROOM,
    )


class KVReviverBackendBase(AttentionBackend):
    """Static facts of the backend; the platform subclasses add platform facts."""

    forward_includes_kv_cache_update: bool = True

    supported_dtypes: ClassVar[list[torch.dtype]] = [
        torch.float16,
        torch.bfloat16,
        torch.float32,
    ]
    # Low-precision KV dtypes would stack a second lossy store under ours.
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # Each block holds [num_kv_heads, block_size, K|V] contiguously.
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> KVReviverSpec:
        if _SPEC_PARAMS is None:
            raise RuntimeError("KVReviver attention layers must be built before their KV spec")
        return kvreviver_spec(spec, META_BYTES, **_SPEC_PARAMS)

    @staticmethod
    def get_impl_cls() -> type[KVReviverAttentionImpl]:
        return KVReviverAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVReviverMetadataBuilder]:
        return KVReviverMetadataBuilder


@dataclass
class KVReviverMetadata:
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32, on the host: per-request query row ranges."""
    exact_start: torch.Tensor
    """[num_reqs] int32, on the host: first exact slot (vague-store pages come before)."""
    seq_lens: torch.Tensor
    """[num_reqs] int32, on the host: end of the exact slots, this step's tokens included."""
    vague_tokens: torch.Tensor
    """[num_reqs] int32, on the host: tokens held in each request's vague store."""
    decoding: list[bool]
    """Per request: this step is one of its decode steps (not a prompt chunk)."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks] int32: the request's physical blocks in order."""
    slot_mapping: torch.Tensor
    """[num_actual_tokens] int64: global slot each new token is written to."""
    positions: torch.Tensor
    """[num_actual_tokens] int64: logical (RoPE) position of each new token."""
    score_window: int
    """Last query rows of each request whose attention adds to the slots'
    importance scores this step (0: none)."""
    compactions: list[tuple[int, int, int]]
    """(request row, exact tokens kept, vague tokens kept): compactions after attention."""
    rescored: list[tuple[int, int, int]]
    """(request row, first slot, end slot): a prompt chunk's older slots, whose scores are reset
    before attention, so the prompt's last chunk (its end, the question) alone
    ranks the prompt at the first decode step."""


class KVReviverMetadataBuilder(AttentionMetadataBuilder[KVReviverMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        assert isinstance(kv_cache_spec, KVReviverSpec), kv_cache_spec
        self.spec = kv_cache_spec
        config = KVReviverConfig.from_vllm_config(vllm_config)
        scores = config.variant != "streaming" and config.compresses(
            vllm_config.model_config.max_model_len
        )
        self.score_window = config.score_window if scores else 0
        self.protected = config.sink + config.recent
        self.candidates = config.candidates
        self.candidate_share = config.candidate_share
        self.store = make_store(
            config, kv_cache_spec.head_size, kv_cache_spec.state_content_size_bytes,
            kv_cache_spec.dtype,
        )
        # (vague tokens, exact tokens, cut) after the last step, by the request's
        # first block id (stable while it runs; prefix caching is off when
        # compressing). Cut: set by its first decode step, which brought it to
        # budget; the manager frees the cut's gap after that step.
        self.state: dict[int, tuple[int, int, Cut | None]] = {}

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KVReviverMetadata:
        cm = common_attn_metadata
        num_reqs = cm.num_reqs
        qsl = cm.query_start_loc_cpu[: num_reqs + 1]
        q_lens = (qsl[1:] - qsl[:-1]).tolist()
        logical_lens = cm.seq_lens[:num_reqs].cpu().tolist()
        block_table = cm.block_table_tensor[:num_reqs]
        table_host = block_table.cpu()
        first_blocks = table_host[:, 0].tolist()

        prefilling = (
            cm.is_prefilling[:num_reqs].tolist() if cm.is_prefilling is not None else [True] * num_reqs
        )

        exact_start, before, vague, compactions, decode_rows = [], [], [], [], []
        cuts: dict[int, Cut] = {}
        rescored: list[tuple[int, int, int]] = []
        for row, (q_len, logical, first) in enumerate(zip(q_lens, logical_lens, first_blocks)):
            # A request with no computed tokens starts (or, after preemption,
            # restarts) from an empty cache.
            num_vague, num_exact, cut = (0, 0, None) if logical == q_len else self.state[first]
            settled = cut is not None
            if settled and cut.gap:
                cuts[row] = cut
            pages = self.store.slots_for(num_vague) if num_vague else 0
            used = pages + num_exact + q_len
            held = self.spec.decode_slots(logical) if settled else logical
            if used > held:
                raise RuntimeError(f"KVReviver request row {row} needs {used} slots but holds {held}")
            exact_start.append(pages)
            before.append(pages + num_exact)
            vague.append(num_vague)
            num_exact += q_len
            # A decoding request gets one token per step until it finishes or is
            # preempted (which restarts it empty); anything else may get a chunk.
            # The manager tells a decode step apart the same way.
            decoding = q_len == 1 and not prefilling[row]
            decode_rows.append(decoding)
            if not decoding and not settled and used > q_len:
                rescored.append((row, pages, used - q_len))
            target = self.spec.compaction_target(used, logical, decoding, settled)
            if decoding and not settled:
                cut = self.spec.cut(logical - 1)
            if target is not None:
                num_exact, num_vague = policy.split_budget(
                    self.spec.budget_tokens(target), num_exact, num_vague,
                    self.protected, self.store, self.candidates, self.candidate_share,
                )
                compactions.append((row, num_exact, num_vague))
            self.state[first] = (num_vague, num_exact, cut)

        if cuts:  # skip the freed gaps: slot s is block s // block_size of the rest
            table_host = table_host.clone()
            width = table_host.shape[1]
            for row, cut in cuts.items():
                table_host[row, cut.kept : width - cut.gap] = table_host[row, cut.prompt_blocks :].clone()
            block_table = table_host.to(block_table.device)
        num_new = int(qsl[-1])
        token_row = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(q_lens))
        offset_in_step = torch.arange(num_new) - qsl[token_row].long()
        physical = torch.tensor(before, dtype=torch.long)[token_row] + offset_in_step
        block_size = self.spec.block_size
        slot_mapping = torch.full((cm.num_actual_tokens,), -1, dtype=torch.long)
        slot_mapping[:num_new] = (
            table_host[token_row, physical // block_size].long() * block_size
            + physical % block_size
        )
        positions = torch.zeros(cm.num_actual_tokens, dtype=torch.long)
        first_new = torch.tensor(logical_lens, dtype=torch.long) - torch.tensor(q_lens)
        positions[:num_new] = first_new[token_row] + offset_in_step
        device = block_table.device
        return KVReviverMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=qsl,
            exact_start=torch.tensor(exact_start, dtype=torch.int32),
            seq_lens=torch.tensor(before, dtype=torch.int32) + torch.tensor(q_lens, dtype=torch.int32),
            vague_tokens=torch.tensor(vague, dtype=torch.int32),
            decoding=decode_rows,
            block_table=block_table,
            slot_mapping=slot_mapping.to(device),
            positions=positions.to(device),
            score_window=self.score_window,
            compactions=compactions,
            rescored=rescored,
        )


class KVReviverAttentionImpl(AttentionImpl):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        sinks: torch.Tensor | None = None,
    ) -> None:
        unsupported = {
            "ALiBi slopes": alibi_slopes is not None,
            "sliding-window attention": sliding_window is not None,
            "logits soft-capping": bool(logits_soft_cap),
            "attention sinks": sinks is not None,
            f"attention type {attn_type!r}": attn_type != AttentionType.DECODER,
            "cross-layer KV sharing": kv_sharing_target_layer_name is not None,
        }
        refused = [name for name, present in unsupported.items() if present]
        if refused:
            raise NotImplementedError(
                f"The {BACKEND_NAME} attention backend does not support "
                f"{', '.join(refused)}; serve this model without "
                "--attention-backend kvreviver"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        vllm_config = get_current_vllm_config()
        self.config = KVReviverConfig.from_vllm_config(vllm_config)
        _remember_spec_params(vllm_config, self.config)
        # Set on the first forward, from the cache's slot size and the layer's name.
        self.bound = False
        self.store: VagueStore | None = None
        self.layer_seed = 0
        # Read by tests (through collective_rpc) to prove this impl ran.
        self.num_forward_calls = 0
        self.num_compactions = 0
        logger.info_once(
            "KVReviver attention impl in use (%s, %d query / %d KV heads, head size %d)",
            type(self).__qualname__, num_heads, num_kv_heads, head_size,
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: KVReviverMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query ``[T, Hq, D]``, key/value ``[T, Hkv, D]``,
        kv_cache ``[num_blocks, Hkv, block_size, slot width]``; writes ``output[:T]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                f"{BACKEND_NAME} does not support fused output quantization"
            )
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self.num_forward_calls += 1
        md = attn_metadata
        num_tokens = md.num_actual_tokens
        ops.write_kv(kv_cache, key[:num_tokens], value[:num_tokens], md.slot_mapping, md.positions)
        if not self.bound:
            self._bind(layer, kv_cache)
        for row, start, end in md.rescored:
            sketch.reset_scores(kv_cache, md.block_table[row], start, end)
        if md.vague_tokens.any():
            ops.paged_attention_revived(
                output[:num_tokens], query[:num_tokens], kv_cache, md.block_table,
                md.exact_start, md.seq_lens, md.vague_tokens, md.query_start_loc,
                self.scale, md.score_window, self.store, self.layer_seed,
            )
        else:
            ops.paged_attention(
                output[:num_tokens],
                query[:num_tokens],
                kv_cache,
                md.block_table,
                md.seq_lens,
                md.query_start_loc,
                self.scale,
                md.score_window,
            )
        for row, keep_exact, keep_vague in md.compactions:
            self._compact(kv_cache, md, row, keep_exact, keep_vague)
        return output

    def _bind(self, layer: AttentionLayer, kv_cache: torch.Tensor) -> None:
        """Build the variant's store for this cache; seed its hashes by layer name."""
        slot_bytes = kv_cache.shape[-1] * kv_cache.element_size()
        self.store = make_store(self.config, self.head_size, slot_bytes, kv_cache.dtype)
        self.layer_seed = zlib.crc32(layer.layer_name.encode())
        self.bound = True

    def _select(self, scores: torch.Tensor, keep_exact: int) -> torch.Tensor:
        """Exact slots ``[Hkv, keep_exact]`` to keep, out of the scored exact range."""
        return policy.select_kept(
            scores, keep_exact, self.config.sink, self.config.recent,
            by_score=self.config.variant != "streaming",
            pool=(self.config.pool_before, self.config.pool_after),
        )

    def _compact(self, kv_cache: torch.Tensor, md: KVReviverMetadata, row: int,
                 keep_exact: int, keep_vague: int) -> None:
        block_row = md.block_table[row]
        start, end = int(md.exact_start[row]), int(md.seq_lens[row])
        kept = self._select(ops.request_scores(kv_cache, block_row, end)[:, start:], keep_exact)
        if self.store is not None:
            ops.compact_into_store(
                kv_cache, block_row, start, end, int(md.vague_tokens[row]), kept, keep_vague,
                self.store, self.layer_seed,
            )
        else:
            ops.compact(kv_cache, block_row, kept)
        self.num_compactions += 1
