"""The CUDA kernels compile with the machine's nvcc (no GPU needed), so CI catches
CUDA breakage on CPU-only machines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).parents[2] / "csrc" / "cuda"
CUDA_SOURCES = sorted(CUDA_DIR.glob("*.cu"))
# The torch bindings of the CUDA kernels need c10/cuda, which the CPU torch
# wheel lacks: they are syntax-checked against two stand-in headers instead.
CUDA_BINDINGS = sorted(CUDA_DIR.glob("*.cpp"))
STUB_HEADERS = {
    "CUDAGuard.h": "#pragma once\n#include <c10/core/Device.h>\n"
                   "namespace c10::cuda { struct CUDAGuard { explicit CUDAGuard(c10::Device) {} }; }\n",
    "CUDAStream.h": "#pragma once\n#include <cuda_runtime.h>\n"
                    "namespace c10::cuda { struct CUDAStream { operator cudaStream_t() const "
                    "{ return nullptr; } };\ninline CUDAStream getCurrentCUDAStream() { return {}; } }\n",
}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cu_file_compiles_with_nvcc(source, tmp_path):
    res = subprocess.run(
        ["nvcc", "-c", str(source), "-arch=sm_90", "-std=c++17", "-O3",
         "-Werror", "all-warnings", "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "kernel.o").stat().st_size > 0


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_BINDINGS, ids=lambda p: p.name)
def test_cuda_binding_passes_a_syntax_check(source, tmp_path):
    import torch.utils.cpp_extension as ext

    probe = tmp_path / "probe.cu"
    probe.write_text("")
    dry = subprocess.run(["nvcc", "--dryrun", "-c", str(probe)], capture_output=True, text=True)
    cuda_includes = re.findall(r"-I(\S+)", re.search(r'INCLUDES="([^"]*)"', dry.stderr).group(1))
    stubs = tmp_path / "c10" / "cuda"
    stubs.mkdir(parents=True)
    for name, text in STUB_HEADERS.items():
        (stubs / name).write_text(text)
    includes = [tmp_path, *cuda_includes, *ext.include_paths(), sysconfig.get_paths()["include"]]
    res = subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
         *[f"-I{p}" for p in includes], str(source)],
        capture_output=True, text=True, timeout=300,
    )
    assert res.returncode == 0, res.stderr


def test_there_are_cuda_sources():
    assert [p.name for p in CUDA_SOURCES] == [
        "attention_kernels.cu", "compaction_kernels.cu", "vague_store_kernels.cu"]
    assert [p.name for p in CUDA_BINDINGS] == [
        "attention_cuda.cpp", "compaction_cuda.cpp", "vague_store_cuda.cpp"]
