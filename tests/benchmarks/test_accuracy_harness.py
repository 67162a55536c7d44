"""benchmarks/accuracy.py: its metrics, and its --quick grid end to end in real vLLM."""

from __future__ import annotations

import json
import math
import statistics
import sys

import pytest
from bench_script import BENCHMARKS, run_quick

sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
from harness.tasks import FORCED_TASKS, Sample  # noqa: E402


def test_agreement_counts_tokens_before_the_first_difference():
    a = list(range(accuracy.MAX_TOKENS))
    assert accuracy.agreement(a, a) == 1.0
    assert accuracy.agreement(a, a[:8] + [-1] * 24) == 8 / accuracy.MAX_TOKENS
    assert accuracy.agreement(a, [-1] + a[1:]) == 0.0
    # Long generation: over a longer stretch.
    assert accuracy.agreement(a, a[:8] + [-1] * 24, length=256) == 8 / 256


def test_top_k_kl_is_zero_for_equal_and_grows_with_disagreement():
    full = {1: math.log(0.6), 2: math.log(0.3)}
    assert accuracy.top_k_kl(full, full) == pytest.approx(0.0, abs=1e-9)
    close = {1: math.log(0.55), 2: math.log(0.35)}
    far = {3: math.log(0.9), 1: math.log(0.05)}  # token 2 missing: gets 0.05
    assert 0 < accuracy.top_k_kl(full, close) < accuracy.top_k_kl(full, far)


def test_top_k_kl_floor_is_the_kth_logprob_not_a_sampled_extra(monkeypatch):
    # A step lists its top k and, outside them, the sampled (forced) token: a token
    # missing from it has at most the k-th probability, not the forced one's.
    monkeypatch.setattr(accuracy, "TOP_LOGPROBS", 2)
    full = {1: math.log(0.5), 2: math.log(0.3)}
    other = {1: math.log(0.5), 3: math.log(0.3), 9: math.log(0.001)}  # 9: forced, outside top 2
    assert accuracy.top_k_kl(full, other) == pytest.approx(accuracy.top_k_kl(full, other | {2: math.log(0.3)}))


def test_forced_kl_averages_over_the_forced_positions():
    a, b = {1: math.log(0.6), 2: math.log(0.3)}, {1: math.log(0.3), 2: math.log(0.6)}
    assert accuracy.forced_kl([a, a], [a, b]) == pytest.approx(accuracy.top_k_kl(a, b) / 2)
    with pytest.raises(ValueError):  # positions must pair up
        accuracy.forced_kl([a, a], [a])


def test_forced_nll_reads_each_forced_token_after_the_first():
    # Position 0 comes from the exact prompt; step i scores forced token i + 1.
    sample = Sample("loss", [5, 6], 2048, "", (7, 8, 9))
    steps = [{8: math.log(0.5), 1: math.log(0.25)}, {1: math.log(0.5), 9: math.log(0.1)}]
    assert accuracy.forced_nll(sample, steps) == pytest.approx([math.log(2), math.log(10)])
    with pytest.raises(ValueError):  # one step per scored position
        accuracy.forced_nll(sample, steps[:1])


def test_uniform_bits_is_the_widest_width_that_holds_every_token():
    slot_bytes = 264  # bf16, head size 64
    assert accuracy.uniform_bits(0.5, 2048, 64, slot_bytes, 68) == 4
    assert accuracy.uniform_bits(0.25, 2048, 64, slot_bytes, 68) == 2
    assert accuracy.uniform_bits(0.1, 2048, 64, slot_bytes, 68) is None
    assert accuracy.engine_kwargs("uniform", 0.1, None) is None
    section = accuracy.engine_kwargs("uniform", 0.25, 2)["additional_config"]["kvreviver"]
    assert section == {"budget": 0.25, "variant": "quantized", "candidates": False, "bits": 2,
                       "value_bits": 2}


def test_knobs_reach_every_kvreviver_method_and_are_checked():
    knobs = accuracy.parse_knobs(["recent=32", "score_window=128"])
    assert knobs == {"recent": 32, "score_window": 128}
    section = accuracy.engine_kwargs("quantized-3bit", 0.1, None, knobs)["additional_config"]["kvreviver"]
    assert section == {"budget": 0.1, "recent": 32, "score_window": 128, "variant": "quantized",
                       "bits": 3, "value_bits": 3}
    # quantized-Nbit: keys at N bits, values too unless --set value_bits says otherwise.
    section = accuracy.engine_kwargs("quantized-4bit", 0.1, None, {"value_bits": 2})
    assert section["additional_config"]["kvreviver"]["value_bits"] == 2
    assert accuracy.engine_kwargs("full", None, None, knobs) == {}  # stock vLLM: untouched
    # evict stays SnapKV (3 either side); evict-ahead takes the config's ranking.
    ahead = accuracy.parse_knobs(["pool_after=16"])
    evict = accuracy.engine_kwargs("evict", 0.1, None, ahead)["additional_config"]["kvreviver"]
    assert evict == {"budget": 0.1, "variant": "evict", "pool_before": 3, "pool_after": 3,
                     "pool_decay": 1.0}
    evict = accuracy.engine_kwargs("evict-ahead", 0.1, None, ahead)["additional_config"]["kvreviver"]
    assert evict == {"budget": 0.1, "pool_after": 16, "variant": "evict"}
    with pytest.raises(SystemExit, match="recent=0 is out of range"):
        accuracy.parse_knobs(["recent=0"])
    with pytest.raises(SystemExit, match="--set bits: the methods"):
        accuracy.parse_knobs(["bits=3"])
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        accuracy.parse_knobs(["recent"])


