"""benchmarks/kernels.py --quick end to end: every case timed, ours checked against the
reference before timing (the script asserts it), vLLM's kernel timed where it has one."""

from __future__ import annotations

import math

from bench_script import run_quick


def test_quick_kernels_benchmark(tmp_path):
    report = run_quick("kernels.py", tmp_path, "kernels.json", timeout=600)
    results = report["results"]
    ops = {r["op"] for r in results}
    assert {"paged_attention", "revived_attention", "write_kv", "quantize_records",
            "dequantize_records", "count_sketch_add", "count_sketch_logits",
            "compact_quantized", "compact_slots"} <= ops
    for r in results:
        assert r["repeats"] >= 5
        if r["op"].startswith("compact"):
            # Net of the timed cache restore: noise may push a tiny net time to <= 0.
            assert r["ms"]["restore"] > 0
            assert all(math.isfinite(v) for v in r["ms"].values())
            continue
        assert r["ms"]["compiled"] > 0 and r["ms"]["reference"] > 0
        assert r["ratios"]["reference/compiled"] > 0
        if r["op"] in ("paged_attention", "revived_attention", "write_kv"):
            assert r["ms"]["vllm"] > 0 and r["ratios"]["vllm/compiled"] > 0
