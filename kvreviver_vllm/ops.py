"""The ops the backend calls: the compiled ``torch.ops.kvreviver`` kernels when the
extension is built, the PyTorch reference (``sketch.py``) otherwise.

Call sites use ``ops.<name>`` only. Which implementation runs is decided once per
process, on first use, and logged, so a slow fallback is never silent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from vllm.logger import init_logger

from kvreviver_vllm import sketch

logger = init_logger(f"vllm.{__name__}")

COMPILED = "compiled"
REFERENCE = "reference"


@functools.cache
def implementation() -> str:
    """``"compiled"`` if ``kvreviver_vllm._C`` loads, else ``"reference"``."""
    try:
        import kvreviver_vllm._C  # noqa: F401  (registers torch.ops.kvreviver.*)
    except ImportError as exc:
        logger.warning(
            "KVReviver compiled ops unavailable (%s); running the PyTorch reference ops "
            "(rebuild with `pip install --no-build-isolation -e .`)",
            exc,
        )
        return REFERENCE
    logger.info("KVReviver uses its compiled ops")
    return COMPILED


def _dispatch(name: str) -> Callable:
    reference = getattr(sketch, name)

    @functools.wraps(reference)
    def op(*args, **kwargs):
        if implementation() == COMPILED:
            return getattr(torch.ops.kvreviver, name)(*args, **kwargs)
        return reference(*args, **kwargs)

    return op


write_kv = _dispatch("write_kv")
paged_attention = _dispatch("paged_attention")
# No compiled kernels yet for these: compaction runs once per request every few
# hundred tokens; revival (attention over a vague store) is reference-only for now.
compact = sketch.compact
compact_into_store = sketch.compact_into_store
paged_attention_revived = sketch.paged_attention_revived
request_scores = sketch.request_scores
