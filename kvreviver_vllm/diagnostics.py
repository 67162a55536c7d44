"""Worker-side probes, run through ``LLM.collective_rpc`` by tests and benchmarks.

``collective_rpc`` ships a callable to each worker only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the functions take the worker object.
"""

from __future__ import annotations


def attention_impls(worker) -> list[tuple[str, str, int | None]]:
    """``(layer name, impl class, forward calls)`` for every attention layer."""
    from vllm.model_executor.layers.attention import Attention

    model = worker.model_runner.model
    return [
        (
            module.layer_name,
            type(module.impl).__qualname__,
            getattr(module.impl, "num_forward_calls", None),
        )
        for module in model.modules()
        if isinstance(module, Attention)
    ]


def install_store_checks(worker, layer_names: list[str]) -> int:
    """Wrap the named layers' impls so that every compaction and every decode step
    is checked against an independent reference, in the worker, on the real cache:

    * compaction: the vague store read back from the paged blocks holds exactly the
      old records that survive plus the quantized tokens just demoted (positions,
      and keys/values equal to ``QuantizedStore.quantize`` of the captured slots);
      the kept exact slots are byte-identical to the ones selected;
    * decode: each request's attention output equals float64 attention over its
      revived vague tokens plus its exact slots, as laid out in the paged blocks.

    Results accumulate on the impl (``store_checks``); read them with
    :func:`store_check_results`. Returns the number of layers wrapped.
    """
    import torch
    from vllm.model_executor.layers.attention import Attention

    from kvreviver_vllm import sketch

    wrapped = 0
    for module in worker.model_runner.model.modules():
        if not isinstance(module, Attention) or module.layer_name not in layer_names:
            continue
        impl = module.impl
        impl.store_checks = []
        compact, forward = impl._compact, impl.forward

        def checked_compact(kv_cache, md, row, keep_exact, keep_vague, impl=impl, compact=compact):
            store = impl._store(kv_cache) if impl.config.variant == "quantized" else None
            block_row = md.block_table[row]
            start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
            exact = sketch.slot_range(kv_cache, block_row, start, end).clone()
            old = sketch.vague_records(kv_cache, block_row, store, start, nv) if nv else None
            selected = []
            real_select = impl._select
            impl._select = lambda scores, keep: selected.append(real_select(scores, keep)) or selected[-1]
            try:
                compact(kv_cache, md, row, keep_exact, keep_vague)
            finally:
                impl._select = real_select
            kept = selected[0]
            pages = store.slots_for(keep_vague) if store else 0
            exact_now = sketch.slot_range(kv_cache, block_row, pages, pages + keep_exact)
            head_size = impl.head_size
            ok = all(
                torch.equal(exact_now[h, :, : 2 * head_size], exact[h, kept[h], : 2 * head_size])
                for h in range(exact.shape[0])
            )
            if store is not None:
                records = sketch.vague_records(kv_cache, block_row, store, pages, keep_vague)
                pos_meta = exact[..., 2 * head_size :].contiguous().view(torch.int32)[..., 0]
                for h in range(exact.shape[0]):
                    demoted = torch.ones(exact.shape[1], dtype=torch.bool)
                    demoted[kept[h]] = False
                    k, v, pos, _ = store.decode(records[h])
                    old_pos = store.decode(old[h])[2] if old is not None else pos[:0]
                    candidates = set(old_pos.tolist()) | set(pos_meta[h, demoted].tolist())
                    ok &= set(pos.tolist()) <= candidates and len(pos) == keep_vague
                    new_pos = pos_meta[h, demoted]
                    stored = {p: i for i, p in enumerate(pos.tolist())}
                    survivors = [i for i, p in enumerate(new_pos.tolist()) if p in stored]
                    if survivors:
                        src = exact[h, demoted][survivors]
                        rows = [stored[p] for p in new_pos[survivors].tolist()]
                        want_k = store.dequantize(*store.quantize(src[:, :head_size]))
                        want_v = store.dequantize(*store.quantize(src[:, head_size : 2 * head_size]))
                        ok &= torch.allclose(k[rows], want_k) and torch.allclose(v[rows], want_v)
            impl.store_checks.append(("compaction", bool(ok), keep_exact, keep_vague))

        def checked_forward(layer, query, key, value, kv_cache, md, output, *args, impl=impl,
                            forward=forward, **kwargs):
            result = forward(layer, query, key, value, kv_cache, md, output, *args, **kwargs)
            if md is None or int(md.query_start_loc.diff().max()) != 1:
                return result
            compacted = {row for row, _, _ in md.compactions}
            store = impl._store(kv_cache) if impl.config.variant == "quantized" else None
            group = impl.num_heads // impl.num_kv_heads
            for row in range(len(md.seq_lens)):
                if row in compacted:
                    continue
                start, end, nv = int(md.exact_start[row]), int(md.seq_lens[row]), int(md.vague_tokens[row])
                exact = sketch.slot_range(kv_cache, md.block_table[row], start, end).double()
                keys, values = exact[..., : impl.head_size], exact[..., impl.head_size : 2 * impl.head_size]
                if nv:
                    records = sketch.vague_records(kv_cache, md.block_table[row], store, start, nv)
                    decoded = [store.decode(r) for r in records]
                    keys = torch.cat([torch.stack([d[0] for d in decoded]).double(), keys], 1)
                    values = torch.cat([torch.stack([d[1] for d in decoded]).double(), values], 1)
                t = int(md.query_start_loc[row])
                q = query[t].double().view(impl.num_kv_heads, group, impl.head_size)
                probs = torch.softmax(q @ keys.transpose(1, 2) * impl.scale, dim=-1)
                want = (probs @ values).view(-1, impl.head_size)
                err = (output[t].double().view(-1, impl.head_size) - want).abs().max().item()
                impl.store_checks.append(("decode", err < 3e-2, nv, end - start))
            return result

        impl._compact, impl.forward = checked_compact, checked_forward
        wrapped += 1
    return wrapped


def store_check_results(worker) -> list[tuple[str, bool, int, int]]:
    """``(kind, passed, n1, n2)`` of every check recorded by :func:`install_store_checks`."""
    from vllm.model_executor.layers.attention import Attention

    return [
        check
        for module in worker.model_runner.model.modules()
        if isinstance(module, Attention)
        for check in getattr(module.impl, "store_checks", [])
    ]
