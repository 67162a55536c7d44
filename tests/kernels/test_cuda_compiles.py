"""The CUDA kernels compile with the machine's nvcc (no GPU needed), so CI catches
CUDA breakage on CPU-only machines."""

from __future__ import annotations

import platform
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
            "common/record_layout.h", "common/scratch.h", "common/sketch_hash.h",
            "common/quantize_group.h"} <= {n for n in names if n.startswith("common/")}


# -- quantize_group.h: the per-group arithmetic CPU and CUDA share ------------------

QUANTIZE_GROUP_H = CSRC / "common" / "quantize_group.h"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("flags", [[], ["--use_fast_math", "-fmad=true"]], ids=["build", "fast-math"])
def test_quantize_kernel_rounds_every_step_to_nearest(flags, tmp_path):
    # reference.py quantize_groups' rule on the device: every float op of the
    # quantize kernel is a correctly rounded one (div.rn, sub.rn, cvt.rn): no
    # fma contraction, no approximate division, whatever the nvcc flags (fast
    # math may only flush subnormals: .ftz).
    ptx = tmp_path / "vague_store.ptx"
    res = subprocess.run(
        ["nvcc", "-ptx", str(CUDA_DIR / "vague_store_kernels.cu"), "-arch=sm_90", "-std=c++20",
         "-O3", *flags, "-o", str(ptx)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    body = re.search(r"\.entry \S*23quantize_records_kernel.*?\n}", ptx.read_text(), re.S).group(0)
    ops = set(re.findall(r"\b((?:div|sub|add|mul|fma|rcp|sqrt)\.[a-z0-9.]*f32)\b", body))
    assert {op.replace(".ftz", "") for op in ops} == {"div.rn.f32", "sub.rn.f32"}, ops
    assert "cvt.rn.f16.f32" in body and "cvt.rni.f32.f32" in body


def test_quantize_group_header_is_torch_free(tmp_path):
    # The CUDA kernels include it without torch headers.
    source = tmp_path / "probe.cpp"
    source.write_text(f'#include "{QUANTIZE_GROUP_H}"\nint main() {{ return 0; }}\n')
    res = subprocess.run(["g++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                          str(source)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


FP16_CHECK = r"""
#include <immintrin.h>
#include <cstdio>
#include "QUANTIZE_GROUP_H"
int main() {
  unsigned long long bad = 0;
  for (unsigned long long u = 0; u <= 0xffffffffull; ++u) {
    const uint32_t w = static_cast<uint32_t>(u);
    if ((w & 0x7fffffffu) > 0x7f800000u) continue;  // NaN payloads: not specified
    float f;
    std::memcpy(&f, &w, 4);
    if (kvreviver::float_to_half_bits(f) != _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)) ++bad;
  }
  for (uint32_t h = 0; h < 65536; ++h) {
    if ((h & 0x7fffu) > 0x7c00u) continue;
    const float a = kvreviver::half_bits_to_float(static_cast<uint16_t>(h)), b = _cvtsh_ss(h);
    if (std::memcmp(&a, &b, 4)) ++bad;
  }
  std::printf("%llu\n", bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="F16C is x86's")
def test_host_fp16_conversion_is_round_to_nearest_even(tmp_path):
    # The host half of float_to_half_bits (integer code) against the F16C
    # instruction (round to nearest even, what __float2half_rn does on the
    # device), for every non-NaN float; half_bits_to_float for every half.
    source = tmp_path / "fp16_check.cpp"
    source.write_text(FP16_CHECK.replace("QUANTIZE_GROUP_H", str(QUANTIZE_GROUP_H)))
    exe = tmp_path / "fp16_check"
    res = subprocess.run(["g++", "-std=c++17", "-O2", "-mf16c", str(source), "-o", str(exe)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{res.stdout.strip()} mismatches"
