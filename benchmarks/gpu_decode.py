"""The Triton attention kernels against FlashAttention-class SDPA, on a GPU machine.

For each shape (heads, batch, context) one set of tokens: SDPA
(``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)``) over
their dense K/V is the baseline. Timed against it, with CUDA events, bfloat16,
score accumulation off and on (``score_window`` 0 and 32):

* exact: ``triton_decode.paged_decode_attention`` over the same tokens in a
  shuffled paged cache;
* quantized at budget 10% and 25%: ``paged_decode_attention_quantized`` over
  what a request of that context holds after compaction with the default
  config (``policy.split_budget``): its oldest tokens as 4-bit records in its
  vague-store pages, its newest as exact slots.

Prompt chunks: ``triton_prefill.paged_prefill_attention`` for a 512-token chunk
at the end of each context (batch 1 and 4) against SDPA with a bottom-right
causal mask over the dense K/V (``prefill`` in the JSON, with TFLOP/s).

Each row has both times, their ratio, the bytes the kernel must read (cache
slots it covers) and its achieved bandwidth, and the output's error against
SDPA over the same (for quantized: revived) tokens; on the smallest exact case,
its scores against the PyTorch reference. ``targets`` in the JSON are issue
19's decode targets, each with its measured value and whether it is met.

Needs torch (CUDA build) and triton; no vLLM, no compiled extension. Writes
``gpu_decode.json`` to ``--out``. ``--dry-run`` builds the smallest shape on the
CPU, runs its exact and quantized cases once under Triton's interpreter, checks
them and exits.
``--compile-check`` compiles the kernels for sm_90 (exact bf16/fp32 and
quantized, D 64 and 128) with Triton's bundled ptxas, no GPU needed: it catches
errors in the GPU-only code paths (tensor-core dots) the interpreter never runs.
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kvreviver_vllm import layout, policy  # noqa: E402
from kvreviver_vllm.config import KVReviverConfig, budget_tokens  # noqa: E402
from kvreviver_vllm.ops import reference, triton_decode, triton_prefill  # noqa: E402

HEADS = [(9, 3, 64), (32, 8, 128)]  # (query heads, KV heads, head size)
BATCHES = [1, 16, 64]
CONTEXTS = [2048, 8192, 32768]
BUDGETS = [None, 0.25, 0.1]  # None: exact slots only
SCORE_WINDOWS = [0, 32]
PREFILL_BATCHES = [1, 4]
PREFILL_CHUNK = 512  # new tokens of a prompt chunk (kvreviver serve's step)
TOLERANCE = 1.6e-2  # bfloat16 output
MEMORY_LIMIT = 20e9  # bytes: skip cases whose cache + dense copy + scratch exceed it


def case_bytes(num_q, num_kv, head_size, batch, context, dtype=torch.bfloat16) -> int:
    """Device memory of one case: paged cache, dense K/V, logit scratch."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache = triton_decode.decode_bytes(batch, num_kv, context, head_size, dtype)
    dense = batch * num_kv * context * 2 * head_size * itemsize
    return cache + dense + batch * num_q * context * 4


def make_case(num_q, num_kv, head_size, block_size, batch, context, dtype, device, seed=0):
    """A shuffled paged cache of random K/V (positions 0.., scores 0), its block
    table, the dense K/V ``[batch, Hkv, context, D]`` of the same tokens and a query."""
    gen = torch.Generator(device=device).manual_seed(seed)
    per_req = math.ceil(context / block_size)
    num_blocks = batch * per_req + 1
    width = layout.slot_width(head_size, dtype)
    cache = torch.randn(num_blocks, num_kv, block_size, width, generator=gen, device=device,
                        dtype=torch.float32).to(dtype)
    positions, scores = layout.slot_meta(cache)
    positions.copy_(torch.arange(block_size, device=device, dtype=torch.int32))  # any int
    scores.zero_()
    order = torch.randperm(num_blocks, generator=gen, device=device)[: batch * per_req]
    table = order.view(batch, per_req).to(torch.int32)
    # Dense copy: slot t of request r is block table[r, t // bs], offset t % bs.
    def dense(part: slice) -> torch.Tensor:
        rows = cache[table.long(), :, :, part]  # [batch, per_req, Hkv, bs, D]
        rows = rows.permute(0, 2, 1, 3, 4).reshape(batch, num_kv, per_req * block_size, head_size)
        return rows[:, :, :context].contiguous()

    keys = dense(slice(0, head_size))
    values = dense(slice(head_size, 2 * head_size))
    query = torch.randn(batch, num_q, head_size, generator=gen, device=device,
                        dtype=torch.float32).to(dtype)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return cache, table, lens, keys, values, query


