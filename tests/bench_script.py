"""Run one of ``benchmarks/*.py`` in a subprocess (as a user would) and load its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_quick(script: str, out: Path, report: str, timeout: int) -> dict:
    """``python benchmarks/<script> --quick --out <out>``; its JSON ``report``."""
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / report.replace(".json", ".png")).stat().st_size > 0
    return json.loads((out / report).read_text())
