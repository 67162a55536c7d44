"""Worker-side probes, run through ``LLM.collective_rpc`` by tests and benchmarks.

``collective_rpc`` ships a callable to each worker only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the functions take the worker object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported in the worker, where the probes run
    import torch


def _attention_layers(worker) -> list:
    """Every ``Attention`` module of the worker's model, in model order."""
    from vllm.model_executor.layers.attention import Attention

    return [m for m in worker.model_runner.model.modules() if isinstance(m, Attention)]


def _exact_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Softmax attention ``[Hkv, group, D]`` of queries ``q [Hkv, group, D]`` over
    ``keys/values [Hkv, n, D]``, in their dtype."""
    import torch

    return torch.softmax(q @ keys.transpose(1, 2) * scale, dim=-1) @ values


def attention_impls(worker) -> list[tuple[str, str, int | None]]:
    """``(layer name, impl class, forward calls)`` for every attention layer."""
    return [
        (
            module.layer_name,
            type(module.impl).__qualname__,
            getattr(module.impl, "num_forward_calls", None),
        )
        for module in _attention_layers(worker)
    ]


def install_store_checks(worker, layer_names: list[str]) -> int:
    """Wrap the named layers' impls so that every compaction and every decode step
    is checked against an independent reference, in the worker, on the real cache:

    * compaction: the kept exact slots are byte-identical to the ones selected;
      the store read back from the paged blocks holds exactly what inserting the
      demoted tokens should give (quantized: their records, with keys/values equal
      to ``QuantizedStore.quantize`` of the captured slots, plus the surviving old
      ones; sketch: old bucket sums plus the signed sums of the demoted tokens);
    * decode: each request's attention output equals float64 attention over its
      revived vague tokens plus its exact slots, as laid out in the paged blocks.

    Results accumulate on the impl (``store_checks``); read them with
    :func:`store_check_results`. Returns the number of layers wrapped.
    """
    wrapped = 0
    for module in _attention_layers(worker):
        if module.layer_name in layer_names:
            _wrap_with_checks(module.impl)
            wrapped += 1
    return wrapped


def _wrap_with_checks(impl) -> None:
    import torch

    from kvreviver_vllm import sketch
    from kvreviver_vllm.stores import CountSketchStore, QuantizedStore

    impl.store_checks = []
    compact, forward, select = impl._compact, impl.forward, impl._select
    d = impl.head_size

    def checked_compact(kv_cache, md, row, keep_exact, keep_vague):
        store, block_row = impl.store, md.block_table[row]
        start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
        exact = sketch.slot_range(kv_cache, block_row, start, end).clone()
        old_pages = sketch.store_pages(kv_cache, block_row, start).clone()
        selected = []
        impl._select = lambda scores, keep: selected.append(select(scores, keep)) or selected[-1]
        try:
            compact(kv_cache, md, row, keep_exact, keep_vague)
        finally:
            del impl._select
        kept = selected[0]
        first = store.slots_for(keep_vague) if store else 0
        exact_now = sketch.slot_range(kv_cache, block_row, first, first + keep_exact)
        pages = sketch.store_pages(kv_cache, block_row, first)
        positions = sketch.slot_meta(exact)[0]
        ok = True
        for h in range(exact.shape[0]):
            ok &= torch.equal(exact_now[h, :, : 2 * d], exact[h, kept[h], : 2 * d])
            demoted = torch.ones(exact.shape[1], dtype=torch.bool)
            demoted[kept[h]] = False
            src, pos = exact[h, demoted].float(), positions[h, demoted]
            if isinstance(store, QuantizedStore):
                ok &= _quantized_store_holds(store, pages[h], keep_vague, old_pages[h], nv, src, pos, d)
            elif isinstance(store, CountSketchStore):
                seed = sketch.head_seed(impl.layer_seed, h)
                ok &= _sketch_holds(store, pages[h], old_pages[h], nv, src, pos, seed, d)
        impl.store_checks.append(("compaction", bool(ok), keep_exact, keep_vague))

    def checked_forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        result = forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
        if md is None or int(md.query_start_loc.diff().max()) != 1:
            return result
        compacted = {row for row, _, _ in md.compactions}
        group = impl.num_heads // impl.num_kv_heads
        for row in range(len(md.seq_lens)):
            if row in compacted:
                continue
            start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
            exact = sketch.slot_range(kv_cache, md.block_table[row], start, end).double()
            keys, values = exact[..., :d], exact[..., d : 2 * d]
            if nv:
                pages = sketch.store_pages(kv_cache, md.block_table[row], start)
                revived = [impl.store.revive(pages[h], nv, sketch.head_seed(impl.layer_seed, h))
                           for h in range(impl.num_kv_heads)]
                keys = torch.cat([torch.stack([k for k, _ in revived]).double(), keys], 1)
                values = torch.cat([torch.stack([v for _, v in revived]).double(), values], 1)
            t = int(md.query_start_loc[row])
            q = query[t].double().view(impl.num_kv_heads, group, d)
            want = _exact_attention(q, keys, values, impl.scale).view(-1, d)
            err = (output[t].double().view(-1, d) - want).abs().max().item()
            # The output is rounded to the model dtype (bf16: 2**-8 relative).
            tolerance = 2e-2 * max(1.0, want.abs().max().item())
            impl.store_checks.append(("decode", err < tolerance, nv, end - start))
        return result

    impl._compact, impl.forward = checked_compact, checked_forward


def _quantized_store_holds(store, pages, keep, old_pages, num_old, src, positions, d) -> bool:
    """Records = surviving old records + records of the demoted tokens ``src``."""
    import torch

    records = store.from_pages(pages, keep)
    keys, values, stored_pos, _ = store.decode(records)
    old_pos = store.decode(store.from_pages(old_pages, num_old))[2] if num_old else stored_pos[:0]
    if len(stored_pos) != keep or not set(stored_pos.tolist()) <= set(old_pos.tolist()) | set(positions.tolist()):
        return False
    where = {p: i for i, p in enumerate(stored_pos.tolist())}
    survivors = [i for i, p in enumerate(positions.tolist()) if p in where]
    if not survivors:
        return True
    rows = [where[p] for p in positions[survivors].tolist()]
    want_k = store.dequantize(*store.quantize(src[survivors, :d]))
    want_v = store.dequantize(*store.quantize(src[survivors, d : 2 * d]))
    return torch.allclose(keys[rows], want_k) and torch.allclose(values[rows], want_v)


def _sketch_holds(store, pages, old_pages, num_old, src, positions, seed, d) -> bool:
    """Bucket sums = old sums + signed sums of the demoted tokens ``src``."""
    import torch

    if not len(pages):
        return True
    want_k = torch.zeros(store.rows, store.buckets, d)
    want_v = torch.zeros_like(want_k)
    if num_old:
        want_k, want_v = store.bucket_sums(old_pages)
    idx, sign = store.hashes(positions, seed)
    for r in range(store.rows):
        for i in range(len(positions)):
            want_k[r, idx[r, i]] += sign[r, i] * src[i, :d]
            want_v[r, idx[r, i]] += sign[r, i] * src[i, d : 2 * d]
    got_k, got_v = store.bucket_sums(pages)
    tol = dict(atol=0.05, rtol=0.02)  # sums are stored in the cache dtype
    return torch.allclose(got_k, want_k, **tol) and torch.allclose(got_v, want_v, **tol)


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
    layers = _attention_layers(worker)
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
            want = _exact_attention(q, keys, values, impl.scale)
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
        for module in _attention_layers(worker)
        for measured in getattr(module.impl, "attention_errors", [])
    ]


def store_check_results(worker) -> list[tuple[str, bool, int, int]]:
    """``(kind, passed, n1, n2)`` of every check recorded by :func:`install_store_checks`."""
    return [
        check
        for module in _attention_layers(worker)
        for check in getattr(module.impl, "store_checks", [])
    ]


def builder_cuts(worker) -> dict[int, tuple[int, int]]:
    """``first block id -> (kept, prompt_blocks)`` of every request the KVReviver
    metadata builder has cut (``KVReviverSpec.cut``), to compare with the
    scheduler's block manager, which frees those gaps."""
    from kvreviver_vllm.backend.common import KVReviverMetadataBuilder

    cuts = {}
    for groups in worker.model_runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if isinstance(builder, KVReviverMetadataBuilder):
                    for first, (_, _, cut) in builder.state.items():
                        if cut is not None:
                            cuts[first] = (cut.kept, cut.prompt_blocks)
    return cuts


