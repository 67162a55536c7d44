"""The KVReviver attention backend, shared by the CPU and CUDA classes.

Four pieces with vLLM's fixed roles: the backend class (static facts), the
metadata dataclass, the metadata builder (scheduler state -> tensors, once per
step) and the impl (the math, through ``kvreviver_vllm.ops``).

The impl writes the KV cache itself (``forward_includes_kv_cache_update``), so
the physical slots it uses are its own; with compression off they are vLLM's
positional slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.config import VllmConfig
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

from kvreviver_vllm import ops

# Under the "vllm" logger so messages show in vLLM's own log output.
logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "KVREVIVER"


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

    @staticmethod
    def get_impl_cls() -> type[KVReviverAttentionImpl]:
        return KVReviverAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KVReviverMetadataBuilder]:
        return KVReviverMetadataBuilder


@dataclass
class KVReviverMetadata:
    num_actual_tokens: int
    max_query_len: int
    query_start_loc: torch.Tensor
    """[num_reqs + 1] int32, on the host: per-request query row ranges."""
    seq_lens: torch.Tensor
    """[num_reqs] int32, on the host: context tokens per request, new ones included."""
    block_table: torch.Tensor
    """[num_reqs, max_blocks] int32: the request's physical blocks in order."""
    slot_mapping: torch.Tensor
    """[num_actual_tokens] int64: where each new token's K/V is written."""


class KVReviverMetadataBuilder(AttentionMetadataBuilder[KVReviverMetadata]):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> KVReviverMetadata:
        cm = common_attn_metadata
        return KVReviverMetadata(
            num_actual_tokens=cm.num_actual_tokens,
            max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc_cpu[: cm.num_reqs + 1],
            seq_lens=cm.seq_lens[: cm.num_reqs].cpu(),
            block_table=cm.block_table_tensor[: cm.num_reqs],
            slot_mapping=cm.slot_mapping[: cm.num_actual_tokens],
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
        # Read by tests (through collective_rpc) to prove this impl ran.
        self.num_forward_calls = 0
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
        kv_cache ``[num_blocks, Hkv, block_size, 2 * D]``; writes ``output[:T]``."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(
                f"{BACKEND_NAME} does not support fused output quantization"
            )
        if attn_metadata is None:  # profiling / warm-up run
            return output
        self.num_forward_calls += 1
        num_tokens = attn_metadata.num_actual_tokens
        ops.write_kv(
            kv_cache, key[:num_tokens], value[:num_tokens], attn_metadata.slot_mapping
        )
        ops.paged_attention(
            output[:num_tokens],
            query[:num_tokens],
            kv_cache,
            attn_metadata.block_table,
            attn_metadata.seq_lens,
            attn_metadata.query_start_loc,
            self.scale,
        )
        return output
