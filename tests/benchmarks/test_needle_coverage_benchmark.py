"""benchmarks/needle_coverage.py: answer matching, and its --quick run end to end in real vLLM."""

from __future__ import annotations

import sys

import pytest
from bench_script import BENCHMARKS, run_quick

sys.path.insert(0, str(BENCHMARKS))

import needle_coverage as coverage  # noqa: E402


def test_answer_copies_and_holds():
    prompt = [5, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2]
    copies = coverage.answer_copies(prompt, [1, 2, 3])
    assert copies == [range(1, 4), range(5, 8)]
    assert coverage.holds({5, 6, 7}, copies)  # the second copy whole
    assert not coverage.holds({1, 2, 6, 7}, copies)  # pieces of both: no copy
    assert coverage.answer_copies(prompt, [4]) == []


@pytest.mark.engine
def test_quick_coverage_end_to_end(tmp_path, model_dir):
    report = run_quick("needle_coverage.py", tmp_path, "coverage_quick.json", timeout=600)
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"evict", "quantized"}
    for row in rows.values():
        assert row["samples"] == 2 and 0 <= row["exact"] <= row["held"] <= 1
    # Eviction holds exactly its budget of the prompt, all of it exact; the 4-bit
    # store holds about three tokens per bf16 slot of the same budget (six per float32 slot).
    assert rows["evict"]["held"] == rows["evict"]["exact"]
    assert rows["evict"]["tokens"] == pytest.approx(0.25, abs=0.01)
    assert rows["quantized"]["tokens"] > 2 * rows["evict"]["tokens"]
    assert "| quantized | 25% |" in (tmp_path / "coverage_quick.md").read_text()
    # The split by answer counts only prompts the full cache answers (here: all).
    assert all(r["full_correct"] == 2 for r in report["rows"])
