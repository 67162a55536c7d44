"""Summaries of the tokens the store drops (variant ``quantized`` with ``merge_share`` set).

A research store, PyTorch only (it runs through the reference attention and
compaction ops). Where the budget cannot hold every token, plain records drop
the lowest-ranked ones, and their attention mass goes with them: every query
then renormalizes over what is left. Here ``merge_share`` of the records a head
keeps are *summaries*: each stands for ``n`` dropped tokens that lie next to
each other among the dropped ones, as their mean key and mean value, and
attention adds ``log n`` to its logit, so it weighs as ``n`` tokens sharing
that key (exact where their keys agree, an underestimate of their mass where
they differ).

A record is a quantized record (:class:`QuantizedStore`'s bytes) followed by
the number of tokens it stands for (float32; 1 for a plain record). The
ranking is the quantized store's, on each record's score per token it stands
for, so a summary is kept whole only where its tokens drew attention as a kept
token does; the others are merged again with the newly dropped tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, pooled_scores
from kvreviver_vllm.stores.base import VagueStore
from kvreviver_vllm.stores.quantized import QuantizedStore

COUNT_BYTES = 4  # float32 tokens per record, after the quantized record


@dataclass(frozen=True)
class MergedQuantizedStore(VagueStore):
    head_size: int
    bits: int
    merge_share: float
    slot_bytes: int
    value_bits: int = 0
    pool_before: int = POOL_BEFORE
    pool_after: int = POOL_AFTER

    @property
    def base(self) -> QuantizedStore:
        return QuantizedStore(self.head_size, self.bits, self.slot_bytes, self.value_bits,
                              self.pool_before, self.pool_after)

    @property
    def record_bytes(self) -> int:
        return self.base.record_bytes + COUNT_BYTES

    def slots_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.record_bytes // self.slot_bytes)

    def capacity(self, num_slots: int) -> int:
        return max(0, num_slots) * self.slot_bytes // self.record_bytes

    def num_summaries(self, keep: int) -> int:
        """Summary records among ``keep`` when the store must drop tokens."""
        return min(keep, math.ceil(self.merge_share * keep))

    # -- pages ------------------------------------------------------------------
    def _records(self, pages: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized records ``uint8 [N, base bytes]`` and token counts ``float32 [N]``."""
        used = pages.reshape(-1)[: num_tokens * self.record_bytes].view(num_tokens, self.record_bytes)
        counts = used[:, -COUNT_BYTES:].contiguous().view(torch.float32).flatten()
        return used[:, :-COUNT_BYTES], counts

    def _to_pages(self, records: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        n = records.shape[0]
        rows = torch.cat([records, counts.float().contiguous().view(torch.uint8).view(n, COUNT_BYTES)],
                         dim=1)
        pages = rows.new_zeros(self.slots_for(n) * self.slot_bytes)
        pages[: rows.numel()] = rows.reshape(-1)
        return pages.view(-1, self.slot_bytes)

    @staticmethod
    def _runs(weights: torch.Tensor, num_runs: int) -> torch.Tensor:
        """Run index ``[m]`` of ``m > num_runs`` items in order, cutting them into
        ``num_runs`` non-empty runs of about equal total weight."""
        m = weights.shape[0]
        before = weights.cumsum(0) - weights
        targets = weights.sum() * torch.arange(1, num_runs) / num_runs
        starts = torch.searchsorted(before, targets).tolist()
        prev = 0
        for j, start in enumerate(starts):  # non-empty: at least one item a run, in order
            starts[j] = prev = min(max(start, prev + 1), m - (num_runs - 1 - j))
        first = torch.zeros(m, dtype=torch.long)
        first[starts] = 1
        return first.cumsum(0)

    # -- VagueStore ---------------------------------------------------------------
    def revive(self, pages, num_tokens, seed):
        keys, values, _, _ = self.base.decode(self._records(pages, num_tokens)[0])
        return keys, values

    def logit_bias(self, pages, num_tokens):
        """``log n`` per record: a summary of ``n`` tokens weighs as ``n`` of them."""
        return self._records(pages, num_tokens)[1].log()

    def add_attention(self, pages, num_tokens, received):
        records, counts = self._records(pages, num_tokens)
        return self._to_pages(self.base.with_scores(records, self.base.meta(records)[1] + received),
                              counts)

    def absorb(self, pages, num_tokens, keys, values, positions, scores, keep, seed):
        """Old records plus the demoted tokens. Where all fit, all stay. Otherwise
        the best ``keep - num_summaries(keep)`` by pooled score per token stay as
        they are, and the rest, in position order, are cut into
        ``num_summaries(keep)`` runs of about equal token counts, each merged
        into one summary (count-weighted mean key, value and position). Records
        come out in position order with their importance reset."""
        old, old_counts = self._records(pages, num_tokens)
        records = torch.cat([old, self.base.encode(keys, values, positions, scores)])
        counts = torch.cat([old_counts, torch.ones(keys.shape[0])])
        order = self.base.meta(records)[0].argsort(stable=True)
        records, counts = records[order], counts[order]
        if records.shape[0] <= keep or keep == 0:
            records, counts = records[:keep], counts[:keep]
            return self._to_pages(self.base.with_scores(records, torch.zeros(len(records))), counts)
        old_keys, old_values, _, _ = self.base.decode(old)
        float_keys = torch.cat([old_keys, keys.float()])[order]
        float_values = torch.cat([old_values, values.float()])[order]
        positions, rec_scores = self.base.meta(records)

        num_plain = keep - self.num_summaries(keep)
        ranked = pooled_scores((rec_scores / counts)[None], self.pool_before, self.pool_after)[0]
        plain = torch.zeros(records.shape[0], dtype=torch.bool)
        plain[ranked.sort(descending=True, stable=True).indices[:num_plain]] = True

        dropped = (~plain).nonzero().flatten()
        weights = counts[dropped]
        run = self._runs(weights, keep - num_plain)
        total = torch.zeros(keep - num_plain).index_add_(0, run, weights)

        def merged(x: torch.Tensor) -> torch.Tensor:  # [items, C] -> count-weighted mean per run
            acc = torch.zeros(len(total), x.shape[1]).index_add_(0, run, x.float() * weights[:, None])
            return acc / total[:, None]

        summaries = self.base.encode(merged(float_keys[dropped]), merged(float_values[dropped]),
                                     merged(positions[dropped, None])[:, 0].round().int(),
                                     torch.zeros(len(total)))
        records = torch.cat([records[plain], summaries])
        counts = torch.cat([counts[plain], total])
        order = self.base.meta(records)[0].argsort(stable=True)
        return self._to_pages(self.base.with_scores(records[order], torch.zeros(len(order))),
                              counts[order])
