"""The Triton decode kernel against FlashAttention-class SDPA, on a GPU machine.

Times ``kvreviver_vllm.ops.triton_decode.paged_decode_attention`` (paged cache,
one query row per request, optional score accumulation) against
``torch.nn.functional.scaled_dot_product_attention(..., enable_gqa=True)`` over
dense K/V of the same tokens, bfloat16, with CUDA events; reports each case's
milliseconds, their ratio and the kernel's achieved bandwidth
(``triton_decode.decode_bytes`` / time), and checks its output against SDPA's
(and, on the smallest context, its scores against the PyTorch reference).

Needs torch (CUDA build) and triton; no vLLM, no compiled extension. Writes
``gpu_decode.json`` to ``--out``. ``--dry-run`` builds the smallest case on the
CPU, runs the kernel once under Triton's interpreter, checks it and exits.
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

from kvreviver_vllm import layout  # noqa: E402
from kvreviver_vllm.ops import reference, triton_decode  # noqa: E402

HEADS = [(9, 3, 64), (32, 8, 128)]  # (query heads, KV heads, head size)
BATCHES = [1, 16, 64]
CONTEXTS = [2048, 8192, 32768]
SCORE_WINDOWS = [0, 1]
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


def run_case(num_q, num_kv, head_size, batch, context, score_window, args, device) -> dict:
    dtype = torch.bfloat16
    cache, table, lens, keys, values, query = make_case(
        num_q, num_kv, head_size, args.block_size, batch, context, dtype, device)
    scale = head_size**-0.5
    out = torch.empty_like(query)

    def kernel():
        triton_decode.paged_decode_attention(out, query, cache, table, lens, scale, score_window,
                                             split_size=args.split_size, max_seq_len=context)

    kernel()
    want = sdpa(query, keys, values, scale)
    out_err = (out.float() - want.float()).abs().max().item()
    row = dict(heads=[num_q, num_kv, head_size], batch=batch, context=context,
               score_window=score_window, block_size=args.block_size, out_err=out_err)
    smallest = context == min(CONTEXTS) and batch == min(BATCHES)
    if score_window and smallest and device.type == "cuda":
        row["score_err"] = score_error(cache, table, lens, query, scale)
    if device.type != "cuda":
        return row
    kernel_ms = cuda_time(kernel, args.warmup, args.iters)
    sdpa_ms = cuda_time(lambda: sdpa(query, keys, values, scale), args.warmup, args.iters)
    nbytes = triton_decode.decode_bytes(batch, num_kv, context, head_size, dtype)
    row.update(kernel_ms=kernel_ms, sdpa_ms=sdpa_ms, ratio=kernel_ms / sdpa_ms,
               kernel_gbps=nbytes / kernel_ms / 1e6)
    return row


def describe(row: dict) -> str:
    q, kv, d = row["heads"]
    text = (f"{q:>2}/{kv}/{d:<3} batch {row['batch']:>2} ctx {row['context']:>5} "
            f"sw {row['score_window']}: out_err {row['out_err']:.2e}")
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
        print(f"  {fn.__name__}: ok, {kernel.metadata.shared} B shared memory")

    for dt, quant in [("bf16", False), ("fp32", False), ("bf16", True)]:
        itemsize = 4 if dt == "fp32" else 2
        print(f"sm_{arch} {dt}{' quantized' if quant else ''}:")
        for head_size, group in [(64, 3), (128, 4)]:
            width = 2 * head_size + layout.META_BYTES // itemsize
            compile_one(triton_decode._split_kernel, dict(
                query=f"*{dt}", kv_cache=f"*{dt}", cache_u8="*u8", block_table="*i32",
                lengths="*i32", exact_start="*i32", vague_tokens="*i32", part_max="*fp32",
                part_sum="*fp32", part_acc="*fp32", logits="*fp32", qk_scale="fp32",
                stride_qr="i32", stride_qh="i32", stride_bt="i32", num_splits="i32",
                max_len="i32",
            ), dict(
                NUM_KV_HEADS=3, GROUP=group, GROUP_PAD=16, HEAD=head_size, BLOCK_SIZE=16,
                WIDTH=width, SPLIT=256, TILE=64, SCORES=True, DOT_F32=dt == "fp32" or quant,
                QUANT=quant, BITS=4, VALUE_BITS=4, CHANNELS=32,
                RECORD=layout.record_bytes(head_size, 4, 32), SLOT_BYTES=width * itemsize,
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
        row = run_case(q, kv, d, min(BATCHES), min(CONTEXTS), 1, args, torch.device("cpu"))
        print("dry run:", describe(row))
        return 0 if row["out_err"] <= 1.6e-2 else 1

    assert torch.cuda.is_available(), "needs a CUDA GPU (or --dry-run)"
    device = torch.device("cuda")
    rows, failed = [], False
    for num_q, num_kv, head_size in HEADS:
        for batch in BATCHES:
            for context in CONTEXTS:
                need = case_bytes(num_q, num_kv, head_size, batch, context)
                if need > MEMORY_LIMIT:
                    print(f"skip {num_q}/{num_kv}/{head_size} batch {batch} ctx {context}: "
                          f"{need / 1e9:.1f} GB")
                    continue
                for score_window in SCORE_WINDOWS:
                    row = run_case(num_q, num_kv, head_size, batch, context, score_window, args,
                                   device)
                    row["ok"] = row["out_err"] <= 1.6e-2 and row.get("score_err", 0.0) <= 1e-3
                    failed |= not row["ok"]
                    rows.append(row)
                    print(describe(row) + ("" if row["ok"] else "  FAILED"), flush=True)
                torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=__import__("triton").__version__, cases=rows)
    (args.out / "gpu_decode.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'gpu_decode.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
