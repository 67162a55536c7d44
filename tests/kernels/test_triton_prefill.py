"""The Triton prompt-chunk kernel against the PyTorch reference: on a GPU, or on
the CPU under Triton's interpreter (in a process of its own that sets
``TRITON_INTERPRET`` first: ``test_triton_interpreter.py``)."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no GPU: runs under the Triton interpreter in its own process "
                "(test_triton_interpreter.py)", allow_module_level=True)
pytest.importorskip("triton", reason="triton is not installed: no Triton kernels to test")

from test_reference_ops import build_cache  # noqa: E402
from test_triton_decode import TOL, assert_only_scores_change  # noqa: E402

from kvreviver_vllm.ops import reference, triton_prefill  # noqa: E402

CASES = [
    # seq_lens, query lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window
    ([300, 77], [300, 20], 3, 1, 64, 16, torch.float32, 32),  # whole prompt; a chunk
    ([300, 77], [300, 20], 3, 1, 64, 16, torch.bfloat16, 32),
    ([130, 5, 64], [64, 1, 64], 1, 2, 64, 32, torch.float32, 1),  # a decode row among chunks
    ([200], [150], 4, 2, 64, 16, torch.float16, 0),
    ([90, 40], [90, 40], 8, 1, 128, 128, torch.bfloat16, 100),  # window wider than the chunk
    ([33], [17], 1, 1, 64, 16, torch.float32, 5),
]


def run_case(seq_lens, q_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window,
             requests=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache, table, _, _ = build_cache(seq_lens, num_kv_heads, head_size, block_size, dtype, gen)
    num_q_heads = gqa * num_kv_heads
    qsl = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
    query = torch.randn(int(qsl[-1]), num_q_heads, head_size, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    scale = head_size**-0.5
    run = list(range(len(seq_lens))) if requests is None else requests
    want, got = torch.zeros_like(query), torch.zeros_like(query)
    ref_cache, tri_cache = cache.clone(), cache.clone()
    # The reference over the chosen requests only: the others get no query rows.
    ref_lens = torch.tensor([q if r in run else 0 for r, q in enumerate(q_lens)])
    ref_qsl = torch.cat([torch.zeros(1), ref_lens.cumsum(0)]).to(torch.int32)
    rows = torch.cat([torch.arange(int(qsl[r]), int(qsl[r + 1])) for r in run])
    ref_out = torch.zeros(len(rows), num_q_heads, head_size, dtype=dtype)
    reference.paged_attention(ref_out, query[rows], ref_cache, table, lens, ref_qsl, scale,
                              score_window)
    want[rows] = ref_out
    triton_prefill.paged_prefill_attention(
        got, query, tri_cache, table, lens, qsl, scale, score_window,
        torch.tensor(run, dtype=torch.int32), max(q_lens[r] for r in run),
        max(seq_lens[r] for r in run))
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert_only_scores_change(cache, ref_cache, tri_cache, score_window)
    return got, rows


@pytest.mark.parametrize(
    "seq_lens, q_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window", CASES)
def test_prefill_matches_reference(seq_lens, q_lens, gqa, num_kv_heads, head_size, block_size,
                                   dtype, score_window):
    run_case(seq_lens, q_lens, gqa, num_kv_heads, head_size, block_size, dtype, score_window)


def test_only_the_given_requests_are_touched():
    got, rows = run_case([120, 60, 90], [40, 1, 90], 3, 1, 64, 16, torch.float32, 32,
                         requests=[0, 2])
    others = torch.ones(got.shape[0], dtype=torch.bool)
    others[rows] = False
    assert others.sum() == 1 and torch.equal(got[others], torch.zeros_like(got[others]))
