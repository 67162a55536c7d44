"""Vague stores: where tokens demoted from the exact cache are kept for revival."""

from kvreviver_vllm.stores.quantized import QuantizedStore

__all__ = ["QuantizedStore"]
