"""Runs the Triton kernel tests (``test_triton_decode.py``, ``test_triton_prefill.py``)
on the CPU under Triton's interpreter, in a process of their own: ``TRITON_INTERPRET``
must be set before triton is first imported, and must not reach this process's vLLM
engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: no Triton decode kernel to test")


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU they run in this process")
def test_triton_kernels_under_the_interpreter():
    here = Path(__file__).parent
    modules = [str(here / name) for name in ("test_triton_decode.py", "test_triton_prefill.py")]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *modules],
        capture_output=True, text=True, timeout=600, env=env, cwd=here.parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


def test_triton_kernels_compile_for_the_gpu():
    """The GPU-only code paths (tensor-core dots in bf16/fp16) never run under the
    interpreter; every kernel variant compiles for sm_90 with Triton's ptxas."""
    script = Path(__file__).parents[2] / "benchmarks" / "gpu_decode.py"
    proc = subprocess.run([sys.executable, str(script), "--compile-check"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "_split_kernel: ok" in proc.stdout and "_prefill_kernel: ok" in proc.stdout, \
        proc.stdout[-2000:]


@pytest.mark.parametrize("widths", [[], ["--bits", "3", "--value-bits", "2"]],
                         ids=["default", "long-context"])
def test_gpu_decode_benchmark_cases_under_the_interpreter(widths):
    """The GPU benchmark's smallest shape on the CPU: its exact case, the
    compressed caches it builds at 25% and 10% (records in the pages, exact
    slots after them; records that straddle slots with the long-context
    widths) and a prompt chunk give SDPA's output over the same (revived) tokens."""
    script = Path(__file__).parents[2] / "benchmarks" / "gpu_decode.py"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, str(script), "--dry-run", *widths],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("dry run:")]
    assert len(lines) == 8 and sum("rec)" in line for line in lines) == 4, proc.stdout
    assert sum("prefill" in line for line in lines) == 2, proc.stdout
