"""The CUDA kernels compile with the machine's nvcc (no GPU needed), so CI catches
CUDA breakage on CPU-only machines."""

from __future__ import annotations

import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).parents[2] / "csrc"
CUDA_DIR = CSRC / "cuda"
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


def syntax_check(source, tmp_path):
    """g++ -fsyntax-only of a torch binding against the stand-in c10/cuda headers."""
    import torch.utils.cpp_extension as ext

    probe = tmp_path / "probe.cu"
    probe.write_text("")
    dry = subprocess.run(["nvcc", "--dryrun", "-c", str(probe)], capture_output=True, text=True)
    cuda_includes = re.findall(r"-I(\S+)", re.search(r'INCLUDES="([^"]*)"', dry.stderr).group(1))
    stubs = tmp_path / "c10" / "cuda"
    stubs.mkdir(parents=True, exist_ok=True)
    for name, text in STUB_HEADERS.items():
        (stubs / name).write_text(text)
    includes = [tmp_path, *cuda_includes, *ext.include_paths(), sysconfig.get_paths()["include"]]
    return subprocess.run(
        ["g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror",
         *[f"-I{p}" for p in includes], str(source)],
        capture_output=True, text=True, timeout=300,
    )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_BINDINGS, ids=lambda p: p.name)
def test_cuda_binding_passes_a_syntax_check(source, tmp_path):
    # The bindings register through csrc/common/ops.h, so this also checks that
    # every CUDA kernel's C++ signature is the one the CPU kernel has.
    res = syntax_check(source, tmp_path)
    assert res.returncode == 0, res.stderr


# A CUDA registration of paged_attention as csrc/cuda/*.cpp writes it; {kv_cache}
# is the type of its kv_cache parameter (the CPU kernel's: const at::Tensor&).
SIGNATURE_PROBE = """
#include <torch/library.h>
#include "{ops_h}"
namespace kvreviver {{
void paged_attention_probe(at::Tensor, const at::Tensor&, {kv_cache} kv_cache, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, double, int64_t) {{}}
TORCH_LIBRARY_IMPL(kvreviver, CUDA, m) {{
  m.impl("paged_attention", static_cast<op::paged_attention*>(&paged_attention_probe));
}}
}}  // namespace kvreviver
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("kv_cache, compiles", [("const at::Tensor&", True), ("at::Tensor", False)])
def test_ops_h_turns_a_signature_mismatch_into_a_build_error(kv_cache, compiles, tmp_path):
    # The mismatch torch only reports at import ("Mismatch in kernel C++
    # signatures"), on a machine that built both CPU and CUDA kernels.
    source = tmp_path / "probe_binding.cpp"
    source.write_text(SIGNATURE_PROBE.format(ops_h=CSRC / "common" / "ops.h", kv_cache=kv_cache))
    res = syntax_check(source, tmp_path)
    if compiles:
        assert res.returncode == 0, res.stderr
    else:
        assert res.returncode != 0
        assert "static_cast" in res.stderr, res.stderr


def test_there_are_cuda_sources():
    assert [p.name for p in CUDA_SOURCES] == [
        "attention_kernels.cu", "compaction_kernels.cu", "vague_store_kernels.cu"]
    assert [p.name for p in CUDA_BINDINGS] == [
        "attention_cuda.cpp", "compaction_cuda.cpp", "vague_store_cuda.cpp"]


def test_csrc_layout():
    # One bindings file; headers shared by CPU and CUDA in common/; kernels per device.
    names = sorted(str(p.relative_to(CSRC)) for p in CSRC.rglob("*") if p.is_file())
    assert [n for n in names if "/" not in n] == ["bindings.cpp"]
    assert [n for n in names if n.startswith("cpu/")] == [
        "cpu/attention.cpp", "cpu/compaction.cpp", "cpu/vague_store.cpp"]
    assert {"common/ops.h", "common/op_checks.h", "common/quantized_records.h",
            "common/record_layout.h", "common/scratch.h", "common/sketch_hash.h"} <= {n for n in names if n.startswith("common/")}
