"""benchmarks/scale_out.py --quick end to end: one process and tensor parallel 2 on the
same requests; TP=2 holds the same blocks, each rank half of each block's bytes."""

from __future__ import annotations

import pytest

from bench_script import run_quick
from cores import all_cores

pytestmark = pytest.mark.engine


def test_quick_scale_out_benchmark(tmp_path):
    with all_cores():  # the script binds one core per rank itself
        report = run_quick("scale_out.py", tmp_path, "scale_out.json", timeout=900)
    one, tp2 = report["runs"]
    assert (one["tp"], tp2["tp"]) == (1, 2)
    for run in (one, tp2):
        assert run["output_tok_s"] > 0 and run["peak_blocks"] > 0
    assert tp2["peak_blocks"] == one["peak_blocks"]
    assert tp2["block_bytes_per_rank"] == [one["block_bytes_per_rank"][0] // 2] * 2
