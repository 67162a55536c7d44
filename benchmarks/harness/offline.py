"""vLLM's offline engine (``vllm.LLM``) for the benchmarks and the tests: built from
keyword arguments, its engine processes shut down on exit."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def open_engine(**llm_kwargs) -> Iterator:
    """``vllm.LLM(**llm_kwargs)``; on exit its engine core is shut down (no process
    left behind) and the object collected, so the next engine starts with its memory."""
    from vllm import LLM

    llm = LLM(**llm_kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
