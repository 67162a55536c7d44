"""CUDA ops against the PyTorch reference, and their timings, on a GPU machine.

Needs only torch (CUDA build) and the extension built in place
(``benchmarks/gpu_check.sh`` does both); no vLLM, no pytest, no network.
Writes ``gpu_check.json`` to ``--out``. Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import kvreviver_vllm._C  # noqa: F401  (registers torch.ops.kvreviver, CPU and CUDA)
from kvreviver_vllm import layout
from kvreviver_vllm.ops import reference

HEADS = [(9, 3), (8, 8), (32, 4)]  # (query heads, KV heads): GQA 3, 1, 8


def make_case(num_q, num_kv, head_size, block_size, seq_lens, q_lens, dtype, seed):
    """A shuffled paged cache filled through the reference write_kv, on the CPU."""
    gen = torch.Generator().manual_seed(seed)
    per_req = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(per_req) + 2
    order = torch.randperm(num_blocks, generator=gen)
    width = layout.slot_width(head_size, dtype)
    cache = torch.zeros(num_blocks, num_kv, block_size, width, dtype=dtype)
    table = torch.zeros(len(seq_lens), max(per_req), dtype=torch.int32)
    used = 0
    for r, n in enumerate(seq_lens):
        row = order[used : used + per_req[r]]
        used += per_req[r]
        table[r, : len(row)] = row
        pos = torch.arange(n)
        slots = row[pos // block_size].long() * block_size + pos % block_size
        k = torch.randn(n, num_kv, head_size, generator=gen).to(dtype)
        v = torch.randn(n, num_kv, head_size, generator=gen).to(dtype)
        reference.write_kv(cache, k, v, slots, pos)
    query = torch.randn(sum(q_lens), num_q, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    return cache, table, torch.tensor(seq_lens, dtype=torch.int32), qsl, query


def check_attention(dtype, head_size, block_size, heads, seq_lens, q_lens, seed) -> dict:
    cache, table, lens, qsl, query = make_case(*heads, head_size, block_size, seq_lens, q_lens, dtype, seed)
    scale = head_size**-0.5
    want = torch.empty_like(query)
    ref_cache = cache.clone()
    reference.paged_attention(want, query, ref_cache, table, lens, qsl, scale, 32)
    got = torch.empty_like(query).cuda()
    gpu_cache = cache.cuda()
    torch.ops.kvreviver.paged_attention(got, query.cuda(), gpu_cache, table.cuda(), lens.cuda(),
                                        qsl.cuda(), scale, 32)
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    out_err = (got.cpu().float() - want.float()).abs().max().item()
    _, ref_scores = layout.slot_meta(ref_cache)
    _, gpu_scores = layout.slot_meta(gpu_cache.cpu())
    score_err = (gpu_scores - ref_scores).abs().max().item()
    return dict(dtype=str(dtype), head_size=head_size, block_size=block_size, heads=heads,
                seq_lens=seq_lens, q_lens=q_lens, out_err=out_err, score_err=score_err,
                ok=out_err <= tol and score_err <= 1e-3)


def check_quantized_attention(dtype, head_size, bits, vague, exact, q_lens, seed) -> dict:
    """Revival of a quantized store (records written by the reference) on the GPU."""

    gen = torch.Generator().manual_seed(seed)
    slot_bytes = layout.slot_width(head_size, dtype) * torch.finfo(dtype).bits // 8
    store = reference.QuantizedRecords(head_size, bits, slot_bytes)
    pages = [store.slots_for(n) for n in vague]
    cache, table, _, qsl, query = make_case(9, 3, head_size, 16, [p + e for p, e in zip(pages, exact)],
                                            q_lens, dtype, seed)
    for r, n in enumerate(vague):
        if not n:
            continue
        records = [store.encode(torch.randn(n, head_size, generator=gen), torch.randn(n, head_size, generator=gen),
                                torch.arange(n), torch.zeros(n)) for _ in range(3)]
        layout.write_store_pages(cache, table[r], torch.stack([store.to_pages(x) for x in records]))
    starts = torch.tensor(pages, dtype=torch.int32)
    lens = starts + torch.tensor(exact, dtype=torch.int32)
    num_vague = torch.tensor(vague, dtype=torch.int32)
    scale = head_size**-0.5
    want, ref_cache = torch.empty_like(query), cache.clone()
    reference.paged_attention_quantized(want, query, ref_cache, table, starts, lens, num_vague,
                                        qsl, scale, 32, bits, store.group, 0)
    got, gpu_cache = torch.empty_like(query).cuda(), cache.cuda()
    torch.ops.kvreviver.paged_attention_quantized(
        got, query.cuda(), gpu_cache, table.cuda(), starts.cuda(), lens.cuda(), num_vague.cuda(),
        qsl.cuda(), scale, 32, bits, store.group, 0)
    out_err = (got.cpu().float() - want.float()).abs().max().item()
    # Exact slots' and records' scores, both compared through the store's decoder.
    score_err = 0.0
    for r, (p, e, n) in enumerate(zip(pages, exact, vague)):
        blocks, offsets = layout.physical_slots(table[r], torch.arange(p, p + e), 16)
        exact_scores = [layout.slot_meta(c)[1][blocks, :, offsets] for c in (gpu_cache.cpu(), ref_cache)]
        score_err = max(score_err, (exact_scores[0] - exact_scores[1]).abs().max().item())
        if not n:
            continue
        decode = lambda c: torch.stack([store.decode(store.from_pages(x, n))[3]  # noqa: E731
                                        for x in layout.store_pages(c, table[r], p)])
        score_err = max(score_err, (decode(gpu_cache.cpu()) - decode(ref_cache)).abs().max().item())
    tol = 2e-5 if dtype == torch.float32 else 1.6e-2
    return dict(op="paged_attention_quantized", dtype=str(dtype), head_size=head_size, bits=bits,
                vague=vague, exact=exact, out_err=out_err, score_err=score_err,
                ok=out_err <= tol and score_err <= 1e-3)


def check_write_kv(dtype, seed) -> dict:
    gen = torch.Generator().manual_seed(seed)
    key, value = (torch.randn(50, 3, 64, generator=gen).to(dtype) for _ in range(2))
    slots = torch.randperm(4 * 32, generator=gen)[:50]
    slots[::7] = -1
    positions = torch.randint(0, 8192, (50,), generator=gen)
    want = torch.zeros(4, 3, 32, layout.slot_width(64, dtype), dtype=dtype)
    got = want.cuda()
    reference.write_kv(want, key, value, slots, positions)
    torch.ops.kvreviver.write_kv(got, key.cuda(), value.cuda(), slots.cuda(), positions.cuda())
    return dict(dtype=str(dtype), ok=torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)))


def check_store_ops(head_size, bits, seed) -> dict:
    """Quantized-record insert/reconstruction and the Count Sketch ops on CUDA."""
    gen = torch.Generator().manual_seed(seed)
    n = 500
    keys, values = torch.randn(n, head_size, generator=gen) * 3, torch.randn(n, head_size, generator=gen)
    positions = torch.randperm(8192, generator=gen)[:n]
    scores = torch.rand(n, generator=gen)
    want = reference.quantize_records(keys, values, positions, scores, bits, 32)
    got = torch.ops.kvreviver.quantize_records(keys.cuda(), values.cuda(), positions.cuda(),
                                               scores.cuda(), bits, 32)
    records_ok = torch.equal(got.cpu(), want)
    revived = torch.ops.kvreviver.dequantize_records(got, head_size, bits, 32)
    ref = reference.dequantize_records(want, head_size, bits, 32)
    revive_ok = all(torch.allclose(a.cpu(), b, atol=1e-5) for a, b in zip(revived, ref))
    coefficients = torch.randint(1, reference.SKETCH_PRIME, (3, 4), generator=gen)
    sums_k, sums_v = torch.zeros(3, 64, head_size), torch.zeros(3, 64, head_size)
    reference.count_sketch_add(sums_k, sums_v, keys, values, positions, coefficients)
    got_k, got_v = torch.zeros(3, 64, head_size).cuda(), torch.zeros(3, 64, head_size).cuda()
    torch.ops.kvreviver.count_sketch_add(got_k, got_v, keys.cuda(), values.cuda(), positions.cuda(),
                                         coefficients)
    add_ok = torch.allclose(got_k.cpu(), sums_k, atol=1e-3) and torch.allclose(got_v.cpu(), sums_v, atol=1e-3)
    est = torch.ops.kvreviver.count_sketch_estimate(got_v, positions.cuda(), coefficients)
    est_ok = torch.allclose(est.cpu(), reference.count_sketch_estimate(sums_v, positions, coefficients), atol=1e-3)
    query = torch.randn(7, head_size, generator=gen)
    logits = torch.ops.kvreviver.count_sketch_logits(query.cuda(), got_k, positions.cuda(), coefficients)
    logits_ok = torch.allclose(logits.cpu(), reference.count_sketch_logits(query, sums_k, positions, coefficients),
                               atol=1e-2, rtol=1e-3)
    return dict(op="vague_store", head_size=head_size, bits=bits, records=records_ok,
                revive=revive_ok, sketch_add=add_ok, sketch_estimate=est_ok, sketch_logits=logits_ok,
                ok=records_ok and revive_ok and add_ok and est_ok and logits_ok)


def check_compaction(dtype, head_size, bits, num_vague, num_exact, seed) -> dict:
    """compact_quantized and compact_slots on CUDA: the cache, byte for byte, equals
    the reference's on the CPU."""

    gen = torch.Generator().manual_seed(seed)
    slot_bytes = layout.slot_width(head_size, dtype) * torch.finfo(dtype).bits // 8
    store = reference.QuantizedRecords(head_size, bits, slot_bytes)
    pages = store.slots_for(num_vague)
    cache, table, _, _, _ = make_case(3, 3, head_size, 16, [pages + num_exact], [1], dtype, seed)
    positions, scores = layout.slot_meta(cache)
    blocks, offsets = layout.physical_slots(table[0], torch.arange(pages + num_exact), 16)
    positions[blocks, :, offsets] = (torch.arange(pages + num_exact, dtype=torch.int32)
                                     + num_vague)[:, None]
    # Few distinct scores, so ties decide what survives.
    scores[blocks, :, offsets] = torch.randint(0, 4, (pages + num_exact, 3), generator=gen).float()
    if num_vague:
        records = [store.encode(torch.randn(num_vague, head_size, generator=gen),
                                torch.randn(num_vague, head_size, generator=gen),
                                torch.arange(num_vague), torch.rand(num_vague, generator=gen))
                   for _ in range(3)]
        layout.write_store_pages(cache, table[0], torch.stack([store.to_pages(x) for x in records]))
    kept = torch.stack([torch.randperm(num_exact, generator=gen)[: num_exact // 3].sort().values
                        for _ in range(3)])
    keep_vague = (num_vague + num_exact - kept.shape[1]) // 2
    want, got = cache.clone(), cache.cuda()
    ranking = (0, store.pool_before, store.pool_after, store.pool_decay)  # value_bits 0: bits
    reference.compact_quantized(want, table[0], pages, pages + num_exact, num_vague, kept,
                                keep_vague, bits, store.group, *ranking)
    torch.ops.kvreviver.compact_quantized(got, table[0].cuda(), pages, pages + num_exact,
                                          num_vague, kept.cuda(), keep_vague, bits, store.group,
                                          *ranking)
    quantized_ok = torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    moved = torch.stack([torch.randperm(pages + num_exact, generator=gen)[:20].sort().values
                         for _ in range(3)])
    reference.compact_slots(want, table[0], moved)
    torch.ops.kvreviver.compact_slots(got, table[0].cuda(), moved.cuda())
    slots_ok = torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
    return dict(op="compaction", dtype=str(dtype), head_size=head_size, bits=bits,
                vague=num_vague, exact=num_exact, compact_quantized=quantized_ok,
                compact_slots=slots_ok, ok=quantized_ok and slots_ok)


def time_decode(batch: int, context: int) -> dict:
    cache, table, lens, qsl, query = make_case(9, 3, 64, 128, [context] * batch, [1] * batch,
                                               torch.bfloat16, 0)
    args = [torch.empty_like(query).cuda(), query.cuda(), cache.cuda(), table.cuda(), lens.cuda(),
            qsl.cuda(), 0.125, 0]
    for _ in range(5):
        torch.ops.kvreviver.paged_attention(*args)
    torch.cuda.synchronize()
    reps, start = 50, time.perf_counter()
    for _ in range(reps):
        torch.ops.kvreviver.paged_attention(*args)
    torch.cuda.synchronize()
    return dict(batch=batch, context=context, ms=(time.perf_counter() - start) / reps * 1e3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    checks = [check_write_kv(dt, 1) for dt in (torch.float32, torch.bfloat16, torch.float16)]
    seed = 0
    for dtype in (torch.float32, torch.bfloat16):
        for head_size in (64, 128):
            for block_size in (16, 32, 128):
                for heads in HEADS:
                    seed += 1
                    checks.append(check_attention(dtype, head_size, block_size, heads,
                                                  [1, 37, 300, 8192], [1, 5, 20, 1], seed))
    for dtype in (torch.float32, torch.bfloat16):
        for head_size in (64, 128):
            for bits in (2, 3, 4, 8):
                seed += 1
                checks.append(check_quantized_attention(dtype, head_size, bits, [0, 40, 700],
                                                        [5, 64, 300], [1, 5, 20], seed))
    for head_size in (64, 128):
        for bits in (2, 3, 4, 8):
            seed += 1
            checks.append(check_store_ops(head_size, bits, seed))
    for dtype in (torch.float32, torch.bfloat16):
        for head_size in (64, 128):
            for bits in (2, 4):
                for vague, exact in ((0, 40), (300, 200)):
                    seed += 1
                    checks.append(check_compaction(dtype, head_size, bits, vague, exact, seed))
    timings = [time_decode(b, c) for b in (1, 16) for c in (2048, 8192)]
    report = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  passed=sum(c["ok"] for c in checks), failed=sum(not c["ok"] for c in checks),
                  checks=checks, decode_timings=timings)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))
    print(f"{report['passed']} passed, {report['failed']} failed")
    for t in timings:
        print(f"decode batch {t['batch']:>2} context {t['context']:>5}: {t['ms']:.3f} ms")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
