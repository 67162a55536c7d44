"""The low-bit per-token vague store (variant ``quantized``).

Every token demoted from the exact cache is kept as a fixed-size *record*:

    [ K codes | V codes | K (scale, min) per group | V (scale, min) per group | position | score ]

Keys and values are quantized per token, asymmetric min/max, in groups of
``GROUP`` channels, codes packed little-endian at ``bits`` bits; scale and min are
float16, position int32, score float32. Records are packed back to back into
the request's own paged slots (a record may straddle two slots, so no byte is
wasted), so revival needs no memory outside the request's blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvreviver_vllm.stores.base import VagueStore


@dataclass(frozen=True)
class QuantizedStore(VagueStore):
    head_size: int
    bits: int
    slot_bytes: int

    @property
    def group(self) -> int:
        return 32 if self.head_size % 32 == 0 else 16

    @property
    def num_groups(self) -> int:
        return self.head_size // self.group

    @property
    def code_bytes(self) -> int:
        return self.head_size * self.bits // 8

    @property
    def record_bytes(self) -> int:
        return 2 * self.code_bytes + 2 * 4 * self.num_groups + 8

    def slots_for(self, num_tokens: int) -> int:
        return -(-num_tokens * self.record_bytes // self.slot_bytes)

    def capacity(self, num_slots: int) -> int:
        return max(0, num_slots) * self.slot_bytes // self.record_bytes

    # -- quantization ---------------------------------------------------------
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [N, D]`` -> codes ``uint8 [N, D]``, scale and min ``float16 [N, G]``."""
        levels = 2**self.bits - 1
        g = x.float().view(x.shape[0], self.num_groups, self.group)
        lo = g.amin(dim=2).half()
        scale = ((g.amax(dim=2) - lo.float()) / levels).half()
        safe = scale.float().clamp(min=1e-8)
        codes = ((g - lo.float()[..., None]) / safe[..., None]).round().clamp(0, levels)
        return codes.to(torch.uint8).view(x.shape[0], self.head_size), scale, lo

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
        g = codes.float().view(codes.shape[0], self.num_groups, self.group)
        return (g * scale.float()[..., None] + lo.float()[..., None]).view(codes.shape[0], self.head_size)

    def _pack_codes(self, codes: torch.Tensor) -> torch.Tensor:
        if 8 % self.bits == 0:  # whole codes per byte: shift and add, no bit tensor
            per_byte = 8 // self.bits
            grouped = codes.view(codes.shape[0], self.code_bytes, per_byte).to(torch.int32)
            shifts = torch.arange(0, 8, self.bits, device=codes.device, dtype=torch.int32)
            return (grouped << shifts).sum(-1).to(torch.uint8)
        shifts = torch.arange(self.bits, device=codes.device)
        bits = (codes[..., None].long() >> shifts) & 1  # [N, D, b], little-endian
        bits = bits.view(codes.shape[0], self.code_bytes, 8)
        return (bits << torch.arange(8, device=codes.device)).sum(-1).to(torch.uint8)

    def _unpack_codes(self, packed: torch.Tensor) -> torch.Tensor:
        if 8 % self.bits == 0:
            shifts = torch.arange(0, 8, self.bits, device=packed.device, dtype=torch.int32)
            codes = (packed[..., None].to(torch.int32) >> shifts) & (2**self.bits - 1)
            return codes.view(packed.shape[0], self.head_size).to(torch.uint8)
        bits = (packed[..., None].long() >> torch.arange(8, device=packed.device)) & 1
        bits = bits.view(packed.shape[0], self.head_size, self.bits)
        return (bits << torch.arange(self.bits, device=packed.device)).sum(-1).to(torch.uint8)

    # -- records --------------------------------------------------------------
    def encode(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
               scores: torch.Tensor) -> torch.Tensor:
        """Records ``uint8 [N, record_bytes]`` of tokens ``keys/values [N, D]``."""
        n = keys.shape[0]
        kc, ks, kl = self.quantize(keys)
        vc, vs, vl = self.quantize(values)
        params = torch.stack([ks, kl, vs, vl], dim=1).view(torch.uint8).reshape(n, 8 * self.num_groups)
        meta = torch.stack([positions.to(torch.int32), scores.float().view(torch.int32)], dim=1)
        return torch.cat(
            [self._pack_codes(kc), self._pack_codes(vc), params, meta.view(torch.uint8).reshape(n, 8)],
            dim=1,
        )

    def decode(self, records: torch.Tensor):
        """``(keys, values)`` float32 ``[N, D]``, positions int32 and scores float32 ``[N]``."""
        n, cb = records.shape[0], self.code_bytes
        kc = self._unpack_codes(records[:, :cb])
        vc = self._unpack_codes(records[:, cb : 2 * cb])
        params = records[:, 2 * cb : -8].contiguous().view(torch.float16).view(n, 4, self.num_groups)
        keys = self.dequantize(kc, params[:, 0], params[:, 1])
        values = self.dequantize(vc, params[:, 2], params[:, 3])
        return keys, values, *self.meta(records)

    @staticmethod
    def meta(records: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (int32) and scores (float32) ``[N]`` of records, read without
        unpacking their codes."""
        meta = records[:, -8:].contiguous().view(torch.int32)
        return meta[:, 0], meta[:, 1].view(torch.float32)

    def with_scores(self, records: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        out = records.clone()
        out[:, -4:] = scores.float().contiguous().view(torch.uint8).view(-1, 4)
        return out

    # -- pages ----------------------------------------------------------------
    def to_pages(self, records: torch.Tensor) -> torch.Tensor:
        """``[N, record_bytes]`` -> ``uint8 [slots_for(N), slot_bytes]``."""
        n = records.shape[0]
        pages = records.new_zeros(self.slots_for(n) * self.slot_bytes)
        pages[: n * self.record_bytes] = records.reshape(-1)
        return pages.view(-1, self.slot_bytes)

    def from_pages(self, pages: torch.Tensor, num_tokens: int) -> torch.Tensor:
        used = pages.reshape(-1)[: num_tokens * self.record_bytes]
        return used.view(num_tokens, self.record_bytes)

    # -- VagueStore -----------------------------------------------------------
    def revive(self, pages: torch.Tensor, num_tokens: int, seed: int):
        keys, values, _, _ = self.decode(self.from_pages(pages, num_tokens))
        return keys, values

    def add_attention(self, pages: torch.Tensor, num_tokens: int, received: torch.Tensor):
        records = self.from_pages(pages, num_tokens)
        return self.to_pages(self.with_scores(records, self.meta(records)[1] + received))

    def absorb(self, pages, num_tokens, keys, values, positions, scores, keep, seed):
        """Old records plus the demoted tokens' records; the ``keep`` best-scored
        survive (importance since the last compaction), stored in position order
        with their importance reset."""
        records = torch.cat(
            [self.from_pages(pages, num_tokens), self.encode(keys, values, positions, scores)]
        )
        rec_positions, rec_scores = self.meta(records)
        best = rec_scores.topk(keep).indices
        best = best[rec_positions[best].argsort()]
        return self.to_pages(self.with_scores(records[best], torch.zeros(keep)))
