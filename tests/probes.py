"""Worker-side probes of the test suite, run through ``LLM.collective_rpc``:
which impl served each layer, store checks against an independent reference
on the real cache, and the builder's cuts.

``collective_rpc`` ships a callable to each worker only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the functions take the worker object.
"""

from __future__ import annotations

from harness.probes import attention_layers, exact_attention


def count_forward_calls(worker) -> int:
    """Count every attention impl's forward calls, and the steps it ran through
    the Triton kernels, from now on (read them with :func:`attention_impls` and
    :func:`triton_attention_steps`). Returns the number of layers counted."""
    layers = attention_layers(worker)
    for module in layers:
        impl = module.impl
        if hasattr(impl, "forward_calls"):
            continue
        impl.forward_calls = impl.triton_steps = 0
        forward, attend = impl.forward, getattr(impl, "_attend_with_triton", None)

        def counted(*args, _impl=impl, _forward=forward, **kwargs):
            _impl.forward_calls += 1
            return _forward(*args, **kwargs)

        def counted_attend(*args, _impl=impl, _attend=attend, **kwargs):
            ran = _attend(*args, **kwargs)
            _impl.triton_steps += int(ran)
            return ran

        impl.forward = counted
        if attend is not None:
            impl._attend_with_triton = counted_attend
    return len(layers)


def triton_attention_steps(worker) -> int:
    """Steps, summed over layers, that ran the Triton kernels."""
    return sum(getattr(module.impl, "triton_steps", 0) for module in attention_layers(worker))


def attention_impls(worker) -> list[tuple[str, str, int | None]]:
    """``(layer name, impl class, forward calls)`` for every attention layer."""
    return [
        (
            module.layer_name,
            type(module.impl).__qualname__,
            getattr(module.impl, "forward_calls", None),
        )
        for module in attention_layers(worker)
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
    for module in attention_layers(worker):
        if module.layer_name in layer_names:
            _wrap_with_checks(module.impl)
            wrapped += 1
    return wrapped


def _wrap_with_checks(impl) -> None:
    import torch

    from kvreviver_vllm import layout
    from kvreviver_vllm.stores import CountSketchStore, QuantizedStore

    impl.store_checks = []
    compact, forward, select = impl.compact, impl.forward, impl.select_kept
    d = impl.head_size

    def checked_compact(kv_cache, md, row, keep_exact, keep_vague):
        store, block_row = impl.store, md.block_table[row]
        start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
        exact = layout.slot_range(kv_cache, block_row, start, end).clone()
        old_pages = layout.store_pages(kv_cache, block_row, start).clone()
        selected = []
        impl.select_kept = lambda scores, keep: selected.append(select(scores, keep)) or selected[-1]
        try:
            compact(kv_cache, md, row, keep_exact, keep_vague)
        finally:
            impl.select_kept = select  # keeps record_compactions' wrapper
        kept = selected[0]
        first = store.slots_for(keep_vague) if store else 0
        exact_now = layout.slot_range(kv_cache, block_row, first, first + keep_exact)
        pages = layout.store_pages(kv_cache, block_row, first)
        positions = layout.slot_meta(exact)[0]
        ok = True
        for h in range(exact.shape[0]):
            ok &= torch.equal(exact_now[h, :, : 2 * d], exact[h, kept[h], : 2 * d])
            demoted = torch.ones(exact.shape[1], dtype=torch.bool)
            demoted[kept[h]] = False
            src, pos = exact[h, demoted].float(), positions[h, demoted]
            if isinstance(store, QuantizedStore):
                ok &= _quantized_store_holds(store, pages[h], keep_vague, old_pages[h], nv, src, pos, d)
            elif isinstance(store, CountSketchStore):
                seed = layout.head_seed(impl.layer_seed, h)
                ok &= _sketch_holds(store, pages[h], old_pages[h], nv, src, pos, seed, d)
        impl.store_checks.append(("compaction", bool(ok), keep_exact, keep_vague))

    def checked_forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs):
        result = forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
        if md is None or int(md.query_start_loc.diff().max()) != 1:
            return result
        compacted = {row for row, _, _ in md.compactions}
        rotation = None if impl.rotation is None else impl.rotation.double()
        group = impl.num_heads // impl.num_kv_heads
        for row in range(len(md.seq_lens)):
            if row in compacted:
                continue
            start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
            exact = layout.slot_range(kv_cache, md.block_table[row], start, end).double()
            keys, values = exact[..., :d], exact[..., d : 2 * d]
            if nv:
                pages = layout.store_pages(kv_cache, md.block_table[row], start)
                revived = [impl.store.revive(pages[h], nv, layout.head_seed(impl.layer_seed, h))
                           for h in range(impl.num_kv_heads)]
                keys = torch.cat([torch.stack([k for k, _ in revived]).double(), keys], 1)
                values = torch.cat([torch.stack([v for _, v in revived]).double(), values], 1)
            t = int(md.query_start_loc[row])
            q = query[t].double().view(impl.num_kv_heads, group, d)
            if rotation is not None:  # the cache holds rotated heads; the output is rotated back
                q = q @ rotation
            want = exact_attention(q, keys, values, impl.scale).view(-1, d)
            if rotation is not None:
                want = want @ rotation.T
            err = (output[t].double().view(-1, d) - want).abs().max().item()
            # The output is rounded to the model dtype (bf16: 2**-8 relative).
            tolerance = 2e-2 * max(1.0, want.abs().max().item())
            impl.store_checks.append(("decode", err < tolerance, nv, end - start,
                                      rotation is not None))
        return result

    impl.compact, impl.forward = checked_compact, checked_forward


