"""The KVReviver attention backend: vLLM's four pieces in one file.

The backend class (static facts), the metadata dataclass, the metadata builder
(scheduler state -> tensors, once per step, through ``schedule.plan_request``)
and the impl (the math, through the request's vague store and ``ops``). One
class serves CPU and CUDA: the torch dispatcher picks each op's kernel by device.

The impl writes the KV cache itself (``forward_includes_kv_cache_update``) at
physical slots the builder chooses: a request's exact tokens fill its slots
``[exact_start, ...)`` in position order and each step's new tokens are
appended. At a request's first decode step, and whenever a decoding request
outgrows its budget (``schedule.py``), the builder plans a compaction after the
step, and the impl keeps the sink, the recent window and the best-scored
tokens exact, the store keeping what fits of the rest. With compression off,
physical slots equal vLLM's positional slots.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig, get_current_vllm_config, get_current_vllm_config_or_none
from vllm.logger import init_logger
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionLayer,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from kvreviver_vllm import layout, ops, policy, rotation
from kvreviver_vllm.config import KVReviverConfig
from kvreviver_vllm.plugin import BACKEND_NAME
from kvreviver_vllm.schedule import (
    KVReviverSpec,
    RequestState,
    kvreviver_spec,
    map_slots,
    plan_request,
    skip_gaps,
)
from kvreviver_vllm.stores import QuantizedStore, VagueStore, make_store
from kvreviver_vllm.vllm_fixes import install_seeded_sampling_fix

# Under the "vllm" logger so messages show in vLLM's own log output.
logger = init_logger(f"vllm.{__name__}")


class KVReviverBackend(AttentionBackend):
    """Static facts of the backend."""

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

    # The config of this process's engine, for customize_spec: vLLM's worker asks
    # for the KV spec with no config in scope, after building the attention
    # layers, whose impls record it here.
    engine_config: ClassVar[KVReviverConfig | None] = None

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> KVReviverSpec:
        vllm_config = get_current_vllm_config_or_none()
        if vllm_config is not None:
            config = KVReviverConfig.from_vllm_config(vllm_config)
        elif cls.engine_config is not None:
            config = cls.engine_config
        else:
            raise RuntimeError("KVReviver's KV spec needs the engine's config: build the "
                               "attention layers first")
        return kvreviver_spec(spec, config)

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
    # No full CUDA graphs: a replay would repeat the captured step's host plan
    # (which requests compact this step, the block table's gaps, each request's
    # exact/vague split) on every later step, and forward branches on that plan
    # and compacts in place. vLLM resolves its FULL_AND_PIECEWISE default to
    # PIECEWISE: graphs around attention, this backend's attention run eagerly
    # between them (tests/unit/test_plugin.py). Full decode graphs would need
    # compaction moved out of the captured step and the plan in device buffers.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

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
        scores = config.ranks_by_score and config.compresses(vllm_config.model_config.max_model_len)
        self.score_window = config.score_window if scores else 0
        self.store = make_store(
            config, kv_cache_spec.head_size, kv_cache_spec.state_content_size_bytes,
            kv_cache_spec.dtype,
        )
        self.split = functools.partial(
            policy.split_budget, protected=config.floor_tokens, store=self.store,
            candidates=config.candidates, candidate_share=config.candidate_share,
        )
        # What each running request holds after its last step, by its first
        # block id (stable while it runs; prefix caching is off when compressing).
        self.state: dict[int, RequestState] = {}

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
        num_tokens = cm.seq_lens[:num_reqs].cpu().tolist()
        table_host = cm.block_table_tensor[:num_reqs].cpu()
        prefilling = (
            cm.is_prefilling[:num_reqs].tolist() if cm.is_prefilling is not None else [True] * num_reqs
        )
        plans = []
        for row, first in enumerate(table_host[:, 0].tolist()):
            plan = plan_request(self.spec, self.state.get(first), q_lens[row], num_tokens[row],
                                not prefilling[row], self.store, self.split)
            self.state[first] = plan.after
            plans.append(plan)

        gaps = {row: plan.gap for row, plan in enumerate(plans) if plan.gap is not None}
        block_table = cm.block_table_tensor[:num_reqs]
        if gaps:
            table_host = skip_gaps(table_host, gaps)
            block_table = table_host.to(block_table.device)
        write_start = [plan.write_start for plan in plans]
        slot_mapping = map_slots(table_host, qsl, write_start, self.spec.block_size,
                                 cm.num_actual_tokens)
        # Logical (RoPE) positions: each request's new tokens end at its length.
        num_new = int(qsl[-1])
        token_row = torch.repeat_interleave(torch.arange(num_reqs), torch.tensor(q_lens))
        positions = torch.zeros(cm.num_actual_tokens, dtype=torch.long)
        positions[:num_new] = (torch.tensor(num_tokens)[token_row] - qsl[token_row + 1]
                               + torch.arange(num_new))
        device = block_table.device
        return KVReviverMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            query_start_loc=qsl,
            exact_start=torch.tensor([plan.exact_start for plan in plans], dtype=torch.int32),
            seq_lens=torch.tensor(write_start, dtype=torch.int32) + torch.tensor(q_lens, dtype=torch.int32),
            vague_tokens=torch.tensor([plan.vague for plan in plans], dtype=torch.int32),
            decoding=[plan.decoding for plan in plans],
            block_table=block_table,
            slot_mapping=slot_mapping.to(device),
            positions=positions.to(device),
            score_window=self.score_window,
            compactions=[(row, *plan.compaction) for row, plan in enumerate(plans)
                         if plan.compaction is not None],
            rescored=[(row, *plan.rescore) for row, plan in enumerate(plans)
                      if plan.rescore is not None],
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
        KVReviverBackend.engine_config = self.config
        # [D, D] where the cache holds rotated heads (moved to the cache's device at bind).
        self.rotation = (rotation.rotation_matrix(head_size)
                         if self.config.rotates(vllm_config.model_config.max_model_len) else None)
        install_seeded_sampling_fix()
        # Set on the first forward, from the cache's slot size, device and the layer's name.
        self.bound = False
        self.store: VagueStore | None = None
        self.layer_seed = 0
        self.triton = None  # (ops.triton_decode, ops.triton_prefill) where attention runs Triton
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
        md = attn_metadata
        num_tokens = md.num_actual_tokens
        if not self.bound:
            self._bind(layer, kv_cache)
        query, key, value = query[:num_tokens], key[:num_tokens], value[:num_tokens]
        if self.rotation is not None:  # the cache holds rotated heads (rotation.py)
            query, key, value = (rotation.rotate(x, self.rotation) for x in (query, key, value))
        ops.write_kv(kv_cache, key, value, md.slot_mapping, md.positions)
        for row, start, end in md.rescored:
            layout.reset_scores(kv_cache, md.block_table[row], start, end)
        if self.triton is not None and self._attend_with_triton(
                output[:num_tokens], query, kv_cache, md):
            pass
        elif md.vague_tokens.any():
            self.store.attend(
                output[:num_tokens], query, kv_cache, md.block_table,
                md.exact_start, md.seq_lens, md.vague_tokens, md.query_start_loc,
                self.scale, md.score_window, self.layer_seed,
            )
        else:
            ops.paged_attention(
                output[:num_tokens],
                query,
                kv_cache,
                md.block_table,
                md.seq_lens,
                md.query_start_loc,
                self.scale,
                md.score_window,
            )
        if self.rotation is not None:
            output[:num_tokens] = rotation.rotate(output[:num_tokens], self.rotation.T)
        for row, keep_exact, keep_vague in md.compactions:
            self.compact(kv_cache, md, row, keep_exact, keep_vague)
        return output

    def _bind(self, layer: AttentionLayer, kv_cache: torch.Tensor) -> None:
        """Build the variant's store for this cache, seed its hashes by layer
        name, and pick the decode kernel for the cache's device."""
        slot_bytes = kv_cache.shape[-1] * kv_cache.element_size()
        self.store = make_store(self.config, self.head_size, slot_bytes, kv_cache.dtype)
        self.layer_seed = zlib.crc32(layer.layer_name.encode())
        if self.rotation is not None:
            self.rotation = self.rotation.to(kv_cache.device)
        if self.config.uses_triton(kv_cache.device.type):
            # Needs triton: imported only here.
            from kvreviver_vllm.ops import triton_decode, triton_prefill

            self.triton = (triton_decode, triton_prefill)
            logger.info_once("KVReviver attention runs the Triton kernels")
        self.bound = True

    def _attend_with_triton(self, out: torch.Tensor, query: torch.Tensor,
                            kv_cache: torch.Tensor, md: KVReviverMetadata) -> bool:
        """The step through the Triton kernels: decode rows by flash-decoding
        (exact slots, or revival of the quantized store), prompt chunks by
        FlashAttention over their exact slots (a request holds no records while
        it reads its prompt). False where they do not apply (a store other than
        the quantized one holds tokens): the caller runs the compiled path."""
        decoding = torch.tensor(md.decoding)
        prompts = (~decoding).nonzero().flatten()
        if md.vague_tokens[prompts].any() or (
                md.vague_tokens.any() and not isinstance(self.store, QuantizedStore)):
            return False
        triton_decode, triton_prefill = self.triton
        device = kv_cache.device
        seq_lens = md.seq_lens.to(device, non_blocking=True)
        if len(prompts):
            q_lens = md.query_start_loc[1:] - md.query_start_loc[:-1]
            triton_prefill.paged_prefill_attention(
                out, query, kv_cache, md.block_table, seq_lens,
                md.query_start_loc.to(device, non_blocking=True), self.scale, md.score_window,
                prompts.to(device=device, dtype=torch.int32, non_blocking=True),
                int(q_lens[prompts].max()), int(md.seq_lens[prompts].max()))
        decodes = decoding.nonzero().flatten()
        if len(decodes) == 0:
            return True
        if len(prompts):  # the decode rows, gathered: one query row per request
            rows = md.query_start_loc[decodes].to(device, non_blocking=True)
            dev_decodes = decodes.to(device, non_blocking=True)
            dec_out = torch.empty_like(out[rows])
            self._decode_rows(triton_decode, dec_out, query[rows], kv_cache, md, decodes,
                              md.block_table[dev_decodes], seq_lens[dev_decodes])
            out[rows] = dec_out
        else:
            self._decode_rows(triton_decode, out, query, kv_cache, md, decodes, md.block_table,
                              seq_lens)
        return True

    def _decode_rows(self, triton_decode, out: torch.Tensor, query: torch.Tensor,
                     kv_cache: torch.Tensor, md: KVReviverMetadata, decodes: torch.Tensor,
                     block_table: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Flash-decoding of requests ``decodes`` (host indices), whose query
        rows are ``query`` in that order."""
        device = kv_cache.device
        vague = md.vague_tokens[decodes]
        max_len = int(md.seq_lens[decodes].max())  # host metadata: no device sync
        if not vague.any():
            triton_decode.paged_decode_attention(out, query, kv_cache, block_table, seq_lens,
                                                 self.scale, md.score_window,
                                                 max_seq_len=max_len)
            return
        store = self.store
        exact_start = md.exact_start[decodes]
        triton_decode.paged_decode_attention_quantized(
            out, query, kv_cache, block_table, exact_start.to(device, non_blocking=True),
            seq_lens, vague.to(device, non_blocking=True), self.scale, md.score_window,
            store.bits, store.group, store.value_bits,
            max_tokens=int((md.seq_lens[decodes] - exact_start + vague).max()),
        )

    def select_kept(self, scores: torch.Tensor, keep_exact: int) -> torch.Tensor:
        """Exact slots ``[Hkv, keep_exact]`` to keep, out of the scored exact range."""
        return policy.select_kept(
            scores, keep_exact, self.config.sink, self.config.recent,
            by_score=self.config.ranks_by_score,
            pool=(self.config.pool_before, self.config.pool_after, self.config.pool_decay),
        )

    def compact(self, kv_cache: torch.Tensor, md: KVReviverMetadata, row: int,
                keep_exact: int, keep_vague: int) -> None:
        """Bring request ``row`` to ``keep_exact`` exact and ``keep_vague`` vague tokens."""
        block_row = md.block_table[row]
        start, end = int(md.exact_start[row]), int(md.seq_lens[row])
        scores = layout.request_scores(kv_cache, block_row, end)[:, start:]
        kept = self.select_kept(scores, keep_exact)
        if self.store is None:
            ops.compact_slots(kv_cache, block_row, kept)
        else:
            self.store.compact(kv_cache, block_row, start, end, int(md.vague_tokens[row]), kept,
                               keep_vague, self.layer_seed)
