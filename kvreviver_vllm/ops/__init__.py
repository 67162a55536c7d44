"""The KVReviver ops: one thin wrapper per ``torch.ops.kvreviver`` op.

Each wrapper calls the compiled op when ``kvreviver_vllm._C`` is built (the
torch dispatcher picks its CPU or CUDA kernel by the tensors' device), and the
PyTorch reference of the same name and signature (``ops/reference.py``)
otherwise. Which one runs is decided once per process, on first use, and logged,
so a slow fallback is never silent. Schemas: ``csrc/bindings.cpp``.

With the compiled ops loaded, every op also has a fake (meta) implementation,
so that torch.compile and CUDA-graph capture can trace through it.
"""

from __future__ import annotations

import functools
import logging

import torch

from kvreviver_vllm.layout import record_bytes
from kvreviver_vllm.ops import reference

# Under the "vllm" logger so messages show in vLLM's own log output (this module
# does not import vLLM: the kernel checks run where it is not installed).
logger = logging.getLogger(f"vllm.{__name__}")

COMPILED = "compiled"
REFERENCE = "reference"


@functools.cache
def implementation() -> str:
    """``"compiled"`` if ``kvreviver_vllm._C`` loads, else ``"reference"``."""
    try:
        import kvreviver_vllm._C  # noqa: F401  (registers torch.ops.kvreviver.*)
    except ImportError as exc:
        logger.warning(
            "KVReviver compiled ops unavailable (%s); running the PyTorch reference ops "
            "(rebuild with `pip install --no-build-isolation -e .`)",
            exc,
        )
        return REFERENCE
    _register_fakes()
    logger.info("KVReviver uses its compiled ops")
    return COMPILED


def _op(name: str):
    if implementation() == COMPILED:
        return getattr(torch.ops.kvreviver, name)
    return getattr(reference, name)


# -- paged cache --------------------------------------------------------------

def write_kv(kv_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, positions: torch.Tensor) -> None:
    _op("write_kv")(kv_cache, key, value, slot_mapping, positions)


def paged_attention(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor,
                    query_start_loc: torch.Tensor, scale: float, score_window: int) -> None:
    _op("paged_attention")(out, query, kv_cache, block_table, seq_lens, query_start_loc,
                           scale, score_window)


def compact_slots(kv_cache: torch.Tensor, block_row: torch.Tensor,
                  kept_slots: torch.Tensor) -> None:
    _op("compact_slots")(kv_cache, block_row, kept_slots)


# -- quantized store ------------------------------------------------------------

def paged_attention_quantized(out: torch.Tensor, query: torch.Tensor, kv_cache: torch.Tensor,
                              block_table: torch.Tensor, exact_start: torch.Tensor,
                              seq_lens: torch.Tensor, vague_tokens: torch.Tensor,
                              query_start_loc: torch.Tensor, scale: float, score_window: int,
                              bits: int, group: int, value_bits: int) -> None:
    _op("paged_attention_quantized")(out, query, kv_cache, block_table, exact_start, seq_lens,
                                     vague_tokens, query_start_loc, scale, score_window, bits,
                                     group, value_bits)


def compact_quantized(kv_cache: torch.Tensor, block_row: torch.Tensor, exact_start: int,
                      seq_len: int, num_vague: int, kept_exact: torch.Tensor, keep_vague: int,
                      bits: int, group: int, value_bits: int, pool_before: int,
                      pool_after: int, pool_decay: float) -> None:
    _op("compact_quantized")(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                             keep_vague, bits, group, value_bits, pool_before, pool_after,
                             pool_decay)


def quantize_records(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                     scores: torch.Tensor, bits: int, group: int, value_bits: int) -> torch.Tensor:
    return _op("quantize_records")(keys, values, positions, scores, bits, group, value_bits)


def dequantize_records(records: torch.Tensor, head_size: int, bits: int, group: int,
                       value_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _op("dequantize_records")(records, head_size, bits, group, value_bits)


# -- Count Sketch store ---------------------------------------------------------

def count_sketch_add(bucket_keys: torch.Tensor, bucket_values: torch.Tensor, keys: torch.Tensor,
                     values: torch.Tensor, positions: torch.Tensor,
                     coefficients: torch.Tensor) -> None:
    _op("count_sketch_add")(bucket_keys, bucket_values, keys, values, positions, coefficients)


def count_sketch_estimate(buckets: torch.Tensor, positions: torch.Tensor,
                          coefficients: torch.Tensor) -> torch.Tensor:
    return _op("count_sketch_estimate")(buckets, positions, coefficients)


def count_sketch_logits(query: torch.Tensor, bucket_keys: torch.Tensor, positions: torch.Tensor,
                        coefficients: torch.Tensor) -> torch.Tensor:
    return _op("count_sketch_logits")(query, bucket_keys, positions, coefficients)


# -- fake (meta) implementations --------------------------------------------------

OPS = ("write_kv", "paged_attention", "compact_slots", "paged_attention_quantized",
       "compact_quantized", "quantize_records", "dequantize_records", "count_sketch_add",
       "count_sketch_estimate", "count_sketch_logits")


def _register_fakes() -> None:
    """Shapes of every op's outputs without running it; the ops that return
    nothing only write their mutable arguments in place."""

    def nothing(*args, **kwargs) -> None:
        return None

    for name in ("write_kv", "paged_attention", "compact_slots", "paged_attention_quantized",
                 "compact_quantized", "count_sketch_add"):
        torch.library.register_fake(f"kvreviver::{name}", nothing)

    @torch.library.register_fake("kvreviver::quantize_records")
    def _(keys, values, positions, scores, bits, group, value_bits=0):
        size = record_bytes(keys.shape[1], bits, group, value_bits)
        return keys.new_empty((keys.shape[0], size), dtype=torch.uint8)

    @torch.library.register_fake("kvreviver::dequantize_records")
    def _(records, head_size, bits, group, value_bits=0):
        shape = (records.shape[0], head_size)
        return (records.new_empty(shape, dtype=torch.float32),
                records.new_empty(shape, dtype=torch.float32))

    @torch.library.register_fake("kvreviver::count_sketch_estimate")
    def _(buckets, positions, coefficients):
        return buckets.new_empty((positions.shape[0], buckets.shape[2]), dtype=torch.float32)

    @torch.library.register_fake("kvreviver::count_sketch_logits")
    def _(query, bucket_keys, positions, coefficients):
        return query.new_empty((query.shape[0], positions.shape[0]), dtype=torch.float32)
