"""Teacher forcing through decode steps (``harness.teacher_forcing``) in real vLLM.

The accuracy harness's loss and KL rest on two facts checked here: a forced request
generates exactly the given tokens, and the logprob vLLM returns for each is the
model's own probability of it, i.e. what the same tokens score when read as a prompt.
"""

from __future__ import annotations

import os

import pytest

from harness.offline import open_engine
from harness.tasks import TaskGenerator
from harness.teacher_forcing import (
    FORCED_TOKENS_KEY,
    ForcedTokensLogitsProcessor,
    teacher_forced,
)

CONTEXT = 512


def test_bad_forced_tokens_are_refused_with_the_value():
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    for bad, match in (([], "non-empty list"), ([5, -1], "holds -1"), ("12", "'12'"),
                       ([3, 2.5], "holds 2.5")):
        params = SamplingParams(extra_args={FORCED_TOKENS_KEY: bad})
        with pytest.raises(VLLMValidationError, match=match):
            ForcedTokensLogitsProcessor.validate_params(params)
    ForcedTokensLogitsProcessor.validate_params(SamplingParams())  # not forcing: fine
    ForcedTokensLogitsProcessor.validate_params(teacher_forced([1, 2], logprobs=5))


@pytest.fixture(scope="module")
def llm(model_dir):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    # float32: prompt and decode paths agree to ~1e-4 nats, so a mismatch is a real one.
    with open_engine(model=model_dir, dtype="float32", max_model_len=2048, enforce_eager=True,
                     seed=0, logits_processors=[ForcedTokensLogitsProcessor]) as engine:
        yield engine


@pytest.mark.engine
def test_forced_tokens_are_generated_with_the_models_own_logprobs(llm, tokenizer):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sample = TaskGenerator(tokenizer).samples("loss", CONTEXT, 1, seed=0)[0]
    prompt, forced = sample.prompt_ids, list(sample.forced_ids)
    free = SamplingParams(temperature=0.0, max_tokens=len(forced), ignore_eos=True, logprobs=1)
    whole = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=prompt)] * 2 + [TokensPrompt(prompt_token_ids=prompt + forced)],
        [teacher_forced(forced, logprobs=5), free, whole],
    )
    got = outs[0].outputs[0]
    assert list(got.token_ids) == forced
    # Each forced token's logprob is what it scores as part of the prompt.
    as_prompt = [step[tok].logprob for tok, step in
                 zip(forced, outs[2].prompt_logprobs[len(prompt):], strict=True)]
    as_forced = [step[tok].logprob for tok, step in zip(forced, got.logprobs, strict=True)]
    assert max(abs(a - b) for a, b in zip(as_prompt, as_forced)) < 1e-2
    # The top logprobs are the unforced distribution: 5 of them (+ the forced token)...
    assert all(5 <= len(step) <= 6 for step in got.logprobs)
    # ... whose first argmax is what a free request in the same batch picks, and that
    # request is left alone: it generates its own continuation, not the text's.
    first = got.logprobs[0]
    assert outs[1].outputs[0].token_ids[0] == max(first, key=lambda t: first[t].logprob)
    assert list(outs[1].outputs[0].token_ids) != forced


@pytest.mark.engine
def test_a_bad_forced_request_fails_alone(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.inputs import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=list(range(100, 140)))
    bad = SamplingParams(max_tokens=2, extra_args={FORCED_TOKENS_KEY: [7, -3]})
    with pytest.raises(VLLMValidationError, match="holds -3"):
        llm.generate([prompt], bad)
    out = llm.generate([prompt], teacher_forced([7, 8, 9], logprobs=1))[0]
    assert list(out.outputs[0].token_ids) == [7, 8, 9]