def install_coverage_probe(worker) -> int:
    """Record, at each request's first compaction (its first decode step, where
    the prompt is brought to budget), which prompt positions every (layer, KV head)
    still holds: exact, or as records of the ``quantized`` store (a Count Sketch
    holds no token as itself, so its vague part counts as nothing held).

    Requests are numbered in the order their position 0 reaches the worker (the
    order they were submitted). Read with :func:`coverage_results`. Returns the
    number of layers probed.
    """
    layers = _attention_layers(worker)
    for index, module in enumerate(layers):
        _wrap_with_coverage_probe(module.impl, index)
    return len(layers)


def _wrap_with_coverage_probe(impl, layer_index: int) -> None:
    import itertools

    from kvreviver_vllm import sketch
    from kvreviver_vllm.stores import QuantizedStore

    serials: dict[int, int] = {}  # first block id -> request serial, until its first compaction
    counter = itertools.count()  # requests reach every layer in the same order
    impl.coverage = []  # (request serial, layer, KV head, exact positions, vague positions)
    forward, compact = impl.forward, impl._compact

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
        exact = sketch.slot_range(kv_cache, block_row, first, first + keep_exact)
        exact_positions = sketch.slot_meta(exact)[0]
        pages = sketch.store_pages(kv_cache, block_row, first) if first else None
        for h in range(exact.shape[0]):
            vague = []
            if isinstance(store, QuantizedStore) and keep_vague:
                vague = store.meta(store.from_pages(pages[h], keep_vague))[0].tolist()
            impl.coverage.append((serial, layer_index, h, exact_positions[h].tolist(), vague))

    impl.forward, impl._compact = probed_forward, probed_compact


def coverage_results(worker) -> list[tuple[int, int, int, list[int], list[int]]]:
    """``(request serial, layer, KV head, exact positions, vague positions)`` of every
    request's first compaction, recorded by :func:`install_coverage_probe`."""
    return [
        held
        for module in _attention_layers(worker)
        for held in getattr(module.impl, "coverage", [])
    ]
