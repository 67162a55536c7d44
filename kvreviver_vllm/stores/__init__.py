"""Vague stores: where tokens demoted from the exact cache are kept for revival.

One module per store behind ``VagueStore``; ``make_store`` picks the variant's.
"""

from __future__ import annotations

import torch

from kvreviver_vllm.config import KVReviverConfig
from kvreviver_vllm.stores.base import VagueStore
from kvreviver_vllm.stores.count_sketch import CountSketchStore
from kvreviver_vllm.stores.quantized import QuantizedStore

__all__ = ["CountSketchStore", "QuantizedStore", "VagueStore", "make_store"]


def make_store(config: KVReviverConfig, head_size: int, slot_bytes: int,
               dtype: torch.dtype) -> VagueStore | None:
    """The variant's vague store, or None for the variants without one."""
    if config.variant == "quantized":
        return QuantizedStore(head_size, config.bits, slot_bytes)
    if config.variant == "sketch":
        return CountSketchStore(head_size, config.sketch_rows, config.sketch_buckets, slot_bytes, dtype)
    return None
