"""Compression in the real engine: the per-request block cap, concurrency from the
same KV pool, and the request lifecycle (preemption, abort) returning every block.

Each scenario runs in a subprocess (tests/scheduler_probe.py) with the engine core
in-process, so the test reads the scheduler's own block lists and running queue.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvreviver_vllm.schedule import DECODE_ROOM
from kvreviver_vllm.host import fast_dtype

pytestmark = pytest.mark.engine

PROBE = Path(__file__).parent / "scheduler_probe.py"
BLOCK_SIZE = 32  # vLLM's CPU attention needs a multiple of 32
CHUNK = 512  # --max-num-batched-tokens: the most tokens one request gets per step
# The engines run in the dtype this CPU computes fast (bf16, or float32 without AVX-512).
DTYPE = fast_dtype()


def stock_block_bytes(dtype: str) -> int:
    """Stock vLLM's page for this model: 30 layers x 3 KV heads x 32 tokens x 128 values."""
    return 30 * 3 * BLOCK_SIZE * 128 * (4 if dtype == "float32" else 2)


def probe(model_dir: str, backend: str | None, prompt_lens: list[int], max_tokens: int,
          pool_blocks: int, budget: float = 1.0, variant: str = "evict",
          max_model_len: int = 2560, dtype: str = DTYPE, over_admit: bool = False,
          **extra) -> dict:
    engine = dict(
        max_model_len=max_model_len,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=CHUNK,
        enable_prefix_caching=False,
        kv_cache_memory_bytes=pool_blocks * stock_block_bytes(dtype),
        # vLLM admits a request only when its whole prompt fits; over-admitting
        # (first chunk only) makes running requests outgrow the pool and be preempted.
        scheduler_reserve_full_isl=not over_admit,
    )
    if backend:
        engine["additional_config"] = {"kvreviver": {"budget": budget, "variant": variant}}
    scenario = dict(model=model_dir, backend=backend, prompt_lens=prompt_lens,
                    max_tokens=max_tokens, engine=engine, dtype=dtype, **extra)
    # The pool is set in bytes; VLLM_CPU_KVCACHE_SPACE (tests/engine.py sets it for
    # other tests) would override it.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    res = subprocess.run([sys.executable, str(PROBE), json.dumps(scenario)],
                         capture_output=True, text=True, timeout=1500, env=env)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def decode_cap_blocks(num_tokens: int, budget: float) -> int:
    """Blocks a decoding request holds at most: its budget plus the decode room."""
    budget_tokens = max(math.ceil(budget * num_tokens), 4 + 64)
    return math.ceil(min(num_tokens, budget_tokens + DECODE_ROOM) / BLOCK_SIZE)


