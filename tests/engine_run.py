"""Run the real vLLM engine on the default model, stock or with KVReviver.

Scripts that build ``vllm.LLM`` on CPU need the spawn start method; pytest's
main process is fine as it is never re-imported.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

from probes import attention_impls, count_forward_calls, triton_decode_steps

STOCK = None
KVREVIVER = "kvreviver"


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[dict[int, float]]]
    """Per prompt, per generated token: the top-2 token ids and their logprobs."""
    impls: list[tuple[str, str, int | None]]
    """(layer, impl class, forward calls) of the worker's attention layers."""
    triton_steps: int
    """Decode steps, summed over layers, that ran the Triton decode kernels."""


def run_engine(
    model_dir: str,
    prompts: list[list[int]],
    backend: str | None,
    dtype: str,
    max_tokens: int,
    **engine_kwargs,
) -> EngineRun:
    """Greedy-generate ``max_tokens`` per prompt, then shut the engine down."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # collective_rpc ships a Python function to the worker.
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    kwargs = dict(
        model=model_dir,
        dtype=dtype,
        max_model_len=8192,
        enforce_eager=True,
        seed=0,
    )
    if backend is not None:
        kwargs["attention_backend"] = backend
    kwargs.update(engine_kwargs)
    llm = LLM(**kwargs)
    try:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2
        )
        llm.collective_rpc(count_forward_calls)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        impls = llm.collective_rpc(attention_impls)[0]
        triton_steps = llm.collective_rpc(triton_decode_steps)[0]
        return EngineRun(
            token_ids=[list(o.outputs[0].token_ids) for o in outs],
            texts=[o.outputs[0].text for o in outs],
            logprobs=[
                [{tok: lp.logprob for tok, lp in step.items()} for step in o.outputs[0].logprobs]
                for o in outs
            ],
            impls=impls,
            triton_steps=triton_steps,
        )
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
