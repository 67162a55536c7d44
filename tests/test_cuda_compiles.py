"""The CUDA kernels compile with the machine's nvcc (no GPU needed), so CI catches
CUDA breakage on CPU-only machines."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_SOURCES = sorted((Path(__file__).parents[1] / "csrc" / "cuda").glob("*.cu"))


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


def test_there_are_cuda_sources():
    assert [p.name for p in CUDA_SOURCES] == ["attention_kernels.cu", "vague_store_kernels.cu"]