def test_contexts_are_shortened_to_fit_the_model_positions():
    room = 8192 - accuracy.MAX_TOKENS - 8
    assert accuracy.fit_contexts((2048, 4096, 8192), 8192) == (2048, 4096, room)
    assert accuracy.fit_contexts((8192, 9000), 8192) == (room,)


def test_attention_error_is_averaged_per_request_at_the_nearest_context():
    # (request, prompt length, layer, step, error): request 0 is ~2k, 1 and 2 are ~4k.
    errors = [(0, 2050, 0, 0, 0.1), (0, 2050, 1, 0, 0.3), (1, 4090, 0, 0, 0.5),
              (2, 4101, 0, 0, 0.1), (2, 4101, 0, 1, 0.2), (2, 4101, 1, 0, 0.3)]
    assert accuracy.attention_error_by_context(errors, {2048, 4096}) == pytest.approx(
        {2048: 0.2, 4096: (0.5 + 0.2) / 2}
    )
    assert accuracy.attention_error_by_context([], {2048}) == {}


@pytest.mark.engine
def test_quick_grid_end_to_end(tmp_path, model_dir):
    report = run_quick("accuracy.py", tmp_path, "accuracy_quick.json", timeout=900)
    assert "| full |" in (tmp_path / "accuracy_quick.md").read_text()
    grid = accuracy.QUICK
    rows = {(r["method"], r["task"]): r for r in report["rows"]}
    # Every method ran every task on every sample.
    assert set(rows) == {(m, t) for m in grid.methods for t in grid.tasks}
    for (method, task), row in rows.items():
        assert row["samples"] == grid.samples and row["context"] == grid.contexts[0]
        if task in FORCED_TASKS:
            assert 0 < row["loss"] < 20 and row["kl"] >= 0
            assert statistics.fmean(row["prompt_losses"]) == pytest.approx(row["loss"], abs=1e-4)
        else:
            assert 0 <= row["correct"] <= row["samples"]
            assert 0 <= row["agreement"] <= 1
    # The reference agrees with itself; its own passkeys are found at ~1k tokens.
    assert rows[("full", "passkey-repeat")]["agreement"] == 1.0
    assert rows[("full", "loss")]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[("full", "loss")]["loss_delta"] == 0.0
    # Long generation: the full cache agrees with itself over the free-run tokens,
    # and the compressed caches, rewritten every 32 decode steps, move its forced
    # positions' distributions.
    assert rows[("full", "generation")]["agreement"] == 1.0
    for method in grid.methods[1:]:  # the compressed ones
        assert rows[(method, "generation")]["kl"] > 1e-3
        assert 0 <= rows[(method, "generation")]["agreement"] <= 1
    # The loss is taken on decode steps, which the compressed cache serves: at 25%
    # the forced positions' distributions move away from the full cache's.
    for method in grid.methods[1:]:  # the compressed ones
        assert rows[(method, "loss")]["kl"] > 1e-3
    assert rows[("full", "passkey-repeat")]["correct"] == grid.samples
    # The compressed runs really went through the KVReviver backend.
    configs = {r["method"]: r["config"] for r in report["runs"]}
    assert configs["quantized"]["attention_backend"] == "kvreviver"
    # Attention-output error was measured inside the worker for the compressed runs
    # (the 2 passkey prompts' decode steps), not for stock vLLM.
    errors = {r["method"]: r["attention_error"] for r in report["runs"]}
    assert errors["full"] == {}
    for method in grid.methods[1:]:  # the compressed ones
        assert set(errors[method]) == {str(grid.contexts[0])}
        assert 0 < errors[method][str(grid.contexts[0])] < 1.5
    assert "attention error" in (tmp_path / "accuracy_quick.md").read_text()
    # Per-position losses: one list per forced prompt, averaging to its loss.
    nll = json.loads((tmp_path / "accuracy_quick_nll.json").read_text())
    for row in report["rows"]:
        if row["task"] in FORCED_TASKS:
            label = accuracy.run_label(row["method"], row["budget"])
            lists = [p["nll"] for p in nll[label] if p["task"] == row["task"]]
            assert [statistics.fmean(x) for x in lists] == pytest.approx(row["prompt_losses"], abs=1e-3)
    assert configs["quantized"]["additional_config"]["kvreviver"]["budget"] == grid.budgets[0]
