"""CPU micro-benchmark of KVReviver's compiled ops.

What it measures, on CPU with torch using every available core:

* each compiled op (``torch.ops.kvreviver.paged_attention`` / ``write_kv`` /
  ``paged_attention_quantized`` and the vague-store ops ``quantize_records`` /
  ``dequantize_records`` / ``count_sketch_add`` / ``count_sketch_logits``) against its
  PyTorch reference (``kvreviver_vllm.sketch``), same signature, same inputs;
* the compiled ops against vLLM's own CPU kernels doing the same work:
  ``cpu_attention_with_kv_cache`` (outputs checked to agree with ours before timing) and
  ``cpu_attn_reshape_and_cache``. vLLM's scheduler metadata
  (``cpu_attn_get_scheduler_metadata``) is timed on its own and *not* included in the
  vLLM kernel time: vLLM builds it once per step and shares it across all layers.
  vLLM's KV split follows its default (``VLLM_CPU_ATTN_SPLIT_KV``);
* the cost of score accumulation: the compiled paged attention with
  ``score_window=32`` (the backend's default) against itself without (every other comparison runs without
  it, since neither vLLM nor the timed reference does that work).

Shapes use the default model's geometry (SmolLM2-135M: 9 query / 3 KV heads, head size 64,
bfloat16) with block size 128: decode (one query token per request) at batch 1 and 16 over
contexts of 2048 and 8192 tokens, one prefill (1024 new tokens, context 2048), and write_kv
for 16 (decode) and 1024 (prefill) tokens.

Timing: the implementations of a case are interleaved, one call of each per repeat in a
rotating order, after a warm-up; the number of repeats is chosen so a case takes ~2 s
(0.2 s with ``--quick``), but is at least 20 (5), so cases with a slow reference take longer.
Reported: the median ms per call, and ratios to the compiled op as the median over repeats
of the paired ratio (other / compiled) of calls made back to back, which is robust to load
that varies during the run. Other processes on the cores still inflate multi-threaded calls
(a thread descheduled mid-call stalls the rest): the load average at start is printed and
recorded, so a run on a busy machine can be recognised.

The compaction ops work in place: each call first restores the request's cache with a copy,
which is also timed alone and subtracted from both implementations.

``--attention-only`` times only the attention cases, and only ours against vLLM's: with no
reference call in between, vLLM's full-context KV (6 MB at 8k) stays in the CPU caches,
which favours vLLM at long contexts. It writes ``kernels-attention-only.{json,png}``.

Run:  .venv/bin/python benchmarks/kernels.py [--quick] [--attention-only] [--out DIR]

Writes ``kernels.json`` and ``kernels.png`` to ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from kvreviver_vllm import ops
from kvreviver_vllm.layout import slot_meta, slot_width, write_store_pages
from kvreviver_vllm.ops import reference as reference_ops
from kvreviver_vllm.config import KVReviverConfig
from kvreviver_vllm.stores import QuantizedStore

NUM_Q_HEADS = 9
NUM_KV_HEADS = 3
HEAD_SIZE = 64
BLOCK_SIZE = 128
DTYPE = torch.bfloat16
SCALE = HEAD_SIZE**-0.5
SCORE_WINDOW = KVReviverConfig().score_window
# The backend's decode attention is also timed at this budget against vLLM's
# attention over the full context (the target: <= 1.0x at 2k, <= 0.6x at 8k).
REVIVED_BUDGET = 0.1
TOLERANCE = 1.6e-2  # bf16 outputs, float32 accumulation (as in tests/kernels/test_compiled_ops.py)
BASELINE = "compiled"
COLORS = {
    "reference": "tab:blue",
    "compiled": "tab:orange",
    "compiled_scores": "tab:green",
    "vllm": "tab:red",
}
TIMED = tuple(COLORS)  # the implementations plotted, in this order
SPEEDUPS = ("reference/compiled", "vllm/compiled")  # > 1: the compiled op is faster
OVERHEAD = "compiled_scores/compiled"  # > 1: score accumulation costs time
RESTORE = "restore"  # an in-place op's input restored before each call: timed, subtracted


@dataclass(frozen=True)
class Case:
    """One benchmark case: ``batch`` requests, each with ``new_tokens`` new tokens
    (queries for attention, writes for write_kv) in a context of ``context`` tokens."""

    op: str
    phase: str
    batch: int
    context: int
    new_tokens: int

    @property
    def label(self) -> str:
        return f"{self.phase} b={self.batch} ctx={self.context} new={self.new_tokens}"


@dataclass(frozen=True)
class Settings:
    target_s: float  # wall time per case, all implementations together
    min_repeats: int
    max_repeats: int
    warmup: int


FULL = Settings(target_s=2.0, min_repeats=20, max_repeats=20_000, warmup=5)
QUICK = Settings(target_s=0.2, min_repeats=5, max_repeats=2_000, warmup=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller contexts, fewer repeats")
    parser.add_argument(
        "--attention-only",
        action="store_true",
        help="time only the attention cases, and only ours against vLLM's (the reference is "
        "still checked, not timed): back-to-back calls keep vLLM's full-context KV in the CPU "
        "caches, which the reference's calls otherwise evict",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the JSON and PNG reports",
    )
    return parser.parse_args()


def check_compiled_ops() -> None:
    """Exit with a clear message unless the compiled ops are loaded and were built from
    the same op signatures as the reference (a stale ``_C`` build is not benchmarked)."""
    if ops.implementation() != ops.COMPILED:
        raise SystemExit(
            "kvreviver_vllm._C is not built: nothing to benchmark "
            "(build it with `pip install --no-build-isolation -e .`)"
        )
    for name in ("write_kv", "paged_attention"):
        compiled = [a.name for a in getattr(torch.ops.kvreviver, name).default._schema.arguments]
        reference = list(inspect.signature(getattr(reference_ops, name)).parameters)
        if compiled != reference:
            raise SystemExit(
                f"kvreviver_vllm._C is stale: {name}{tuple(compiled)} does not match "
                f"reference.{name}{tuple(reference)}; rebuild with "
                "`pip install --no-build-isolation -e .`"
            )


def cases(quick: bool) -> list[Case]:
    """The decode and prefill cases for both ops."""
    contexts = (256, 1024) if quick else (2048, 8192)
    prefill_new, prefill_context = (256, 512) if quick else (1024, 2048)
    attention = [
        Case("paged_attention", "decode", batch, context, 1)
        for context in contexts
        for batch in (1, 16)
    ]
    attention.append(Case("paged_attention", "prefill", 1, prefill_context, prefill_new))
    attention += [
        Case("revived_attention", f"decode@{REVIVED_BUDGET:.0%}", batch, context, 1)
        for context in contexts
        for batch in (1, 16)
        # The budget must leave room for a store beside sink + recent.
        if REVIVED_BUDGET * context > KVReviverConfig().sink + KVReviverConfig().recent
    ]
    write = [
        Case("write_kv", "decode", 16, contexts[-1], 1),
        Case("write_kv", "prefill", 1, prefill_context, prefill_new),
    ]
    # Vague-store ops, one KV head: a compaction encodes a batch of demoted
    # tokens; revival reads a store of a quarter of the longest context.
    demoted, stored = 128, contexts[-1] // 4
    store = [
        Case("quantize_records", "insert", 1, stored, demoted),
        Case("dequantize_records", "revive", 1, stored, stored),
        Case("count_sketch_add", "insert", 1, stored, demoted),
        Case("count_sketch_logits", "revive", 1, stored, NUM_Q_HEADS // NUM_KV_HEADS),
    ]
    # Compaction of one request at budget 10% of the longest context: its store
    # plus sink + recent + 256 newer exact tokens, back to the budget.
    compaction = [
        Case("compact_quantized", "compact", 1, contexts[-1], 256),
        Case("compact_slots", "compact", 1, contexts[-1], 256),
    ]
    return attention + write + store + compaction


def load_vllm_kernels():
    """vLLM's CPU custom ops, the attention ISA it picks for our geometry, and its KV-split flag."""
    from vllm import _custom_ops as vllm_ops
    from vllm import envs
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    current_platform.import_kernels()
    isa = _get_attn_isa(DTYPE, BLOCK_SIZE, HEAD_SIZE, "auto")
    return vllm_ops, isa, envs.VLLM_CPU_ATTN_SPLIT_KV


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def environment(quick: bool, isa: str, kv_split: bool) -> dict:
    import vllm

    return {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "cpu_model": cpu_model(),
        "vllm_attn_isa": isa,
        "vllm_enable_kv_split": kv_split,
        "geometry": {
            "num_q_heads": NUM_Q_HEADS,
            "num_kv_heads": NUM_KV_HEADS,
            "head_size": HEAD_SIZE,
            "block_size": BLOCK_SIZE,
            "dtype": str(DTYPE).removeprefix("torch."),
        },
    }


