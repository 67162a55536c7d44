"""The backend class registered under ``KVREVIVER``: the CPU or the CUDA flavour,
picked for the platform of the process that resolves it (a vLLM worker)."""

from vllm.platforms import current_platform

if current_platform.is_cpu():
    from kvreviver_vllm.backend.cpu import KVReviverCPUBackend as KVReviverBackend
else:
    from kvreviver_vllm.backend.cuda import KVReviverCUDABackend as KVReviverBackend

__all__ = ["KVReviverBackend"]
