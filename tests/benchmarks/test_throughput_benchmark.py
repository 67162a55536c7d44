"""benchmarks/throughput.py --quick: both servers serve every request; the report's shape."""

from __future__ import annotations

import sys

import pytest
from bench_script import BENCHMARKS, run_quick

sys.path.insert(0, str(BENCHMARKS))

import throughput  # noqa: E402


def test_ratios_are_against_stock_in_the_same_scenario_and_load():
    stock = throughput.Result("pressure", "stock", None, "burst", completed=4, peak_running=2,
                              output_tok_s=10.0, request_s=1.0, tpot_median_ms=100.0,
                              ttft_median_ms=50.0)
    ours = throughput.Result("pressure", "kvreviver@0.1", 0.1, "burst", completed=4,
                             peak_running=8, output_tok_s=25.0, request_s=2.0,
                             tpot_median_ms=120.0, ttft_median_ms=40.0)
    rows = throughput.with_ratios([stock, ours])
    assert rows[1]["peak_running_x"] == 4.0 and rows[1]["output_tok_s_x"] == 2.5
    assert rows[1]["tpot_median_ms_x"] == pytest.approx(1.2)
    assert rows[0]["peak_running_x"] == 1.0


@pytest.mark.engine
def test_quick_run_serves_every_request_on_both_engines(tmp_path, model_dir):
    report = run_quick("throughput.py", tmp_path, "throughput_quick.json", timeout=1200)
    setup = throughput.QUICK
    rows = report["rows"]
    configs = {(r["scenario"], r["config"]) for r in rows}
    assert configs == {
        ("pressure", "stock"), ("pressure", f"kvreviver@{setup.budgets[0]:g}"),
        ("no-pressure", "stock"), ("no-pressure", f"kvreviver@{setup.no_pressure_budget:g}"),
    }
    for r in rows:
        expected = setup.requests if r["scenario"] == "pressure" else int(r["load"][1:].split("@")[0])
        assert (r["completed"], r["failed"]) == (expected, 0), r
        assert r["output_tok_s"] > 0 and r["tpot_median_ms"] > 0
        if r["scenario"] == "pressure":
            assert r["peak_running"] >= 1
        else:  # /metrics is sampled every 0.25 s: it may miss a sub-second request
            assert 0 <= r["peak_running"] <= expected
        assert r["num_blocks"] > 0
    # A stock row exists for every load (its ratios' reference).
    stock_loads = {(r["scenario"], r["load"]) for r in rows if r["config"] == "stock"}
    assert {(r["scenario"], r["load"]) for r in rows} == stock_loads
    assert all(r["peak_running_x"] is not None for r in rows if r["scenario"] == "pressure")
    # Same KV bytes for both engines under pressure; stock's pool holds
    # pool_requests requests, ours more (a decoding request holds its budget).
    pressure = {r["config"]: r for r in rows if r["scenario"] == "pressure"}
    assert pressure["stock"]["peak_running"] <= setup.pool_requests
    assert set(report["accuracy"]) == {r["config"] for r in rows}
