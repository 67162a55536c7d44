"""KVReviver attention backend on CUDA GPUs.

Same pieces as on CPU (``common.py``); the ops run as PyTorch on the GPU until
the CUDA kernels are wired into ``kvreviver_vllm.ops``. vLLM's CUDA selector
calls ``validate_configuration`` on this class before using it.
"""

from __future__ import annotations

from kvreviver_vllm.backend.common import KVReviverBackendBase


class KVReviverCUDABackend(KVReviverBackendBase):
    pass