@contextlib.contextmanager
def kvreviver_engine(model_dir: str, **kvreviver):
    """An in-process engine on this package's backend (``kvreviver`` is its config
    section), for the tests that install checks in its worker; shut down on exit."""
    from vllm import LLM

    # collective_rpc ships a Python function to the worker.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    llm = LLM(model=model_dir, dtype=DTYPE, max_model_len=4096, enforce_eager=True,
              attention_backend="kvreviver", enable_prefix_caching=False,
              max_num_batched_tokens=CHUNK, block_size=BLOCK_SIZE,
              # An explicit pool: without one vLLM's CPU worker demands 92% of the
              # NUMA node free at startup, which fails beside any other process.
              kv_cache_memory_bytes=200 * stock_block_bytes(DTYPE),
              additional_config={"kvreviver": kvreviver})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_budget_caps_blocks_and_multiplies_concurrency(model_dir, capsys):
    # A 2k prompt is read in four chunks, so the KV pool, not the step budget,
    # limits concurrency.
    prompts, new = [2048] * 16, 128
    # Room for three whole requests in stock vLLM (70 blocks each) and no fourth chunk.
    stock = probe(model_dir, None, prompts, new, pool_blocks=213)
    ours = probe(model_dir, "kvreviver", prompts, new, pool_blocks=213, budget=0.1)

    for run in (stock, ours):
        assert sorted(run["outputs"]) == sorted(map(str, range(len(prompts))))
        assert all(len(o["token_ids"]) == new for o in run["outputs"].values())
        assert run["free_at_end"] == run["free_at_start"]
    assert max(stock["peak_blocks"].values()) == math.ceil((2048 + new) / BLOCK_SIZE)
    # Ours holds the prompt whole while reading it (and at its first decode
    # step), then only its budget plus the decode room.
    assert max(ours["peak_blocks"].values()) == math.ceil((2048 + 1) / BLOCK_SIZE)
    cap = decode_cap_blocks(2048 + new, 0.1)
    # The worker skips exactly the gap the scheduler freed, for every request.
    assert ours["cuts_disagreed"] == [] and len(ours["cuts_agreed"]) == len(prompts)
    assert len(ours["peak_decode_blocks"]) == len(prompts)
    assert max(ours["peak_decode_blocks"].values()) <= cap
    with capsys.disabled():
        print(
            f"\nsame KV pool, 2k-token requests: peak running stock {stock['peak_running']}, "
            f"kvreviver@0.1 {ours['peak_running']}; blocks per request stock "
            f"{max(stock['peak_blocks'].values())}, kvreviver {max(ours['peak_blocks'].values())} "
            f"reading the prompt, {max(ours['peak_decode_blocks'].values())} decoding (cap {cap})"
        )
    assert ours["peak_running"] >= 5 * stock["peak_running"]


# Block accounting does not depend on the store: one store variant and one store-less.
@pytest.mark.parametrize("variant", ["quantized", "streaming"])
def test_preemption_abort_and_mixed_lengths_return_every_block(model_dir, variant):
    prompts, new = [600, 1200, 1800, 2400, 900, 1500], 64
    # 89 usable blocks: the longest prompt fits whole (77 blocks), but requests
    # admitted on their first chunk grow past what is free while reading their
    # prompts.
    run = probe(model_dir, "kvreviver", prompts, new, pool_blocks=90, budget=0.1,
                variant=variant, abort_at={"1": 20}, over_admit=True)
    assert run["preemptions"] > 0
    assert run["free_at_end"] == run["free_at_start"]
    # Preempted requests start over and are cut again, at their new prompt end.
    assert run["cuts_disagreed"] == []
    assert set(run["cuts_agreed"]) >= {str(rid) for rid in range(len(prompts)) if rid != 1}
    assert run["outputs"].get("1", {}).get("finish_reason", "abort") == "abort"
    for rid, n in enumerate(prompts):
        if rid != 1:
            out = run["outputs"][str(rid)]
            assert len(out["token_ids"]) == new and out["finish_reason"] == "length"
        assert run["peak_blocks"][str(rid)] <= math.ceil((n + new) / BLOCK_SIZE)


def test_preempted_requests_resume_exactly(model_dir):
    """Budget 1.0 (no compression) under preemption: the same tokens as stock vLLM
    serving the same requests without memory pressure."""
    prompts, new = [300, 700, 1100], 48
    common = dict(max_model_len=1200, dtype="float32")
    stock = probe(model_dir, None, prompts, new, pool_blocks=200, **common)
    ours = probe(model_dir, "kvreviver", prompts, new, pool_blocks=45, over_admit=True, **common)
    assert stock["preemptions"] == 0 and ours["preemptions"] > 0
    assert ours["free_at_end"] == ours["free_at_start"]
    for rid in map(str, range(len(prompts))):
        assert ours["outputs"][rid]["token_ids"] == stock["outputs"][rid]["token_ids"], rid


def test_a_failing_kernel_stops_the_engine_cleanly(model_dir, tokenizer):
    """A kernel that raises mid-generation: the caller gets vLLM's EngineDeadError
    promptly (no hang), and shutting down leaves no engine process behind."""
    import psutil
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.exceptions import EngineDeadError

    from harness.server import engine_processes
    from probes import raise_in_attention
    from prompts import make_prompt

    with kvreviver_engine(model_dir, budget=0.25) as llm:
        engine = engine_processes(os.getpid())
        assert engine
        assert llm.collective_rpc(raise_in_attention, args=(40,)) == [1]
        prompts = [TokensPrompt(prompt_token_ids=make_prompt(tokenizer, 600, seed=1))]
        start = time.monotonic()
        with pytest.raises(EngineDeadError):
            llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True))
        assert time.monotonic() - start < 60
    gone, alive = psutil.wait_procs(engine, timeout=30)
    assert not alive, [p.cmdline() for p in alive]


