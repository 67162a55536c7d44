"""The ops the backend calls: the compiled ``torch.ops.kvreviver`` kernels when the
extension is built, the PyTorch reference (``sketch.py``) otherwise.

Call sites use ``ops.<name>`` only. Which implementation runs is decided once per
process, on first use, and logged, so a slow fallback is never silent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.logger import init_logger

from kvreviver_vllm import sketch

logger = init_logger(f"vllm.{__name__}")

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
    logger.info("KVReviver uses its compiled ops")
    return COMPILED


def _dispatch(name: str) -> Callable:
    @functools.wraps(getattr(sketch, name))
    def op(*args, **kwargs):
        if implementation() == COMPILED:
            return getattr(torch.ops.kvreviver, name)(*args, **kwargs)
        return getattr(sketch, name)(*args, **kwargs)

    return op


write_kv = _dispatch("write_kv")
paged_attention = _dispatch("paged_attention")
# Vague-store insert and reconstruction: low-bit records and Count Sketch.
quantize_records = _dispatch("quantize_records")
dequantize_records = _dispatch("dequantize_records")
count_sketch_add = _dispatch("count_sketch_add")
count_sketch_estimate = _dispatch("count_sketch_estimate")
count_sketch_logits = _dispatch("count_sketch_logits")


def paged_attention_revived(out, query, kv_cache, block_table, exact_start, seq_lens,
                            vague_tokens, query_start_loc, scale, score_window, store,
                            layer_seed) -> None:
    """:func:`sketch.paged_attention_revived`; compiled for the quantized store."""
    from kvreviver_vllm.stores import QuantizedStore  # the stores call these ops

    if implementation() == COMPILED and isinstance(store, QuantizedStore):
        torch.ops.kvreviver.paged_attention_quantized(
            out, query, kv_cache, block_table, exact_start, seq_lens, vague_tokens,
            query_start_loc, scale, score_window, store.bits, store.group, store.value_bits,
        )
    else:
        sketch.paged_attention_revived(
            out, query, kv_cache, block_table, exact_start, seq_lens, vague_tokens,
            query_start_loc, scale, score_window, store, layer_seed,
        )


def _compiled_on(kv_cache: torch.Tensor) -> bool:
    # Compaction has CPU kernels only; on CUDA it runs as PyTorch on the GPU.
    return implementation() == COMPILED and kv_cache.device.type == "cpu"


def compact(kv_cache, block_row, kept_slots) -> None:
    """:func:`sketch.compact`, compiled on CPU."""
    if _compiled_on(kv_cache):
        torch.ops.kvreviver.compact_slots(kv_cache, block_row, kept_slots)
    else:
        sketch.compact(kv_cache, block_row, kept_slots)


def compact_into_store(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                       keep_vague, store, layer_seed) -> None:
    """:func:`sketch.compact_into_store`; one compiled op for the quantized store on
    CPU (a prompt chunk compacts every layer of every request it touches)."""
    from kvreviver_vllm.stores import QuantizedStore

    if _compiled_on(kv_cache) and isinstance(store, QuantizedStore):
        torch.ops.kvreviver.compact_quantized(
            kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact, keep_vague,
            store.bits, store.group, store.value_bits, store.pool_before, store.pool_after,
        )
    else:
        sketch.compact_into_store(kv_cache, block_row, exact_start, seq_len, num_vague,
                                  kept_exact, keep_vague, store, layer_seed)


request_scores = sketch.request_scores