def _quantized_store_holds(store, pages, keep, old_pages, num_old, src, positions, d) -> bool:
    """Records = surviving old records + records of the demoted tokens ``src``."""
    import torch

    from kvreviver_vllm.ops.reference import dequantize_groups, quantize_groups

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
    want_k = dequantize_groups(*quantize_groups(src[survivors, :d], store.bits, store.group))
    want_v = dequantize_groups(*quantize_groups(src[survivors, d : 2 * d], store.value_bits,
                                                store.group))
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


def store_check_results(worker) -> list[tuple[str, bool, int, int]]:
    """``(kind, passed, n1, n2)`` of every check recorded by :func:`install_store_checks`."""
    return [
        check
        for module in attention_layers(worker)
        for check in getattr(module.impl, "store_checks", [])
    ]


def builder_cuts(worker) -> dict[int, tuple[int, int]]:
    """``first block id -> (kept, prompt_blocks)`` of every request the KVReviver
    metadata builder has cut (``KVReviverSpec.cut``), to compare with the
    scheduler's block manager, which frees those gaps."""
    from kvreviver_vllm.backend import KVReviverMetadataBuilder

    cuts = {}
    for groups in worker.model_runner.attn_groups:
        for group in groups:
            for builder in group.metadata_builders:
                if isinstance(builder, KVReviverMetadataBuilder):
                    for first, state in builder.state.items():
                        if state.cut is not None:
                            cuts[first] = (state.cut.kept, state.cut.prompt_blocks)
    return cuts


def record_compactions(worker) -> int:
    """Record every compaction's decision from now on: per layer, the request's
    length and the exact slots each KV head kept (read them with
    :func:`compaction_decisions`). Returns the number of layers wrapped: none
    under the stock backend, which never compacts."""
    layers = [m for m in attention_layers(worker) if hasattr(m.impl, "select_kept")]
    for module in layers:
        impl = module.impl
        impl.decisions = []
        select = impl.select_kept

        def recorded(scores, keep_exact, _impl=impl, _select=select):
            kept = _select(scores, keep_exact)
            _impl.decisions.append((scores.shape[-1], kept.tolist()))
            return kept

        impl.select_kept = recorded
    return len(layers)


def compaction_decisions(worker) -> dict[str, list[tuple[int, list[list[int]]]]]:
    """``layer name -> [(scored slots, kept slots per KV head), ...]`` in compaction
    order, as recorded since :func:`record_compactions`."""
    return {module.layer_name: getattr(module.impl, "decisions", [])
            for module in attention_layers(worker)}


def raise_in_attention(worker, after_calls: int) -> int:
    """Make the first attention layer's forward raise ``RuntimeError("injected
    kernel fault")`` from its ``after_calls``-th call on, as a failing kernel would.
    Returns the number of layers changed."""
    impl = attention_layers(worker)[0].impl
    forward, calls = impl.forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] >= after_calls:
            raise RuntimeError("injected kernel fault")
        return forward(*args, **kwargs)

    impl.forward = failing
    return 1
