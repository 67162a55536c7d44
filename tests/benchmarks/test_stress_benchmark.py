"""benchmarks/stress.py --quick end to end: a real server under mixed load with bad
input, disconnecting clients and preemption; nothing lost, nobody let in, a clean
SIGTERM."""

from __future__ import annotations

import pytest

from bench_script import run_quick

pytestmark = pytest.mark.engine


def test_quick_stress_run_holds(tmp_path):
    report = run_quick("stress.py", tmp_path, "stress.json", timeout=1200)
    (budget,) = report["budgets"]
    assert all(budget["checks"].values()), budget["checks"]
    kinds = {kind for r in budget["rounds"] for kind in r["outcomes"]}
    assert {f"bad: {name}" for name in report["bad_inputs"]} <= kinds
    assert {"completion", "chat"} <= kinds
    assert any(k.startswith("disconnect") for k in kinds)
    assert budget["security"]["unauthorized_requests"] == 10
    assert budget["shutdown"]["engine_processes"] >= 1 and not budget["shutdown"]["processes_left"]
