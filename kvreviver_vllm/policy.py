"""Which exact slots a compaction keeps, per KV head.

Exact slots stay in position order through every compaction, so the first
``sink`` slots are the request's first tokens and the last ``recent`` slots its
newest ones; neither is ever dropped. The rest compete on importance: the
attention each slot received since the last compaction (from all query rows of
those steps and the query heads of its GQA group), max-pooled over neighbouring
slots so a token's neighbours survive with it (SnapKV's observation-window
scoring, with the window being the steps since the last compaction). The pool
may reach further after a token than before it (``pool_after``): what follows
an attended token is what a copy of it reads next; and it may lend only a share
of the score (``pool_decay``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the stores rank their records with pooled_scores
    from kvreviver_vllm.stores.base import VagueStore

# The ranking defaults (``KVReviverConfig.pool_before`` / ``pool_after``): each
# scored token lends its score 3 tokens back, as in SnapKV's pooling kernel of 7,
# and 24 ahead, so that what follows an attended token (the rest of a long value,
# which a copy reads only while decoding) survives with it. 24 ahead took a
# 20-digit key from 0/8 (SnapKV's 3) to the full cache's 7/8 at 10% and 25%
# (benchmarks/README.md).
POOL_BEFORE = 3
POOL_AFTER = 24
# The share of its score a token lends those neighbours (``pool_decay``): 1 lends
# all of it (SnapKV's max pooling). Below 1, where records are scarce, the
# neighbours of one well-read token stop crowding out other tokens read nearly
# as much (0.3 cut the loss at 10% on four seeds: benchmarks/README.md).
POOL_DECAY = 1.0
# SnapKV's own kernel, for comparing against eviction as published.
SNAPKV_POOL = (3, 3, 1.0)


def pooled_scores(scores: torch.Tensor, before: int, after: int,
                  decay: float = POOL_DECAY) -> torch.Tensor:
    """``[H, L]`` scores max-pooled so that each slot lends ``decay`` times its
    score to the ``before`` slots before it and the ``after`` slots after it:
    ``out[i] = max(scores[i], decay * max(scores[i - after : i + before + 1]))``."""
    if scores.shape[1] == 0:  # max_pool1d refuses empty inputs
        return scores
    padded = F.pad(scores[:, None], (after, before), value=float("-inf"))
    pooled = F.max_pool1d(padded, before + after + 1, stride=1)[:, 0]
    return pooled if decay == 1 else torch.maximum(scores, decay * pooled)


def select_kept(
    scores: torch.Tensor, keep: int, sink: int, recent: int, by_score: bool,
    pool: tuple[int, int, float],
) -> torch.Tensor:
    """Ascending slot indices ``[H, keep]`` of the slots each head keeps out of
    ``L = scores.shape[1]``: the sink, the recent window, and the best-scored
    (``by_score``, scores pooled by ``pool = (before, after, decay)``) or the newest
    (streaming) of the slots in between."""
    num_heads, num_slots = scores.shape
    if keep >= num_slots:
        return torch.arange(num_slots, device=scores.device).expand(num_heads, -1)
    num_sink = min(sink, keep)
    num_recent = min(recent, keep - num_sink)
    num_middle = keep - num_sink - num_recent
    middle_end = num_slots - num_recent
    arange = torch.arange(num_slots, device=scores.device)
    if by_score:
        middle = pooled_scores(scores.float(), *pool)[:, num_sink:middle_end]
        chosen = middle.topk(num_middle, dim=1).indices + num_sink
    else:
        chosen = arange[middle_end - num_middle : middle_end].expand(num_heads, -1)
    kept = torch.cat(
        [
            arange[:num_sink].expand(num_heads, -1),
            chosen,
            arange[middle_end:].expand(num_heads, -1),
        ],
        dim=1,
    )
    return kept.sort(dim=1).values


def split_budget(
    budget_slots: int, exact: int, vague: int, protected: int, store: VagueStore | None,
    candidates: bool = True, candidate_share: float = 0.0,
) -> tuple[int, int]:
    """``(exact kept, vague kept)`` for a compaction to ``budget_slots`` slots.

    ``exact`` tokens are now exact and ``vague`` are in the store; ``protected``
    (sink + recent) stay exact. Without a store the budget is all exact. With
    one, every token stays (exact or vague) if it can, with as many exact as fit
    (only the protected ones without ``candidates``); otherwise sink + recent
    and ``candidate_share`` of the other slots stay exact (the best-scored
    tokens) and the store keeps what fits in the rest, the others being evicted.
    """
    if store is None:
        return min(budget_slots, exact), 0
    total = exact + vague
    protected = min(protected, exact)
    if not candidates:
        return protected, min(total - protected, store.capacity(budget_slots - protected))
    if exact + store.slots_for(vague) <= budget_slots:
        return exact, vague
    # Largest number of exact tokens whose remainder fits in the store.
    for keep_exact in range(min(exact, budget_slots), protected - 1, -1):
        if keep_exact + store.slots_for(total - keep_exact) <= budget_slots:
            return keep_exact, total - keep_exact
    # Not every token fits: precision for the best-scored, coverage for the rest.
    keep_exact = protected + max(0, min(exact - protected,
                                        int(candidate_share * (budget_slots - protected))))
    return keep_exact, min(total - keep_exact, store.capacity(budget_slots - keep_exact))
