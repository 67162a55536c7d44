"""Run the real vLLM engine on the default model, stock or with KVReviver.

Scripts that build ``vllm.LLM`` on CPU need the spawn start method; pytest's
main process is fine as it is never re-imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from harness.offline import open_engine
from kvreviver_vllm.host import fast_dtype
from probes import (attention_impls, compaction_decisions, count_forward_calls,
                    record_compactions, triton_attention_steps)

STOCK = None
KVREVIVER = "kvreviver"
BLOCK_SIZE = 32  # the tests' KV block: vLLM's CPU attention needs a multiple of 32
CHUNK = 512  # --max-num-batched-tokens: the most tokens one request gets per step
# The engines run in the dtype this CPU computes fast (bf16, or float32 without AVX-512).
DTYPE = fast_dtype()


def stock_block_bytes(dtype: str) -> int:
    """Stock vLLM's page for the default model: 30 layers x 3 KV heads x
    ``BLOCK_SIZE`` tokens x 128 values (key and value, head size 64)."""
    return 30 * 3 * BLOCK_SIZE * 128 * (4 if dtype == "float32" else 2)


@dataclass
class EngineRun:
    token_ids: list[list[int]]
    texts: list[str]
    logprobs: list[list[dict[int, float]]]
    """Per prompt, per generated token: the top-2 token ids and their logprobs."""
    impls: list[tuple[str, str, int | None]]
    """(layer, impl class, forward calls) of the worker's attention layers."""
    triton_steps: int
    """Steps, summed over layers, that ran the Triton kernels."""
    decisions: dict[str, list[tuple[int, list[list[int]]]]]
    """Per layer, every compaction's (scored slots, kept slots per KV head), with the
    KV heads of all tensor-parallel ranks in rank order."""


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
    from vllm import SamplingParams
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
    with open_engine(**kwargs) as llm:
        params = SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2
        )
        llm.collective_rpc(count_forward_calls)
        llm.collective_rpc(record_compactions)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
        # Pipeline stages hold different layers, tensor-parallel ranks the same
        # layers with different KV heads.
        impls = list({name: (name, cls, calls) for worker in llm.collective_rpc(attention_impls)
                      for name, cls, calls in worker}.values())
        tp = llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
        triton_steps = sum(llm.collective_rpc(triton_attention_steps)) // tp
        decisions = merge_ranks(llm.collective_rpc(compaction_decisions))
        return EngineRun(
            token_ids=[list(o.outputs[0].token_ids) for o in outs],
            texts=[o.outputs[0].text for o in outs],
            logprobs=[
                [{tok: lp.logprob for tok, lp in step.items()} for step in o.outputs[0].logprobs]
                for o in outs
            ],
            impls=impls,
            triton_steps=triton_steps,
            decisions=decisions,
        )


def merge_ranks(per_worker: list[dict[str, list]]) -> dict[str, list]:
    """One layer -> decisions map from every worker's: tensor-parallel ranks'
    decisions for a layer are joined head-wise, in rank order."""
    merged: dict[str, list] = {}
    for worker in per_worker:
        for layer, decisions in worker.items():
            if layer not in merged:
                merged[layer] = [(n, [list(h) for h in kept]) for n, kept in decisions]
                continue
            assert len(merged[layer]) == len(decisions), f"{layer}: ranks compacted differently"
            for (n, heads), (m, kept) in zip(merged[layer], decisions):
                assert n == m, f"{layer}: ranks scored {n} and {m} slots"
                heads.extend(kept)
    return merged
