"""Checks installed inside the engine's worker (``collective_rpc``) on the real
paged cache: the store and revival against the reference, the accuracy harness's
attention-error probe, and a kernel that raises mid-generation."""

from __future__ import annotations

import os
import time

import pytest

from engine_run import BLOCK_SIZE, CHUNK, DTYPE, stock_block_bytes
from harness.offline import open_engine

pytestmark = pytest.mark.engine


def kvreviver_engine(model_dir: str, **kvreviver):
    """An engine on this package's backend (``kvreviver`` is its config section),
    for the tests that install checks in its worker; shut down on exit."""
    # collective_rpc ships a Python function to the worker.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    return open_engine(model=model_dir, dtype=DTYPE, max_model_len=4096, enforce_eager=True,
                       attention_backend="kvreviver", enable_prefix_caching=False,
                       max_num_batched_tokens=CHUNK, block_size=BLOCK_SIZE,
                       # An explicit pool: without one vLLM's CPU worker demands 92% of the
                       # NUMA node free at startup, which fails beside any other process.
                       kv_cache_memory_bytes=200 * stock_block_bytes(DTYPE),
                       additional_config={"kvreviver": kvreviver})


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
