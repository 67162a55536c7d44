"""Vague stores: where tokens demoted from the exact cache are kept for revival.

One module per store behind ``VagueStore``; ``make_store`` picks the variant's.
"""

from __future__ import annotations

import functools
import logging

import torch

from kvreviver_vllm.config import RECORD_GROUPS, KVReviverConfig, KVReviverConfigError
from kvreviver_vllm.stores.base import VagueStore
from kvreviver_vllm.stores.count_sketch import CountSketchStore
from kvreviver_vllm.stores.mixed import MixedQuantizedStore
from kvreviver_vllm.stores.quantized import QuantizedStore

__all__ = ["CountSketchStore", "MixedQuantizedStore", "QuantizedStore", "VagueStore", "make_store"]

logger = logging.getLogger(f"vllm.{__name__}")


def make_store(config: KVReviverConfig, head_size: int, slot_bytes: int,
               dtype: torch.dtype) -> VagueStore | None:
    """The variant's vague store, or None for the variants without one."""
    if config.variant == "quantized" and config.low_bits:
        _warn_research_store(config.low_bits)
        return MixedQuantizedStore(head_size, config.bits, config.low_bits, config.high_share,
                                   slot_bytes, config.pool_before, config.pool_after,
                                   config.pool_decay)
    if config.variant == "quantized":
        if config.record_group and head_size % config.record_group:
            raise KVReviverConfigError(
                f"kvreviver.record_group={config.record_group} does not divide the model's "
                f"head size {head_size}: allowed values are 0 or "
                f"{', '.join(str(g) for g in RECORD_GROUPS if head_size % g == 0)}"
            )
        return QuantizedStore(head_size, config.bits, slot_bytes, config.value_bits,
                              config.pool_before, config.pool_after, config.record_group,
                              config.pool_decay)
    if config.variant == "sketch":
        return CountSketchStore(head_size, config.sketch_rows, config.sketch_buckets, slot_bytes,
                                dtype)
    return None


@functools.cache  # once per process, not once per layer
def _warn_research_store(low_bits: int) -> None:
    logger.warning("kvreviver.low_bits=%d: the mixed-width store is a research store and runs "
                   "the PyTorch reference ops (slow)", low_bits)
