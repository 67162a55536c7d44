"""Teacher forcing through decode steps: a vLLM v1 logits processor.

The accuracy harness measures next-token loss and KL on positions that a
compressed cache serves. Prompt positions cannot show it (a request reads its
prompt exact), so the text's continuation is fed as *output*: each decode step
may only sample the next token of the text. vLLM reports logprobs from the raw
logits, before logits processors run (``logprobs_mode="raw_logprobs"``, the
default), so the returned logprob of each sampled token is the model's own
probability of the forced token, and the top logprobs are its unforced
next-token distribution.

Use: ``LLM(..., logits_processors=[ForcedTokensLogitsProcessor])`` and
:func:`teacher_forced` sampling params per request. Requests without the
``extra_args`` key are left alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

# Under the "vllm" logger so messages show in vLLM's own log output.
logger = init_logger(f"vllm.{__name__}")

FORCED_TOKENS_KEY = "kvreviver_forced_token_ids"


def teacher_forced(token_ids: Sequence[int], logprobs: int) -> SamplingParams:
    """Sampling params that make a request generate exactly ``token_ids``,
    returning ``logprobs`` top raw logprobs (plus the forced token's) per step."""
    return SamplingParams(
        temperature=0.0, max_tokens=len(token_ids), ignore_eos=True, logprobs=logprobs,
        detokenize=False, extra_args={FORCED_TOKENS_KEY: list(token_ids)},
    )


class ForcedTokensLogitsProcessor(LogitsProcessor):
    """Masks every logit but the next forced token of each forcing request."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        forced = (sampling_params.extra_args or {}).get(FORCED_TOKENS_KEY)
        if forced is None:
            return
        if not isinstance(forced, list) or not forced:
            raise VLLMValidationError(
                f"extra_args[{FORCED_TOKENS_KEY!r}]={forced!r}: expected a non-empty list of token ids",
                parameter="extra_args",
            )
        bad = [t for t in forced if isinstance(t, bool) or not isinstance(t, int) or t < 0]
        if bad:
            raise VLLMValidationError(
                f"extra_args[{FORCED_TOKENS_KEY!r}] holds {bad[0]!r}: token ids are integers >= 0",
                parameter="extra_args",
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.vocab_size = vllm_config.model_config.get_vocab_size()
        # Batch index -> (forced ids, the request's live output token list).
        self.forcing: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides what greedy sampling picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        def state(params: SamplingParams, _prompt, output_ids: list[int]):
            forced = (params.extra_args or {}).get(FORCED_TOKENS_KEY)
            if forced is None:
                return None
            out_of_vocab = [t for t in forced if t >= self.vocab_size]
            if out_of_vocab:
                # validate_params cannot see the vocabulary, and raising here would
                # stop the engine for every request: this one runs unforced.
                logger.error(
                    "extra_args[%r] holds %d, outside the vocabulary [0, %d): "
                    "the request is not teacher-forced", FORCED_TOKENS_KEY,
                    out_of_vocab[0], self.vocab_size,
                )
                return None
            return forced, output_ids

        process_dict_updates(self.forcing, batch_update, state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = [], []
        for index, (forced, output_ids) in self.forcing.items():
            step = len(output_ids)
            if step < len(forced):
                rows.append(index)
                tokens.append(forced[step])
        if rows:
            rows_t = torch.tensor(rows, device=logits.device)
            tokens_t = torch.tensor(tokens, device=logits.device)
            logits[rows_t] = float("-inf")
            logits[rows_t, tokens_t] = 0.0
        return logits
