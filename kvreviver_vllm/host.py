"""What this CPU computes fast: the model dtype that serving and the tests default to.

torch's bf16 (and fp16) matmul on an x86 CPU without AVX-512 falls back to a slow
path: on a 2-core AMD EPYC with AVX2, a 512x576 by 576x1536 matmul took 767 ms in
bf16 against 14 ms in float32 (one thread). vLLM on CPU runs bf16 there anyway, so a
135M model reads a 2k prompt at ~15 tokens/s. On such hosts float32 is the default.
"""

from __future__ import annotations

import functools
import platform

BF16 = "bfloat16"
FLOAT32 = "float32"


@functools.cache
def bf16_is_fast() -> bool:
    """False on x86 CPUs without AVX-512, where torch's bf16 matmul is emulated."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True  # aarch64, ppc64le, s390x: vLLM's CPU builds run bf16 natively
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def fast_dtype() -> str:
    """``bfloat16`` where this CPU computes it fast, ``float32`` otherwise."""
    return BF16 if bf16_is_fast() else FLOAT32