class PagedLayout:
    """Shuffled block tables for ``case.batch`` requests of ``case.context`` tokens, the
    global slots and positions of all their tokens, and of each request's last
    ``case.new_tokens`` tokens."""

    def __init__(self, case: Case, gen: torch.Generator):
        blocks_per_req = math.ceil(case.context / BLOCK_SIZE)
        self.num_blocks = case.batch * blocks_per_req + 1
        perm = torch.randperm(self.num_blocks, generator=gen)[: case.batch * blocks_per_req]
        self.block_table = perm.view(case.batch, blocks_per_req).to(torch.int32)
        self.seq_lens = torch.full((case.batch,), case.context, dtype=torch.int32)
        self.query_start_loc = torch.arange(case.batch + 1, dtype=torch.int32) * case.new_tokens
        positions = torch.arange(case.context).expand(case.batch, -1)
        slots = self.block_table.long().gather(1, positions // BLOCK_SIZE) * BLOCK_SIZE
        slots += positions % BLOCK_SIZE
        self.context_slots, self.context_positions = slots.flatten(), positions.flatten()
        new = slice(case.context - case.new_tokens, None)
        self.new_slots, self.new_positions = slots[:, new].flatten(), positions[:, new].flatten()

    def our_cache(self) -> torch.Tensor:
        width = slot_width(HEAD_SIZE, DTYPE)
        return torch.zeros(self.num_blocks, NUM_KV_HEADS, BLOCK_SIZE, width, dtype=DTYPE)

    def vllm_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        kv = torch.zeros(self.num_blocks, NUM_KV_HEADS, 2 * BLOCK_SIZE, HEAD_SIZE, dtype=DTYPE)
        key_cache, value_cache = kv.chunk(2, dim=2)
        return key_cache, value_cache


def random_kv(num_tokens: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (num_tokens, NUM_KV_HEADS, HEAD_SIZE)
    return torch.randn(shape, generator=gen).to(DTYPE), torch.randn(shape, generator=gen).to(DTYPE)


def vllm_attention(case: Case, layout: PagedLayout, query: torch.Tensor, key, value,
                   vllm_ops, isa: str, kv_split: bool, output: torch.Tensor):
    """Zero-argument calls of vLLM's CPU attention over ``layout``'s full contexts
    (holding ``key``/``value``) and of its per-step metadata build."""
    key_cache, value_cache = layout.vllm_cache()
    vllm_ops.cpu_attn_reshape_and_cache(
        key, value, key_cache, value_cache, layout.context_slots, isa,
        k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
    )  # fmt: skip

    def metadata() -> torch.Tensor:
        return vllm_ops.cpu_attn_get_scheduler_metadata(
            num_reqs=case.batch, num_heads=NUM_Q_HEADS, num_kv_heads=NUM_KV_HEADS,
            head_dim=HEAD_SIZE, seq_lens=layout.seq_lens, dtype=DTYPE,
            query_start_loc=layout.query_start_loc, causal=True, sliding_window_size=-1,
            isa=isa, enable_kv_split=kv_split, dynamic_causal=None, kv_cache_dtype="auto",
        )  # fmt: skip

    scheduler_metadata = metadata()

    def vllm() -> None:
        vllm_ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=output,
            query_start_loc=layout.query_start_loc, seq_lens=layout.seq_lens, scale=SCALE,
            causal=True, alibi_slopes=None, sliding_window=-1, block_table=layout.block_table,
            softcap=0.0, scheduler_metadata=scheduler_metadata, s_aux=None, dynamic_causal=None,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        )  # fmt: skip

    return vllm, metadata


def attention_impls(case: Case, vllm_ops, isa: str, kv_split: bool) -> dict[str, Callable]:
    """Zero-argument calls of each paged attention implementation (and of vLLM's metadata
    build) over identical contexts, after asserting that their outputs agree. The
    score-accumulating call only changes slot scores, which no implementation reads."""
    gen = torch.Generator().manual_seed(0)
    layout = PagedLayout(case, gen)
    key, value = random_kv(len(layout.context_slots), gen)
    cache = layout.our_cache()
    torch.ops.kvreviver.write_kv(cache, key, value, layout.context_slots, layout.context_positions)
    query = torch.randn(case.batch * case.new_tokens, NUM_Q_HEADS, HEAD_SIZE, generator=gen)
    query = query.to(DTYPE)
    args = (query, cache, layout.block_table, layout.seq_lens, layout.query_start_loc, SCALE)
    outputs = {name: torch.empty_like(query) for name in TIMED}
    vllm, metadata = vllm_attention(case, layout, query, key, value, vllm_ops, isa, kv_split,
                                    outputs["vllm"])
    compiled = torch.ops.kvreviver.paged_attention
    impls = {
        "reference": lambda: reference_ops.paged_attention(outputs["reference"], *args, 0),
        "compiled": lambda: compiled(outputs["compiled"], *args, 0),
        "compiled_scores": lambda: compiled(outputs["compiled_scores"], *args, SCORE_WINDOW),
        "vllm": vllm,
        "vllm_metadata": metadata,
    }
    for name in TIMED:
        impls[name]()
    for name in ("reference", "compiled_scores", "vllm"):
        torch.testing.assert_close(
            outputs[name], outputs[BASELINE], atol=TOLERANCE, rtol=TOLERANCE,
            msg=lambda m, name=name: f"{case.label}: {name} vs {BASELINE}: {m}",
        )  # fmt: skip
    return impls


def write_random_store(cache: torch.Tensor, block_row: torch.Tensor, store: QuantizedStore,
                       num_tokens: int, gen: torch.Generator, scores: Callable) -> None:
    """One request's store pages: ``num_tokens`` records of random K/V per KV head,
    positions 0.., scores ``scores(num_tokens)``."""
    records = [store.encode(torch.randn(num_tokens, HEAD_SIZE, generator=gen),
                            torch.randn(num_tokens, HEAD_SIZE, generator=gen),
                            torch.arange(num_tokens), scores(num_tokens))
               for _ in range(NUM_KV_HEADS)]
    write_store_pages(cache, block_row, torch.stack([store.to_pages(x) for x in records]))


def revived_impls(case: Case, vllm_ops, isa: str, kv_split: bool) -> dict[str, Callable]:
    """The backend's decode attention at budget ``REVIVED_BUDGET`` (default config: sink +
    recent exact, the rest of the budget a 4-bit store, full) against vLLM's attention over
    the full context. Compiled and reference outputs must agree; vLLM's cannot (it sees
    every token exactly), so it is timed only."""
    config = KVReviverConfig()
    gen = torch.Generator().manual_seed(0)
    budget = math.ceil(REVIVED_BUDGET * case.context)
    exact = config.sink + config.recent
    store = QuantizedStore(HEAD_SIZE, config.bits, slot_width(HEAD_SIZE, DTYPE) * 2)
    pages = budget - exact
    num_vague = store.capacity(pages)
    ours = PagedLayout(replace(case, context=budget), gen)
    cache = ours.our_cache()
    key, value = random_kv(len(ours.context_slots), gen)
    torch.ops.kvreviver.write_kv(cache, key, value, ours.context_slots, ours.context_positions)
    for r in range(case.batch):
        write_random_store(cache, ours.block_table[r], store, num_vague, gen, torch.zeros)
    query = torch.randn(case.batch, NUM_Q_HEADS, HEAD_SIZE, generator=gen).to(DTYPE)
    starts = torch.full((case.batch,), pages, dtype=torch.int32)
    vague = torch.full((case.batch,), num_vague, dtype=torch.int32)
    args = (query, cache, ours.block_table, starts, ours.seq_lens, vague, ours.query_start_loc, SCALE)
    outputs = {name: torch.empty_like(query) for name in TIMED}
    full = PagedLayout(case, gen)
    full_key, full_value = random_kv(len(full.context_slots), gen)
    vllm, metadata = vllm_attention(case, full, query, full_key, full_value, vllm_ops, isa,
                                    kv_split, outputs["vllm"])
    compiled = torch.ops.kvreviver.paged_attention_quantized
    impls = {
        "reference": lambda: reference_ops.paged_attention_quantized(
            outputs["reference"], *args, 0, store.bits, store.group, store.value_bits),
        "compiled": lambda: compiled(outputs["compiled"], *args, 0, store.bits, store.group),
        "compiled_scores": lambda: compiled(outputs["compiled_scores"], *args, SCORE_WINDOW,
                                            store.bits, store.group),
        "vllm": vllm,
        "vllm_metadata": metadata,
    }
    for name in TIMED:
        impls[name]()
    for name in ("reference", "compiled_scores"):
        torch.testing.assert_close(
            outputs[name], outputs[BASELINE], atol=TOLERANCE, rtol=TOLERANCE,
            msg=lambda m, name=name: f"{case.label}: {name} vs {BASELINE}: {m}",
        )  # fmt: skip
    return impls


def write_kv_impls(case: Case, vllm_ops, isa: str) -> dict[str, Callable]:
    """Zero-argument calls of each write_kv implementation storing the same new tokens,
    after asserting that the compiled op and the reference write identical caches."""
    gen = torch.Generator().manual_seed(0)
    layout = PagedLayout(case, gen)
    key, value = random_kv(len(layout.new_slots), gen)
    args = (key, value, layout.new_slots, layout.new_positions)
    caches = {name: layout.our_cache() for name in ("reference", "compiled")}
    key_cache, value_cache = layout.vllm_cache()
    impls = {
        "reference": lambda: reference_ops.write_kv(caches["reference"], *args),
        "compiled": lambda: torch.ops.kvreviver.write_kv(caches["compiled"], *args),
        "vllm": lambda: vllm_ops.cpu_attn_reshape_and_cache(
            key, value, key_cache, value_cache, layout.new_slots, isa,
            k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto",
        ),  # fmt: skip
    }
    for call in impls.values():
        call()
    assert torch.equal(caches["compiled"], caches["reference"]), f"{case.label}: caches differ"
    assert bool(caches["compiled"].any()), f"{case.label}: nothing was written"
    return impls


def store_impls(case: Case) -> dict[str, Callable]:
    """Compiled store op and its reference on the same inputs, after checking they
    agree (``new_tokens`` tokens inserted, or ``context`` tokens revived)."""
    gen = torch.Generator().manual_seed(0)
    config = KVReviverConfig()
    store = QuantizedStore(HEAD_SIZE, config.bits, slot_width(HEAD_SIZE, DTYPE) * 2)
    n = case.new_tokens if case.phase == "insert" else case.context
    keys, values = (torch.randn(n, HEAD_SIZE, generator=gen) for _ in range(2))
    positions, scores = torch.randperm(8192, generator=gen)[:n], torch.rand(n, generator=gen)
    coefficients = torch.randint(1, reference_ops.SKETCH_PRIME, (config.sketch_rows, 4), generator=gen)
    sums = torch.randn(config.sketch_rows, config.sketch_buckets, HEAD_SIZE, generator=gen)
    query = torch.randn(case.new_tokens, HEAD_SIZE, generator=gen)
    records = reference_ops.quantize_records(keys, values, positions, scores, store.bits, store.group)
    args = {
        "quantize_records": (keys, values, positions, scores, store.bits, store.group),
        "dequantize_records": (records, HEAD_SIZE, store.bits, store.group),
        "count_sketch_add": (sums.clone(), sums.clone(), keys, values, positions, coefficients),
        "count_sketch_logits": (query, sums, positions, coefficients),
    }[case.op]
    reference, compiled = getattr(reference_ops, case.op), getattr(torch.ops.kvreviver, case.op)
    if case.op == "count_sketch_add":  # in place: compare the sums after one call each
        want, got = [a.clone() for a in args[:2]], [a.clone() for a in args[:2]]
        reference(*want, *args[2:])
        compiled(*got, *args[2:])
    else:
        want, got = reference(*args), compiled(*args)
    for w, g in zip(*(x if isinstance(x, (tuple, list)) else (x,) for x in (want, got))):
        torch.testing.assert_close(g, w, atol=1e-3, rtol=1e-4, msg=lambda m: f"{case.label}: {m}")
    return {"reference": lambda: reference(*args), "compiled": lambda: compiled(*args)}


def compaction_impls(case: Case) -> dict[str, Callable]:
    """A compaction (``compact_quantized``: exact slots demoted into the 4-bit store;
    ``compact_slots``: evict's move) compiled and reference, each call on the
    request's cache restored by a copy, after checking that both leave the same
    bytes. The copy alone is timed as ``restore`` and subtracted (``summarize``)."""
    config = KVReviverConfig()
    gen = torch.Generator().manual_seed(0)
    store = QuantizedStore(HEAD_SIZE, config.bits, slot_width(HEAD_SIZE, DTYPE) * 2)
    budget = math.ceil(REVIVED_BUDGET * case.context)
    exact = config.sink + config.recent + case.new_tokens
    pages = budget - config.sink - config.recent
    num_vague = store.capacity(pages)
    layout = PagedLayout(replace(case, context=pages + exact), gen)
    cache = layout.our_cache()
    key, value = random_kv(len(layout.context_slots), gen)
    torch.ops.kvreviver.write_kv(cache, key, value, layout.context_slots,
                                 layout.context_positions + num_vague)
    _, scores = slot_meta(cache)
    scores.copy_(torch.rand(scores.shape, generator=gen))
    row = layout.block_table[0]
    write_random_store(cache, row, store, num_vague, gen,
                       lambda n: torch.rand(n, generator=gen))
    if case.op == "compact_quantized":
        # Keep sink + recent exact; the store keeps as many records as before.
        kept = torch.cat([torch.arange(config.sink),
                          torch.arange(exact - config.recent, exact)]).expand(NUM_KV_HEADS, -1)
        args = (row, pages, pages + exact, num_vague, kept, num_vague, store.bits, store.group,
                store.value_bits, store.pool_before, store.pool_after, store.pool_decay)
        reference = lambda c: reference_ops.compact_quantized(c, *args)  # noqa: E731
        compiled = lambda c: torch.ops.kvreviver.compact_quantized(c, *args)  # noqa: E731
    else:
        kept = torch.stack([torch.randperm(pages + exact, generator=gen)[:budget].sort().values
                            for _ in range(NUM_KV_HEADS)])
        reference = lambda c: reference_ops.compact_slots(c, row, kept)  # noqa: E731
        compiled = lambda c: torch.ops.kvreviver.compact_slots(c, row, kept)  # noqa: E731
    want, got = cache.clone(), cache.clone()
    reference(want)
    compiled(got)
    assert torch.equal(want.view(torch.uint8), got.view(torch.uint8)), f"{case.label}: differ"
    work = cache.clone()
    return {
        "reference": lambda: reference(work.copy_(cache)),
        "compiled": lambda: compiled(work.copy_(cache)),
        RESTORE: lambda: work.copy_(cache),
    }


def time_round(impls: dict[str, Callable], order: list[str]) -> dict[str, float]:
    """One call of each implementation, in ``order``; seconds per call."""
    seconds = {}
    for name in order:
        start = time.perf_counter()
        impls[name]()
        seconds[name] = time.perf_counter() - start
    return seconds


def time_interleaved(impls: dict[str, Callable], settings: Settings) -> dict[str, list[float]]:
    """Per-call seconds of each implementation over N interleaved repeats, the order
    rotating each repeat; N is sized from the warm-up so the case takes ~target_s."""
    names = list(impls)
    warmup = [time_round(impls, names) for _ in range(settings.warmup)]
    round_s = sum(statistics.median(r[name] for r in warmup) for name in names)
    repeats = int(settings.target_s / max(round_s, 1e-9))
    repeats = min(max(repeats, settings.min_repeats), settings.max_repeats)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        shift = i % len(names)
        for name, seconds in time_round(impls, names[shift:] + names[:shift]).items():
            times[name].append(seconds)
    return times


def summarize(case: Case, times: dict[str, list[float]]) -> dict:
    """Median ms per call, and median paired ratios to the compiled op. Where the
    case restores its input before each call, the medians are net of the restore's
    median and the ratios are those of the net medians."""
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    if RESTORE in times:
        ms = {name: v - (ms[RESTORE] if name != RESTORE else 0.0) for name, v in ms.items()}
        ratios = {f"{name}/{BASELINE}": ms[name] / ms[BASELINE]
                  for name in TIMED if name in ms and name != BASELINE}
    else:
        base = times[BASELINE]
        ratios = {
            f"{name}/{BASELINE}": statistics.median(t / b for t, b in zip(times[name], base))
            for name in TIMED
            if name in times and name != BASELINE
        }
    return {
        **asdict(case),
        "label": case.label,
        "repeats": len(times[BASELINE]),
        "ms": ms,
        "ratios": ratios,
    }


def run_case(case: Case, settings: Settings, vllm_ops, isa: str, kv_split: bool,
             timed_reference: bool = True) -> dict:
    if case.op == "paged_attention":
        impls = attention_impls(case, vllm_ops, isa, kv_split)
    elif case.op == "revived_attention":
        impls = revived_impls(case, vllm_ops, isa, kv_split)
    elif case.op == "write_kv":
        impls = write_kv_impls(case, vllm_ops, isa)
    elif case.op.startswith("compact"):
        impls = compaction_impls(case)
    else:
        impls = store_impls(case)
    if not timed_reference:
        impls.pop("reference")
    return summarize(case, time_interleaved(impls, settings))


def print_table(results: list[dict]) -> None:
    def ms(v: float) -> str:
        return f"{v:.4f}"

    def ratio(v: float) -> str:
        return f"{v:.2f}x"

    columns = [  # header, width, formatter (str: left-aligned), value of a result (None: "-")
        ("op", 21, str, lambda r: r["op"]),
        ("case", 31, str, lambda r: r["label"]),
        ("reps", 6, int, lambda r: r["repeats"]),
        ("ref ms", 10, ms, lambda r: r["ms"].get("reference")),
        ("ours ms", 10, ms, lambda r: r["ms"]["compiled"]),
        ("+scores ms", 11, ms, lambda r: r["ms"].get("compiled_scores")),
        ("vllm ms", 10, ms, lambda r: r["ms"].get("vllm")),
        ("vllm md ms", 11, ms, lambda r: r["ms"].get("vllm_metadata")),
        ("ref/ours", 10, ratio, lambda r: r["ratios"].get(SPEEDUPS[0])),
        ("vllm/ours", 10, ratio, lambda r: r["ratios"].get(SPEEDUPS[1])),
        ("scores/ours", 12, ratio, lambda r: r["ratios"].get(OVERHEAD)),
    ]

    def line(cells: list[str]) -> str:
        return "".join(
            f"{text:<{width}}" if fmt is str else f"{text:>{width}}"
            for text, (_, width, fmt, _) in zip(cells, columns)
        )

    header = line([name for name, *_ in columns])
    print(header)
    print("-" * len(header))
    for r in results:
        values = [get(r) for *_, get in columns]
        print(line(["-" if v is None else fmt(v) for v, (_, _, fmt, _) in zip(values, columns)]))
    print(
        "ms: median per call. x: median of paired per-repeat ratios; ref/ours and vllm/ours "
        "> 1 mean ours is faster, scores/ours is the cost of score_window=32.\n"
        "vllm md: vLLM's scheduler metadata, built once per step for all layers, "
        "not included in vllm ms.\ncompact_*: net of the copy that restores the cache "
        "before each call (timed alone, median subtracted)."
    )


def plot(results: list[dict], env: dict, path: Path) -> None:
    """Left: ms per call of each implementation (log scale); right: speed-ups of ours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['op']}\n{r['label']}" for r in results]
    rows = range(len(results))
    fig, (times_ax, ratio_ax) = plt.subplots(
        1, 2, figsize=(15, 0.8 * len(results) + 2), sharey=True
    )
    height = 0.8 / len(TIMED)
    for i, name in enumerate(TIMED):
        offsets = [k + (i - (len(TIMED) - 1) / 2) * height for k in rows]
        values = [r["ms"].get(name, float("nan")) for r in results]
        times_ax.barh(offsets, values, height, label=name, color=COLORS[name])
    times_ax.set_xscale("log")
    times_ax.set_xlabel("ms per call (median, log scale)")
    times_ax.set_yticks(list(rows), labels, fontsize=8)
    times_ax.invert_yaxis()
    times_ax.legend(loc="lower right", fontsize=8)
    times_ax.grid(axis="x", which="both", alpha=0.3)

    height = 0.8 / len(SPEEDUPS)
    for i, name in enumerate(SPEEDUPS):
        offsets = [k + (i - (len(SPEEDUPS) - 1) / 2) * height for k in rows]
        values = [r["ratios"].get(name, float("nan")) for r in results]  # store ops: no vLLM
        color = COLORS[name.split("/")[0]]
        bars = ratio_ax.barh(offsets, values, height, label=name, color=color)
        ratio_ax.bar_label(bars, ["" if math.isnan(v) else f"{v:.2f}x" for v in values],
                           fontsize=7, padding=2)
    ratio_ax.axvline(1.0, color="black", linewidth=1)
    ratio_ax.set_xscale("log")
    ratio_ax.set_xlabel("speed-up of compiled (median paired ratio, log scale; > 1: ours faster)")
    ratio_ax.legend(loc="lower right", fontsize=8)
    ratio_ax.grid(axis="x", which="both", alpha=0.3)
    ratio_ax.margins(x=0.15)

    fig.suptitle(
        f"KVReviver compiled CPU ops: {env['cpu_model']}, {env['threads']} threads, "
        f"torch {env['torch']}, vLLM {env['vllm']}" + (" (quick)" if env["quick"] else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    check_compiled_ops()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    vllm_ops, isa, kv_split = load_vllm_kernels()
    env = environment(args.quick, isa, kv_split)
    env["attention_only"] = args.attention_only
    settings = QUICK if args.quick else FULL
    print(
        f"{env['cpu_model']}, {env['threads']} threads, torch {env['torch']}, "
        f"vLLM {env['vllm']} (isa={isa}, kv split={kv_split}), "
        f"load average {env['load_average_1m_at_start']:.2f} at start"
    )
    selected = [c for c in cases(args.quick)
                if not args.attention_only or c.op in ("paged_attention", "revived_attention")]
    results = [run_case(case, settings, vllm_ops, isa, kv_split, not args.attention_only)
               for case in selected]
    print_table(results)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "kernels-attention-only" if args.attention_only else "kernels"
    json_path, png_path = args.out / f"{stem}.json", args.out / f"{stem}.png"
    json_path.write_text(json.dumps({"environment": env, "results": results}, indent=2) + "\n")
    plot(results, env, png_path)
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
