"""Worker-side probes, run through ``LLM.collective_rpc`` by tests and benchmarks.

``collective_rpc`` ships a callable to each worker only with
``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the functions take the worker object.
"""

from __future__ import annotations


def attention_impls(worker) -> list[tuple[str, str, int | None]]:
    """``(layer name, impl class, forward calls)`` for every attention layer."""
    from vllm.model_executor.layers.attention import Attention

    model = worker.model_runner.model
    return [
        (
            module.layer_name,
            type(module.impl).__qualname__,
            getattr(module.impl, "num_forward_calls", None),
        )
        for module in model.modules()
        if isinstance(module, Attention)
    ]