def sdpa(query, keys, values, scale):
    """Dense decode attention: ``query [B, Hq, D]`` -> ``[B, Hq, D]``."""
    return F.scaled_dot_product_attention(query[:, :, None], keys, values, scale=scale,
                                          enable_gqa=True)[:, :, 0]


def cuda_time(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn()`` over ``iters`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def score_error(cache, table, lens, query, scale) -> float:
    """Max |score| difference of one scoring call against the reference."""
    ref_cache, tri_cache = cache.clone(), cache.clone()
    num_reqs = query.shape[0]
    qsl = torch.arange(num_reqs + 1, dtype=torch.int32, device=query.device)
    reference.paged_attention(torch.empty_like(query), query, ref_cache, table, lens, qsl,
                              scale, 1)
    triton_decode.paged_decode_attention(torch.empty_like(query), query, tri_cache, table, lens,
                                         scale, 1)
    _, want = layout.slot_meta(ref_cache)
    _, got = layout.slot_meta(tri_cache)
    return (got - want).abs().max().item()


def compressed_case(keys, values, budget, block_size, dtype, bits, value_bits, seed=0):
    """What each request (dense ``keys/values [B, Hkv, context, D]``) holds after
    a compaction to ``budget`` with the default config, records of ``bits``-bit
    keys and ``value_bits``-bit values: its oldest ``records``
    tokens as records in its vague-store pages, its newest ``exact`` as exact
    slots. Returns the paged cache, block table, ``(pages, seq_lens, records)``
    per request and the revived dense K/V the kernel must attend to."""
    batch, num_kv, context, head_size = keys.shape
    device = keys.device
    config = KVReviverConfig()
    width = layout.slot_width(head_size, dtype)
    slot_bytes = width * torch.empty((), dtype=dtype).element_size()
    store = reference.QuantizedRecords(head_size, bits, slot_bytes, value_bits)
    exact, records = policy.split_budget(
        budget_tokens(budget, context, config.floor_tokens), context, 0, config.floor_tokens,
        store, config.candidates, config.candidate_share)
    pages = store.slots_for(records)
    old = slice(0, records)
    new = slice(context - exact, context)
    encoded = store.encode(keys[:, :, old].reshape(-1, head_size).float(),
                           values[:, :, old].reshape(-1, head_size).float(),
                           torch.arange(records, device=device).repeat(batch * num_kv),
                           torch.zeros(batch * num_kv * records, device=device))
    revived_k, revived_v, _, _ = store.decode(encoded)
    # One request's slots, dense: [vague-store pages | exact slots | unused].
    per_req = math.ceil((pages + exact) / block_size)
    slots = torch.zeros(batch, num_kv, per_req * block_size, slot_bytes, dtype=torch.uint8,
                        device=device)
    page_bytes = torch.zeros(batch, num_kv, pages * slot_bytes, dtype=torch.uint8, device=device)
    page_bytes[..., : records * store.record_bytes] = encoded.view(batch, num_kv, -1)
    slots[:, :, :pages] = page_bytes.view(batch, num_kv, pages, slot_bytes)
    exact_slots = slots[:, :, pages : pages + exact].view(dtype)  # [B, Hkv, exact, width]
    exact_slots[..., :head_size] = keys[:, :, new]
    exact_slots[..., head_size : 2 * head_size] = values[:, :, new]
    gen = torch.Generator(device=device).manual_seed(seed)
    num_blocks = batch * per_req + 1
    table = torch.randperm(num_blocks, generator=gen, device=device)[: batch * per_req]
    table = table.view(batch, per_req).to(torch.int32)
    cache = torch.zeros(num_blocks, num_kv, block_size, width, dtype=dtype, device=device)
    cache[table.long()] = slots.view(dtype).view(batch, num_kv, per_req, block_size,
                                                 width).transpose(1, 2)
    shape = (batch,)
    spans = (torch.full(shape, pages, dtype=torch.int32, device=device),
             torch.full(shape, pages + exact, dtype=torch.int32, device=device),
             torch.full(shape, records, dtype=torch.int32, device=device))
    dense_k = torch.cat([revived_k.view(batch, num_kv, records, head_size),
                         keys[:, :, new].float()], dim=2)
    dense_v = torch.cat([revived_v.view(batch, num_kv, records, head_size),
                         values[:, :, new].float()], dim=2)
    return cache, table, spans, dense_k, dense_v, dict(exact=exact, records=records,
                                                       slots=pages + exact)


def run_shape(num_q, num_kv, head_size, batch, context, args, device) -> list[dict]:
    """Every case of one shape: SDPA once, then exact and each budget, each
    score window."""
    dtype = torch.bfloat16
    cache, table, lens, keys, values, query = make_case(
        num_q, num_kv, head_size, args.block_size, batch, context, dtype, device)
    scale = head_size**-0.5
    out = torch.empty_like(query)
    timed = device.type == "cuda"
    full = sdpa(query, keys, values, scale)
    sdpa_ms = cuda_time(lambda: sdpa(query, keys, values, scale), args.warmup,
                        args.iters) if timed else None
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for budget in BUDGETS:
        if budget is None:
            held = dict(slots=context, exact=context, records=0)
            want = full

            def kernel(score_window):
                triton_decode.paged_decode_attention(
                    out, query, cache, table, lens, scale, score_window,
                    split_size=args.split_size, max_seq_len=context)
        else:
            del cache  # the full paged cache: not needed any more
            cache, table, spans, dense_k, dense_v, held = compressed_case(
                keys, values, budget, args.block_size, dtype, args.bits, args.value_bits)
            pages, seq_lens, records = spans
            want = sdpa(query.float(), dense_k, dense_v, scale)
            del dense_k, dense_v

            def kernel(score_window):
                triton_decode.paged_decode_attention_quantized(
                    out, query, cache, table, pages, seq_lens, records, scale, score_window,
                    args.bits, layout.record_group(head_size), args.value_bits,
                    split_size=args.split_size, max_tokens=held["records"] + held["exact"])
        for score_window in SCORE_WINDOWS:
            kernel(score_window)
            row = dict(heads=[num_q, num_kv, head_size], batch=batch, context=context,
                       budget=budget, score_window=score_window, block_size=args.block_size,
                       **held, out_err=(out.float() - want.float()).abs().max().item())
            smallest = context == min(CONTEXTS) and batch == min(BATCHES)
            if budget is None and score_window and smallest and timed:
                row["score_err"] = score_error(cache, table, lens, query, scale)
            row["ok"] = row["out_err"] <= TOLERANCE and row.get("score_err", 0.0) <= 1e-3
            if timed:
                kernel_ms = cuda_time(lambda: kernel(score_window), args.warmup, args.iters)
                nbytes = batch * num_kv * held["slots"] * (2 * head_size * itemsize
                                                           + layout.META_BYTES)
                row.update(kernel_ms=kernel_ms, sdpa_ms=sdpa_ms, ratio=kernel_ms / sdpa_ms,
                           kernel_gbps=nbytes / kernel_ms / 1e6)
            rows.append(row)
    return rows


def run_prefill(num_q, num_kv, head_size, batch, context, args, device) -> list[dict]:
    """A prompt chunk of ``PREFILL_CHUNK`` new tokens at the end of ``context``
    tokens per request: ``triton_prefill`` over the paged cache against SDPA
    (FlashAttention, causal, bottom-right aligned) over the dense K/V."""
    from torch.nn.attention.bias import causal_lower_right

    dtype = torch.bfloat16
    cache, table, lens, keys, values, _ = make_case(
        num_q, num_kv, head_size, args.block_size, batch, context, dtype, device)
    chunk = min(PREFILL_CHUNK, context)
    gen = torch.Generator(device=device).manual_seed(1)
    query = torch.randn(batch * chunk, num_q, head_size, generator=gen, device=device,
                        dtype=torch.float32).to(dtype)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=device) * chunk
    requests = torch.arange(batch, dtype=torch.int32, device=device)
    scale = head_size**-0.5
    group = num_q // num_kv
    dense_q = query.view(batch, chunk, num_q, head_size).transpose(1, 2)
    dense_k = keys.repeat_interleave(group, dim=1)
    dense_v = values.repeat_interleave(group, dim=1)
    mask = causal_lower_right(chunk, context)

    def flash():
        return F.scaled_dot_product_attention(dense_q, dense_k, dense_v, attn_mask=mask,
                                              scale=scale)

    want = flash().transpose(1, 2).reshape(batch * chunk, num_q, head_size)
    timed = device.type == "cuda"
    sdpa_ms = cuda_time(flash, args.warmup, args.iters) if timed else None
    out = torch.empty_like(query)
    rows = []
    for score_window in SCORE_WINDOWS:
        def kernel():
            triton_prefill.paged_prefill_attention(out, query, cache, table, lens, qsl, scale,
                                                   score_window, requests, chunk, context)
        kernel()
        row = dict(heads=[num_q, num_kv, head_size], batch=batch, context=context,
                   chunk=chunk, score_window=score_window, block_size=args.block_size,
                   out_err=(out.float() - want.float()).abs().max().item())
        row["ok"] = row["out_err"] <= TOLERANCE
        if timed:
            kernel_ms = cuda_time(kernel, args.warmup, args.iters)
            # Causal chunk at the end of the context: chunk * (context - chunk / 2)
            # query-key pairs per head, 4 * D flops each (QK and PV).
            flops = batch * num_q * chunk * (context - chunk / 2) * 4 * head_size
            row.update(kernel_ms=kernel_ms, sdpa_ms=sdpa_ms, ratio=kernel_ms / sdpa_ms,
                       kernel_tflops=flops / kernel_ms / 1e9)
        rows.append(row)
    return rows


def decode_targets(rows: list[dict]) -> dict:
    """Issue 19's decode targets from the timed rows: each with the worst
    measured value over the cases it covers, its limit and whether it is met."""
    def worst(select, value) -> float | None:
        found = [value(r) for r in rows if "ratio" in r and select(r)]
        return max(found) if found else None

    def score_cost(r) -> float:
        base = next(b for b in rows if b["heads"] == r["heads"] and b["batch"] == r["batch"]
                    and b["context"] == r["context"] and b["budget"] == r["budget"]
                    and b["score_window"] == 0)
        return r["kernel_ms"] / base["kernel_ms"] - 1.0

    targets = {
        "exact, batch >= 16, context >= 8k: ours / SDPA": (worst(
            lambda r: r["budget"] is None and r["batch"] >= 16 and r["context"] >= 8192,
            lambda r: r["ratio"]), 1.5),
        "exact, batch 1, 32k: ours / SDPA": (worst(
            lambda r: r["budget"] is None and r["batch"] == 1 and r["context"] == 32768,
            lambda r: r["ratio"]), 3.0),
        "quantized 10%, batch 16, 32k: ours / SDPA over the full context": (worst(
            lambda r: r["budget"] == 0.1 and r["batch"] == 16 and r["context"] == 32768,
            lambda r: r["ratio"]), 0.5),
        "score_window 32 over 0 (added time, share)": (worst(
            lambda r: r["score_window"] > 0, score_cost), 0.2),
    }
    return {name: dict(value=value, limit=limit, met=value is not None and value <= limit)
            for name, (value, limit) in targets.items()}


def describe(row: dict) -> str:
    q, kv, d = row["heads"]
    if "chunk" in row:
        text = (f"prefill {q:>2}/{kv}/{d:<3} batch {row['batch']:>2} ctx {row['context']:>5} "
                f"chunk {row['chunk']} sw {row['score_window']:>2}: out_err {row['out_err']:.2e}")
        if "kernel_ms" in row:
            text += (f" | triton {row['kernel_ms']:.3f} ms  sdpa {row['sdpa_ms']:.3f} ms  "
                     f"ratio {row['ratio']:.2f}  {row['kernel_tflops']:.0f} TFLOP/s")
        return text
    held = "exact" if row["budget"] is None else f"{row['budget']:.0%} ({row['records']} rec)"
    text = (f"{q:>2}/{kv}/{d:<3} batch {row['batch']:>2} ctx {row['context']:>5} {held:>15} "
            f"sw {row['score_window']:>2}: out_err {row['out_err']:.2e}")
    if "score_err" in row:
        text += f" score_err {row['score_err']:.2e}"
    if "kernel_ms" in row:
        text += (f" | triton {row['kernel_ms']:.3f} ms  sdpa {row['sdpa_ms']:.3f} ms  "
                 f"ratio {row['ratio']:.2f}  {row['kernel_gbps']:.0f} GB/s")
    return text


def compile_check(arch: int = 90) -> None:
    """Ahead-of-time compile of every kernel variant for ``sm_{arch}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def compile_one(fn, types: dict, consts: dict) -> None:
        names = list(fn.arg_names)
        signature = {n: "constexpr" if n in consts else types[n] for n in names}
        src = ASTSource(fn, signature, constexprs={(names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4})
        loads = kernel.asm["ptx"].count("ld.global")
        print(f"  {fn.__name__}: ok, {kernel.metadata.shared} B shared memory, "
              f"{loads} global loads in its PTX")

    # Quantized: 4-bit codes, and 3-bit ones (3 words per 32 codes), unpack from whole words.
    for dt, quant, bits, value_bits in [("bf16", False, 4, 4), ("fp32", False, 4, 4),
                                        ("bf16", True, 4, 4), ("bf16", True, 3, 2)]:
        itemsize = 4 if dt == "fp32" else 2
        print(f"sm_{arch} {dt}{f' quantized {bits}/{value_bits}-bit' if quant else ''}:")
        for head_size, group in [(64, 3), (128, 4)]:
            width = 2 * head_size + layout.META_BYTES // itemsize
            compile_one(triton_decode._split_kernel, dict(
                query=f"*{dt}", kv_cache=f"*{dt}", cache_i16="*i16",
                cache_i32="*i32", block_table="*i32",
                lengths="*i32", exact_start="*i32", vague_tokens="*i32", part_max="*fp32",
                part_sum="*fp32", part_acc="*fp32", logits="*fp32", qk_scale="fp32",
                stride_qr="i32", stride_qh="i32", stride_bt="i32", num_splits="i32",
                max_len="i32",
            ), dict(
                NUM_KV_HEADS=3, GROUP=group, GROUP_PAD=16, HEAD=head_size, BLOCK_SIZE=16,
                WIDTH=width, SPLIT=256, TILE=64, SCORES=True, DOT_F32=dt == "fp32",
                QUANT=quant, BITS=bits, VALUE_BITS=value_bits, CHANNELS=32,
                RECORD=layout.record_bytes(head_size, bits, 32, value_bits),
                SLOT_BYTES=width * itemsize,
            ))
            if not quant:
                compile_one(triton_prefill._prefill_kernel, dict(
                    query=f"*{dt}", out=f"*{dt}", kv_cache=f"*{dt}", block_table="*i32",
                    seq_lens="*i32", query_start_loc="*i32", requests="*i32",
                    row_max="*fp32", row_sum="*fp32", qk_scale="fp32", stride_qt="i32",
                    stride_qh="i32", stride_ot="i32", stride_oh="i32", stride_bt="i32",
                ), dict(
                    NUM_KV_HEADS=3, GROUP=group, GROUP_PAD=4, HEAD=head_size, BLOCK_SIZE=16,
                    WIDTH=width, Q_TILE=16, TILE=64, STATS=True, DOT_F32=dt == "fp32",
                ))
                compile_one(triton_prefill._window_score_kernel, dict(
                    query=f"*{dt}", kv_cache=f"*{dt}", scores_f32="*fp32", block_table="*i32",
                    seq_lens="*i32", query_start_loc="*i32", requests="*i32",
                    row_max="*fp32", row_sum="*fp32", qk_scale="fp32", score_window="i32",
                    stride_qt="i32", stride_qh="i32", stride_bt="i32",
                ), dict(
                    NUM_KV_HEADS=3, GROUP=group, GROUP_PAD=4, HEAD=head_size, BLOCK_SIZE=16,
                    WIDTH=width, WIDTH32=width * itemsize // 4, WINDOW_PAD=32, TILE=64,
                    DOT_F32=dt == "fp32",
                ))
        compile_one(triton_decode._merge_kernel, dict(
            out=f"*{dt}", part_max="*fp32", part_sum="*fp32", part_acc="*fp32", stats="*fp32",
            seq_lens="*i32", stride_or="i32", stride_oh="i32", num_splits="i32",
        ), dict(NUM_Q_HEADS=9, HEAD=64, SPLIT=256, SPLITS_PAD=128, CHUNK=16, SCORES=True))
        compile_one(triton_decode._score_kernel, dict(
            scores_f32="*fp32", block_table="*i32", lengths="*i32", exact_start="*i32",
            vague_tokens="*i32", logits="*fp32", stats="*fp32", stride_bt="i32", max_len="i32",
        ), dict(NUM_KV_HEADS=3, GROUP=3, GROUP_PAD=4, BLOCK_SIZE=16, WIDTH32=66, TILE=128,
                QUANT=quant, RECORD=88))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--split-size", type=int, default=None, help="default: chosen per case")
    parser.add_argument("--bits", type=int, default=KVReviverConfig().bits,
                        help="the store's key bits (default: the config's)")
    parser.add_argument("--value-bits", type=int, default=KVReviverConfig().value_bits,
                        help="the store's value bits (0: --bits); the long-context store: "
                        "--bits 3 --value-bits 2")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--dry-run", action="store_true",
                        help="smallest case on the CPU under TRITON_INTERPRET, then exit")
    parser.add_argument("--compile-check", action="store_true",
                        help="compile the kernels for sm_90 (no GPU needed), then exit")
    args = parser.parse_args()

    if args.compile_check:
        assert os.environ.get("TRITON_INTERPRET", "0") != "1", "unset TRITON_INTERPRET"
        compile_check()
        return 0

    if args.dry_run:
        q, kv, d = HEADS[0]
        rows = run_shape(q, kv, d, min(BATCHES), min(CONTEXTS), args, torch.device("cpu"))
        rows += run_prefill(q, kv, d, min(PREFILL_BATCHES), 640, args, torch.device("cpu"))
        for row in rows:
            print("dry run:", describe(row))
        return 0 if all(row["ok"] for row in rows) else 1

    assert torch.cuda.is_available(), "needs a CUDA GPU (or --dry-run)"
    device = torch.device("cuda")
    rows = []
    for num_q, num_kv, head_size in HEADS:
        for batch in BATCHES:
            for context in CONTEXTS:
                need = case_bytes(num_q, num_kv, head_size, batch, context)
                if need > MEMORY_LIMIT:
                    print(f"skip {num_q}/{num_kv}/{head_size} batch {batch} ctx {context}: "
                          f"{need / 1e9:.1f} GB")
                    continue
                for row in run_shape(num_q, num_kv, head_size, batch, context, args, device):
                    rows.append(row)
                    print(describe(row) + ("" if row["ok"] else "  FAILED"), flush=True)
                torch.cuda.empty_cache()
    prefill_rows = []
    for num_q, num_kv, head_size in HEADS:
        for batch in PREFILL_BATCHES:
            for context in CONTEXTS:
                for row in run_prefill(num_q, num_kv, head_size, batch, context, args, device):
                    prefill_rows.append(row)
                    print(describe(row) + ("" if row["ok"] else "  FAILED"), flush=True)
                torch.cuda.empty_cache()
    targets = decode_targets(rows)
    for name, target in targets.items():
        value = "-" if target["value"] is None else f"{target['value']:.2f}"
        print(f"target {name}: {value} (limit {target['limit']}): "
              f"{'met' if target['met'] else 'NOT met'}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__,
                  store=dict(bits=args.bits, value_bits=args.value_bits or args.bits),
                  cases=rows, prefill=prefill_rows, targets=targets)
    (args.out / "gpu_decode.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'gpu_decode.json'}")
    return 0 if all(row["ok"] for row in rows + prefill_rows) else 1


if __name__ == "__main__":
    sys.exit(main())
