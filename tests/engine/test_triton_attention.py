"""``attention_kernel: triton`` in the real engine: every step through the Triton
kernels (the GPU's path: prompt chunks by ``ops/triton_prefill.py``, decode rows
by ``ops/triton_decode.py``, both in one step where a prompt chunk shares it with
a decode) gives the tokens of the compiled kernels, with compression off and at
budget 0.1 (decode revives the quantized store). On the CPU Triton's interpreter
runs them: the engine's processes get ``TRITON_INTERPRET=1``, set before they
import triton."""

from __future__ import annotations

import pytest

from engine_run import KVREVIVER, run_engine
from prompts import make_prompt

pytestmark = pytest.mark.engine
pytest.importorskip("triton", reason="triton is not installed: no Triton kernels")

NEW_TOKENS = 6  # every step of 30 layers runs interpreted: keep them few


# Budget 0.1 runs exact attention too: every prompt chunk, and each request's decode steps before
# its first compaction.
@pytest.mark.parametrize("budget", [0.1])
def test_triton_attention_gives_the_compiled_tokens(model_dir, tokenizer, budget, monkeypatch):
    prompts = [make_prompt(tokenizer, n, seed=40 + n) for n in (64, 160, 400)]

    def run(kernel: str):
        return run_engine(
            model_dir, prompts, KVREVIVER, "float32", NEW_TOKENS,
            enable_prefix_caching=False, max_num_batched_tokens=128,
            additional_config={"kvreviver": {"budget": budget, "attention_kernel": kernel}},
        )

    compiled = run("compiled")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    triton = run("triton")
    # Every forward of every layer ran the Triton kernels, mixed steps
    # included: in 128-token steps the 64-token request decodes (at 0.1 from
    # its store, after its first decode step) while the 400-token prompt is
    # read. Short prompts: the interpreter runs every prompt chunk too.
    forwards = sum(calls for _, _, calls in triton.impls)
    assert compiled.triton_steps == 0
    assert triton.triton_steps == forwards and forwards >= 30 * (NEW_TOKENS + 3)
    assert triton.token_ids == compiled.token_ids
