"""The one validated configuration object of the KVReviver backend.

Sources, highest precedence first:
  1. ``--additional-config '{"kvreviver": {...}}'`` (``VllmConfig.additional_config``)
  2. ``KVREVIVER_<KEY>`` environment variables (spawned engine processes inherit them)
  3. the defaults below.

Every bad value raises :class:`KVReviverConfigError` naming the key, the value and
the allowed range, so ``vllm serve`` stops before the engine starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvreviver_vllm.policy import POOL_AFTER, POOL_BEFORE, POOL_DECAY

ADDITIONAL_CONFIG_KEY = "kvreviver"
ENV_PREFIX = "KVREVIVER_"

VARIANTS = ("quantized", "sketch", "evict", "streaming")
ATTENTION_KERNELS = ("auto", "compiled", "triton")
QUANT_BITS = (2, 3, 4, 8)
RECORD_GROUPS = (16, 32, 64, 128)
# An absolute token budget smaller than this cannot hold sink + recent tokens.
MIN_BUDGET_TOKENS = 16


class KVReviverConfigError(ValueError):
    """A ``kvreviver`` configuration value is unknown, mistyped or out of range."""


@dataclass(frozen=True)
class KVReviverConfig:
    budget: float | int = 1.0
    """Exact + vague KV memory a request may hold: a fraction of its context in
    (0, 1], or a whole number of tokens >= MIN_BUDGET_TOKENS. 1.0 = no compression."""
    variant: str = "quantized"
    """Vague store: quantized (low-bit per token), sketch (Count Sketch),
    evict (no vague store, SnapKV-style) or streaming (sink + recent only)."""
    sink: int = 4
    """First tokens of every request always kept exact (attention sinks)."""
    recent: int = 32
    """Most recent tokens always kept exact (sliding window). The decode room
    keeps up to 32 newer tokens exact besides; 32 beat 48 and 64 at 10% budget
    and tied 16 in the accuracy benchmark (README)."""
    score_window: int = 32
    """Last query rows of each step whose attention scores the cached tokens
    (SnapKV's observation window). A decode step has one row, so every decode
    step scores."""
    pool_before: int = POOL_BEFORE
    """Ranking: each scored token lends its score to this many tokens before it
    (``policy.py`` says why the defaults are what they are)."""
    pool_after: int = POOL_AFTER
    """Ranking: each scored token lends its score to this many tokens after it."""
    pool_decay: float = POOL_DECAY
    """Ranking: the share of its score a token lends those neighbours, in [0, 1]
    (1: max pooling; 0: no pooling). 0.3 lowered the loss at 10% budget on four
    prompt seeds; part of the 10% setting (README), not the default."""
    bits: int = 4
    """Bit width of the quantized vague store's keys (and of its values where
    ``value_bits`` is 0)."""
    value_bits: int = 0
    """Bit width of the store's values (0: ``bits``). Attention weights average
    value errors while key errors move the weights themselves, so values may
    take fewer bits than keys for more tokens held at the same bytes."""
    record_group: int = 0
    """Channels sharing one float16 scale and min in the store's records (0:
    ``layout.record_group``: 32, or 16 where 32 does not divide the head size).
    Wider groups make records smaller (more tokens held), coarser where a head
    has outlier channels (``rotate`` spreads them)."""
    rotate: bool = False
    """Rotate every head's keys, values and queries by a fixed orthogonal matrix
    (``rotation.py``) where the quantized store holds records, so that outlier
    channels no longer coarsen the quantization of every other channel.
    Attention is unchanged by it up to float rounding. It is what makes 3-bit
    keys pay: with ``bits: 3, value_bits: 2`` the loss at 8k and 25% was +1.4%
    / +4.2% rotated, +7.5% / +8.9% not (4/4 bits: +12.5% / +19.6%, rotated
    +11.5% / +19.2%; benchmarks/README)."""
    candidates: bool = True
    """Keep the best-scored older tokens exact (the Candidate part) as the budget
    allows. False: only sink + recent stay exact and every other token goes to
    the vague store, i.e. uniform low-bit quantization at the budget's memory."""
    candidate_share: float = 0.0
    """Where the store cannot hold every token (the budget evicts some), the share
    of the slots past sink + recent that keep the best-scored tokens exact instead
    of holding store records. 0: every such slot holds records (the most tokens
    kept, none of them exact beyond sink + recent)."""
    low_bits: int = 0
    """Research (PyTorch only): a second, lower bit width for the store's
    lower-ranked records (0: one width)."""
    high_share: float = 0.5
    """With ``low_bits``: share of the store's records kept at ``bits``."""
    sketch_rows: int = 3
    """Rows (independent hashes) of the Count Sketch variant."""
    sketch_buckets: int = 64
    """Buckets per row of the Count Sketch variant."""
    attention_kernel: str = "auto"
    """Attention kernels: compiled (the C++/CUDA ops), triton (decode rows by
    flash-decoding, ``ops/triton_decode.py``, over exact slots and the quantized
    store; prompt chunks by FlashAttention over exact slots,
    ``ops/triton_prefill.py``), or auto: triton where the KV cache is on a GPU,
    compiled elsewhere."""

    def __post_init__(self) -> None:
        _check_budget(self.budget)
        if self.budget > 1:  # an absolute token count, whatever its JSON spelling
            object.__setattr__(self, "budget", int(self.budget))
        _check_choice("variant", self.variant, VARIANTS)
        _check_int("sink", self.sink, 0, 1024)
        _check_int("recent", self.recent, 1, 8192)
        _check_int("score_window", self.score_window, 1, 8192)
        _check_int("pool_before", self.pool_before, 0, 256)
        _check_int("pool_after", self.pool_after, 0, 256)
        _check_fraction("pool_decay", self.pool_decay)
        if isinstance(self.bits, bool) or self.bits not in QUANT_BITS:
            raise KVReviverConfigError(
                f"kvreviver.bits={self.bits!r} is not supported: allowed values are "
                f"{', '.join(map(str, QUANT_BITS))}"
            )
        if self.value_bits != 0 and (
            isinstance(self.value_bits, bool) or self.value_bits not in QUANT_BITS
        ):
            raise KVReviverConfigError(
                f"kvreviver.value_bits={self.value_bits!r} is not supported: allowed values are 0 "
                f"(same as bits) or {', '.join(map(str, QUANT_BITS))}"
            )
        if self.record_group != 0 and (
            isinstance(self.record_group, bool) or self.record_group not in RECORD_GROUPS
        ):
            raise KVReviverConfigError(
                f"kvreviver.record_group={self.record_group!r} is not supported: allowed values "
                f"are 0 (32, or 16 where 32 does not divide the head size) or "
                f"{', '.join(map(str, RECORD_GROUPS))} (dividing the head size)"
            )
        for key in ("rotate", "candidates"):
            if not isinstance(getattr(self, key), bool):
                raise KVReviverConfigError(
                    f"kvreviver.{key}={getattr(self, key)!r} is not a boolean: expected true or false"
                )
        _check_fraction("candidate_share", self.candidate_share)
        if self.low_bits != 0 and (
            isinstance(self.low_bits, bool) or self.low_bits not in QUANT_BITS
            or self.low_bits >= self.bits
        ):
            raise KVReviverConfigError(
                f"kvreviver.low_bits={self.low_bits!r} is not supported: allowed values are 0 "
                f"(off) or one of {', '.join(str(b) for b in QUANT_BITS if b < self.bits)} "
                f"(below bits={self.bits})"
            )
        if self.low_bits and self.value_bits:
            raise KVReviverConfigError(
                f"kvreviver.value_bits={self.value_bits!r} cannot be combined with "
                f"low_bits={self.low_bits!r}: the mixed-width store keeps keys and values "
                f"at one width per record (set value_bits to 0)"
            )
        if self.low_bits and self.record_group:
            raise KVReviverConfigError(
                f"kvreviver.record_group={self.record_group!r} cannot be combined with "
                f"low_bits={self.low_bits!r}: the mixed-width store keeps the default groups "
                f"(set record_group to 0)"
            )
        _check_fraction("high_share", self.high_share)
        _check_choice("attention_kernel", self.attention_kernel, ATTENTION_KERNELS)
        _check_int("sketch_rows", self.sketch_rows, 1, 16)
        _check_int("sketch_buckets", self.sketch_buckets, 1, 65536)

    # -- construction -------------------------------------------------------
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_sources(
        cls,
        additional_config: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> KVReviverConfig:
        """Merge the environment fallback with ``additional_config['kvreviver']``."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.field_names():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is not None and raw.strip() != "":
                values[name] = _parse_env_value(name, raw)

        section: Any = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY, {})
        if not isinstance(section, Mapping):
            raise KVReviverConfigError(
                f"additional_config.kvreviver must be a JSON object, got {section!r}"
            )
        unknown = sorted(set(section) - set(cls.field_names()))
        if unknown:
            raise KVReviverConfigError(
                f"unknown kvreviver config key(s) {', '.join(map(repr, unknown))}: "
                f"allowed keys are {', '.join(cls.field_names())}"
            )
        values.update(section)
        return cls(**values)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> KVReviverConfig:
        additional = getattr(vllm_config, "additional_config", None)
        return cls.from_sources(additional if isinstance(additional, Mapping) else {})

    # -- derived facts ------------------------------------------------------
    def uses_triton(self, device_type: str) -> bool:
        """Whether attention on ``device_type`` runs the Triton kernels."""
        if self.attention_kernel == "auto":
            return device_type == "cuda"
        return self.attention_kernel == "triton"

    @property
    def floor_tokens(self) -> int:
        """Fewest slots a compaction keeps: sink + recent are never dropped."""
        return self.sink + self.recent

    @property
    def ranks_by_score(self) -> bool:
        """Whether compaction keeps the best-scored tokens (every variant but
        ``streaming``, which keeps the newest)."""
        return self.variant != "streaming"

    def budget_tokens(self, context_len: int) -> int:
        """Token slots a request of ``context_len`` tokens keeps after a compaction."""
        return budget_tokens(self.budget, context_len, self.floor_tokens)

    def compresses(self, max_model_len: int) -> bool:
        """Whether any request up to ``max_model_len`` tokens would be compressed."""
        return self.budget_tokens(max_model_len) < max_model_len

    def rotates(self, max_model_len: int) -> bool:
        """Whether the backend rotates heads (``rotation.py``): only where the
        quantized store will hold records, the one place rotation pays."""
        return self.rotate and self.variant == "quantized" and self.compresses(max_model_len)


def budget_tokens(budget: float, num_tokens: int, floor_tokens: int) -> int:
    """Slots a request of ``num_tokens`` tokens keeps after a compaction: its
    budget (a fraction of its tokens, or a number of tokens), never below
    ``floor_tokens`` and never above ``num_tokens``."""
    kept = int(budget) if budget > 1 else math.ceil(budget * num_tokens)
    return min(num_tokens, max(kept, floor_tokens))


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise KVReviverConfigError(
            f"kvreviver.{key}={value!r} is not supported: allowed values are {', '.join(allowed)}"
        )


def _check_int(key: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise KVReviverConfigError(
            f"kvreviver.{key}={value!r} is out of range: expected an integer in [{lo}, {hi}]"
        )


def _check_fraction(key: str, value: Any) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not math.isfinite(value) or not 0 <= value <= 1):
        raise KVReviverConfigError(
            f"kvreviver.{key}={value!r} is out of range: expected a number in [0, 1]"
        )


def _check_budget(value: Any) -> None:
    allowed = (
        "expected a fraction of the context in (0, 1] or a whole number of tokens "
        f">= {MIN_BUDGET_TOKENS}"
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KVReviverConfigError(
            f"kvreviver.budget={value!r} is not a number: {allowed}"
        )
    if not math.isfinite(value) or value <= 0:
        raise KVReviverConfigError(f"kvreviver.budget={value!r} is out of range: {allowed}")
    if value > 1 and (not float(value).is_integer() or value < MIN_BUDGET_TOKENS):
        raise KVReviverConfigError(f"kvreviver.budget={value!r} is out of range: {allowed}")


def _parse_env_value(name: str, raw: str) -> Any:
    """Environment values are strings; give them the type their key expects."""
    raw = raw.strip()
    if name in ("variant", "attention_kernel"):
        return raw
    if name in ("rotate", "candidates"):
        if raw.lower() in ("1", "true", "yes"):
            return True
        if raw.lower() in ("0", "false", "no"):
            return False
        raise KVReviverConfigError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a boolean: expected true or false"
        )
    try:
        number = float(raw)
    except ValueError:
        raise KVReviverConfigError(
            f"{ENV_PREFIX}{name.upper()}={raw!r} is not a number"
        ) from None
    if name in ("budget", "candidate_share", "high_share", "pool_decay"):
        return number
    return int(number) if number.is_integer() else number