@pytest.mark.parametrize("variant, extra", [
    ("quantized", {}), ("sketch", {}), ("evict", {}),
    ("quantized", {"bits": 3, "value_bits": 2, "rotate": True}),  # the long-context store
], ids=["quantized", "sketch", "evict", "long-context"])
def test_store_and_revival_match_reference_in_the_engine(model_dir, tokenizer, variant, extra):
    """Checks run inside the worker on the real paged cache (see
    harness.probes.install_store_checks): every compaction keeps the
    selected exact slots and stores exactly the demoted tokens, every decode step
    attends over exactly the revived store plus the exact slots. (The mixed-width
    research store is not run here: test_vague_store checks its records.)"""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from probes import install_store_checks, store_check_results
    from prompts import make_prompt

    with kvreviver_engine(model_dir, budget=0.25, variant=variant, **extra) as llm:
        layers = ["model.layers.0.self_attn.attn", "model.layers.15.self_attn.attn",
                  "model.layers.29.self_attn.attn"]
        assert llm.collective_rpc(install_store_checks, args=(layers,)) == [3]
        prompts = [TokensPrompt(prompt_token_ids=make_prompt(tokenizer, n, seed=n)) for n in (1500, 2200)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        checks = llm.collective_rpc(store_check_results)[0]
    compactions = [c for c in checks if c[0] == "compaction"]
    decodes = [c for c in checks if c[0] == "decode"]
    # Per layer: several compactions per request; decode steps of one request that
    # share a step with the other's prefill chunk are not checked (mixed batch).
    assert len(compactions) >= 3 * 2 and len(decodes) >= 3 * 20
    assert all(c[1] for c in compactions), [c for c in compactions if not c[1]][:5]
    assert all(c[1] for c in decodes), [c for c in decodes if not c[1]][:5]
    assert all(c[4] == extra.get("rotate", False) for c in decodes)  # rotated heads where set
    if variant != "evict":
        assert any(c[3] > 0 for c in compactions)  # tokens went to the store
        assert any(c[2] > 0 for c in decodes)  # and were revived while decoding
    else:
        assert all(c[3] == 0 for c in compactions) and all(c[2] == 0 for c in decodes)


@pytest.mark.parametrize("budget, variant", [(1.0, "quantized"), (0.1, "quantized")])
def test_attention_error_probe_measures_compression(model_dir, tokenizer, budget, variant):
    """The accuracy harness's attention-output error (harness.probes.
    install_attention_error_probe): with nothing compressed it is rounding only;
    under compression it is measured on every layer, for every prompt, and is larger."""
    import statistics

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from harness.probes import attention_error_results, install_attention_error_probe
    from prompts import make_prompt

    steps, layers = 4, 30
    with kvreviver_engine(model_dir, budget=budget, variant=variant) as llm:
        assert llm.collective_rpc(install_attention_error_probe, args=(steps,)) == [layers]
        lens = (1500, 2200)
        prompts = [TokensPrompt(prompt_token_ids=make_prompt(tokenizer, n, seed=n)) for n in lens]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        errors = llm.collective_rpc(attention_error_results)[0]
    # Every layer, every prompt, the first `steps` decode steps, once each.
    assert sorted({(r, n, layer, step) for r, n, layer, step, _ in errors}) == sorted(
        (r, n, layer, step) for r, n in enumerate(lens) for layer in range(layers)
        for step in range(steps)
    )
    values = [e for *_, e in errors]
    if budget == 1.0:
        assert max(values) < 0.02  # the backend's output (bf16 or float32) against float32
    else:
        assert statistics.fmean(values) > 0.02, statistics.fmean(values)
