"""``decode_kernel: triton`` in the real engine: decode steps through the Triton
flash-decoding kernels (``ops/triton_decode.py``, the GPU's decode path) give the
tokens of the compiled kernels, with compression off and at budget 0.1 (revival
of the quantized store). On the CPU Triton's interpreter runs them: the engine's
processes get ``TRITON_INTERPRET=1``, set before they import triton."""

from __future__ import annotations

import pytest

from engine_run import KVREVIVER, run_engine
from prompts import make_prompt

pytestmark = pytest.mark.engine
pytest.importorskip("triton", reason="triton is not installed: no Triton decode kernel")

NEW_TOKENS = 6  # every decode step of 30 layers runs interpreted: keep them few


@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_triton_decode_gives_the_compiled_tokens(model_dir, tokenizer, budget, monkeypatch):
    prompts = [make_prompt(tokenizer, n, seed=40 + n) for n in (200, 600)]

    def run(kernel: str):
        return run_engine(
            model_dir, prompts, KVREVIVER, "float32", NEW_TOKENS,
            enable_prefix_caching=False, max_num_batched_tokens=512,
            additional_config={"kvreviver": {"budget": budget, "decode_kernel": kernel}},
        )

    compiled = run("compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = run("triton")
    # Every layer (30) ran Triton on the decode-only steps: all but the first
    # one or two, which share a step with the other prompt's last chunk.
    assert compiled.triton_steps == 0
    assert triton.triton_steps % 30 == 0 and triton.triton_steps >= 30 * (NEW_TOKENS - 2)
    assert triton.token_ids == compiled.token_ids
