"""Worker-side probes of the accuracy harness, run through ``LLM.collective_rpc``:
each attention layer's output error against full attention, and which prompt
positions a compaction keeps. (The test suite's own probes: ``tests/probes.py``.)

``collective_rpc`` ships a callable to each worker only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the functions take the worker object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the worker, where the probes run
    import torch


def attention_layers(worker) -> list:
    """Every ``Attention`` module of the worker's model, in model order."""
    from vllm.model_executor.layers.attention import Attention

    return [m for m in worker.model_runner.model.modules() if isinstance(m, Attention)]


def exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """Softmax attention ``[Hkv, group, D]`` of queries ``q [Hkv, group, D]`` over
    ``keys/values [Hkv, n, D]``, in their dtype."""
    import torch

    return torch.softmax(q @ keys.transpose(1, 2) * scale, dim=-1) @ values


def install_attention_error_probe(worker, steps: int) -> int:
    """Measure every attention layer's output error on the first ``steps`` decode
    steps of each request: ``|o - o_full| / |o_full|`` (L2 over all query heads),
    where ``o`` is what the backend computed over the compressed cache and
    ``o_full`` is float32 attention of the same query over every key and value the
    request has written, from a shadow copy the probe keeps (compaction never
    touches it). Both use this layer's own inputs in the compressed run, so the
    error is this layer's attention alone, not the drift of earlier layers.

    Requests are told apart by their first KV block (stable while they run) and
    start when a step brings their position 0. Read the results with
    :func:`attention_error_results`. Returns the number of layers probed.
    """
    max_len = worker.model_config.max_model_len
    layers = attention_layers(worker)
    for index, module in enumerate(layers):
        _wrap_with_error_probe(module.impl, index, steps, max_len)
    return len(layers)


@dataclass
class _Shadow:
    """Every key and value one request wrote to one layer, uncompressed."""

    serial: int
    keys: torch.Tensor
    values: torch.Tensor
    prompt_len: int | None = None
    """Position of the first decode step (set on that step)."""
    steps: int = 0


def _wrap_with_error_probe(impl, layer_index: int, steps: int, max_len: int) -> None:
    import itertools

    import torch

    shadows: dict[int, _Shadow] = {}  # by first block id
    impl.attention_errors = []  # (request serial, prompt length, layer, step, error)
    serials = itertools.count()  # requests reach every layer in the same order
    forward = impl.forward

    def probed_forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        result = forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
        if md is None:
            return result
        qsl = md.query_start_loc.tolist()
        positions = md.positions.cpu()
        first_blocks = md.block_table[:, 0].tolist()
        group = impl.num_heads // impl.num_kv_heads
        d = impl.head_size
        for row, block in enumerate(first_blocks):
            t0, t1 = qsl[row], qsl[row + 1]
            p0 = int(positions[t0])
            if p0 == 0:  # room for the longest request, in the model dtype
                empty = key.new_empty((max_len, impl.num_kv_heads, d))
                shadows[block] = _Shadow(next(serials), empty, torch.empty_like(empty))
            shadow = shadows.get(block)
            if shadow is None:  # measured all its steps already
                continue
            p1 = p0 + t1 - t0
            shadow.keys[p0:p1] = key[t0:t1].view(-1, impl.num_kv_heads, d)
            shadow.values[p0:p1] = value[t0:t1].view(-1, impl.num_kv_heads, d)
            if not md.decoding[row]:
                continue
            if shadow.prompt_len is None:
                shadow.prompt_len = p0
            keys = shadow.keys[:p1].float().transpose(0, 1)  # [Hkv, n, D]
            values = shadow.values[:p1].float().transpose(0, 1)
            q = query[t0].float().view(impl.num_kv_heads, group, d)
            want = exact_attention(q, keys, values, impl.scale)
            got = output[t0].float().view(impl.num_kv_heads, group, d)
            error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
            impl.attention_errors.append(
                (shadow.serial, shadow.prompt_len, layer_index, shadow.steps, error)
            )
            shadow.steps += 1
            if shadow.steps >= steps:
                del shadows[block]
        return result

    impl.forward = probed_forward


def attention_error_results(worker) -> list[tuple[int, int, int, int, float]]:
    """``(request serial, prompt length, layer, decode step, relative error)`` of
    every measurement taken by :func:`install_attention_error_probe`."""
    return [
        measured
        for module in attention_layers(worker)
        for measured in getattr(module.impl, "attention_errors", [])
    ]


def install_coverage_probe(worker) -> int:
    """Record, at each request's first compaction (its first decode step, where
    the prompt is brought to budget), which prompt positions every (layer, KV head)
    still holds: exact, or as records of the ``quantized`` store (a Count Sketch
    holds no token as itself, so its vague part counts as nothing held).

    Requests are numbered in the order their position 0 reaches the worker (the
    order they were submitted). Read with :func:`coverage_results`. Returns the
    number of layers probed.
    """
    layers = attention_layers(worker)
    for index, module in enumerate(layers):
        _wrap_with_coverage_probe(module.impl, index)
    return len(layers)


def _wrap_with_coverage_probe(impl, layer_index: int) -> None:
    import itertools

    from kvreviver_vllm import layout
    from kvreviver_vllm.stores import QuantizedStore

    serials: dict[int, int] = {}  # first block id -> request serial, until its first compaction
    counter = itertools.count()  # requests reach every layer in the same order
    impl.coverage = []  # (request serial, layer, KV head, exact positions, vague positions)
    forward, compact = impl.forward, impl.compact

    def probed_forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        if md is not None:
            positions = md.positions.cpu()
            for row, t0 in enumerate(md.query_start_loc[:-1].tolist()):
                if int(positions[t0]) == 0:
                    serials[int(md.block_table[row, 0])] = next(counter)
        return forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)

    def probed_compact(kv_cache, md, row, keep_exact, keep_vague):
        compact(kv_cache, md, row, keep_exact, keep_vague)
        serial = serials.pop(int(md.block_table[row, 0]), None)
        if serial is None:  # a decoding request's later compaction
            return
        block_row, store = md.block_table[row], impl.store
        first = store.slots_for(keep_vague) if store is not None and keep_vague else 0
        exact = layout.slot_range(kv_cache, block_row, first, first + keep_exact)
        exact_positions = layout.slot_meta(exact)[0]
        pages = layout.store_pages(kv_cache, block_row, first) if first else None
        for h in range(exact.shape[0]):
            vague = []
            if isinstance(store, QuantizedStore) and keep_vague:
                vague = store.meta(store.from_pages(pages[h], keep_vague))[0].tolist()
            impl.coverage.append((serial, layer_index, h, exact_positions[h].tolist(), vague))

    impl.forward, impl.compact = probed_forward, probed_compact


def coverage_results(worker) -> list[tuple[int, int, int, list[int], list[int]]]:
    """``(request serial, layer, KV head, exact positions, vague positions)`` of every
    request's first compaction, recorded by :func:`install_coverage_probe`."""
    return [
        held
        for module in attention_layers(worker)
        for held in getattr(module.impl, "coverage", [])
    ]
