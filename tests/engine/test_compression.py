"""Compression in the real engine: the per-request block cap, concurrency from the
same KV pool, and the request lifecycle (preemption, abort) returning every block.

Each scenario runs in a subprocess (tests/scheduler_probe.py) with the engine core
in-process, so the test reads the scheduler's own block lists and running queue.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine_run import BLOCK_SIZE, CHUNK, DTYPE, stock_block_bytes
from kvreviver_vllm.schedule import DECODE_ROOM

pytestmark = pytest.mark.engine

PROBE = Path(__file__).parent / "scheduler_probe.py"


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
    # The pool is set in bytes; VLLM_CPU_KVCACHE_SPACE (tests/engine_run.py sets it for
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


def test_budget_caps_blocks_and_multiplies_concurrency(model_dir, capsys):
    # A 1k prompt is read in two chunks, so the KV pool, not the step budget,
    # limits concurrency.
    prompt_len, new = 1024, 128
    prompts = [prompt_len] * 16
    # Room for three whole requests in stock vLLM (36 blocks each) and not for a
    # fourth prompt (32 blocks, admitted only whole) beside them.
    pool = 113
    stock = probe(model_dir, None, prompts, new, pool_blocks=pool)
    ours = probe(model_dir, "kvreviver", prompts, new, pool_blocks=pool, budget=0.1)

    for run in (stock, ours):
        assert sorted(run["outputs"]) == sorted(map(str, range(len(prompts))))
        assert all(len(o["token_ids"]) == new for o in run["outputs"].values())
        assert run["free_at_end"] == run["free_at_start"]
    assert max(stock["peak_blocks"].values()) == math.ceil((prompt_len + new) / BLOCK_SIZE)
    # Ours holds the prompt whole while reading it (and at its first decode
    # step), then only its budget plus the decode room.
    assert max(ours["peak_blocks"].values()) == math.ceil((prompt_len + 1) / BLOCK_SIZE)
    cap = decode_cap_blocks(prompt_len + new, 0.1)
    # The worker skips exactly the gap the scheduler freed, for every request.
    assert ours["cuts_disagreed"] == [] and len(ours["cuts_agreed"]) == len(prompts)
    assert len(ours["peak_decode_blocks"]) == len(prompts)
    assert max(ours["peak_decode_blocks"].values()) <= cap
    with capsys.disabled():
        print(
            f"\nsame KV pool, 1k-token requests: peak running stock {stock['peak_running']}, "
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
