"""Config parsing: every bad value stops with the key, the value and the allowed range."""

from __future__ import annotations

import pytest
import torch

from kvreviver_vllm.config import KVReviverConfig, KVReviverConfigError


def parse(section: dict, environ: dict | None = None) -> KVReviverConfig:
    return KVReviverConfig.from_sources({"kvreviver": section}, environ or {})


@pytest.mark.parametrize(
    "budget, message",
    [
        (0, "kvreviver.budget=0 is out of range"),
        (1.5, "kvreviver.budget=1.5 is out of range"),
        (-3, "kvreviver.budget=-3 is out of range"),
        ("ten", "kvreviver.budget='ten' is not a number"),
        (True, "kvreviver.budget=True is not a number"),
        (8.0, "kvreviver.budget=8.0 is out of range"),
        (float("inf"), "kvreviver.budget=inf is out of range"),
    ],
)
def test_bad_budget_names_value_and_range(budget, message):
    with pytest.raises(KVReviverConfigError) as err:
        parse({"budget": budget})
    assert message in str(err.value)
    assert "(0, 1]" in str(err.value) and ">= 16" in str(err.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(KVReviverConfigError) as err:
        parse({"budget": 0.1, "bugdet": 0.2})
    assert "'bugdet'" in str(err.value)
    assert "allowed keys are budget, variant, sink, recent" in str(err.value)


@pytest.mark.parametrize(
    "section, message",
    [
        ({"variant": "h2o"}, "kvreviver.variant='h2o' is not supported"),
        ({"sink": -1}, "kvreviver.sink=-1 is out of range: expected an integer in [0, 1024]"),
        ({"recent": 0}, "kvreviver.recent=0 is out of range"),
        ({"recent": 2.5}, "kvreviver.recent=2.5 is out of range"),
        ({"bits": 5}, "kvreviver.bits=5 is not supported: allowed values are 2, 3, 4, 8"),
        ({"value_bits": 5}, "kvreviver.value_bits=5 is not supported: allowed values are 0 (same as bits) or 2, 3, 4, 8"),
        ({"value_bits": True}, "kvreviver.value_bits=True is not supported"),
        ({"pool_after": 300}, "kvreviver.pool_after=300 is out of range: expected an integer in [0, 256]"),
        ({"pool_before": -1}, "kvreviver.pool_before=-1 is out of range"),
        ({"pool_decay": 1.5}, "kvreviver.pool_decay=1.5 is out of range: expected a number in [0, 1]"),
        ({"value_bits": 2, "low_bits": 3}, "kvreviver.value_bits=2 cannot be combined with low_bits=3"),
        ({"record_group": 48}, "kvreviver.record_group=48 is not supported: allowed values are 0 "
                               "(32, or 16 where 32 does not divide the head size) or 16, 32, 64, 128"),
        ({"record_group": True}, "kvreviver.record_group=True is not supported"),
        ({"record_group": 64, "low_bits": 3}, "kvreviver.record_group=64 cannot be combined with low_bits=3"),
        ({"sketch_rows": 0}, "kvreviver.sketch_rows=0 is out of range"),
        ({"sketch_buckets": 10**6}, "kvreviver.sketch_buckets=1000000 is out of range"),
        ({"attention_kernel": "cuda"}, "kvreviver.attention_kernel='cuda' is not supported: allowed "
                                    "values are auto, compiled, triton"),
        ({"score_window": 0}, "kvreviver.score_window=0 is out of range: expected an integer in [1, 8192]"),
        ({"candidates": "no"}, "kvreviver.candidates='no' is not a boolean"),
        ({"rotate": 1}, "kvreviver.rotate=1 is not a boolean: expected true or false"),
        ({"candidate_share": 1.5}, "kvreviver.candidate_share=1.5 is out of range: expected a number in [0, 1]"),
        ({"candidate_share": True}, "kvreviver.candidate_share=True is out of range"),
        ({"low_bits": 4}, "kvreviver.low_bits=4 is not supported: allowed values are 0 (off) or one of 2, 3 (below bits=4)"),
        ({"low_bits": 1}, "kvreviver.low_bits=1 is not supported"),
        ({"high_share": -0.1}, "kvreviver.high_share=-0.1 is out of range: expected a number in [0, 1]"),
    ],
)
def test_other_bad_values(section, message):
    with pytest.raises(KVReviverConfigError, match=None) as err:
        parse(section)
    assert message in str(err.value)


def test_record_group_reaches_the_store_and_must_divide_the_head_size():
    from kvreviver_vllm.layout import record_bytes
    from kvreviver_vllm.stores import make_store

    store = make_store(parse({"bits": 3, "value_bits": 2, "record_group": 64}), 64, 256,
                       torch.float32)
    assert store.group == 64 and store.record_bytes == record_bytes(64, 3, 64, 2) == 56
    assert make_store(parse({}), 64, 256, torch.float32).record_bytes == record_bytes(64, 4, 32) == 88
    with pytest.raises(KVReviverConfigError) as err:
        make_store(parse({"record_group": 128}), 64, 256, torch.float32)
    assert ("kvreviver.record_group=128 does not divide the model's head size 64: allowed values "
            "are 0 or 16, 32, 64") in str(err.value)


def test_ranking_pool_reaches_the_store():
    from kvreviver_vllm.stores import make_store

    store = make_store(parse({"pool_before": 1, "pool_after": 8, "pool_decay": 0.3}), 64, 256,
                       torch.float32)
    assert (store.pool_before, store.pool_after, store.pool_decay) == (1, 8, 0.3)
    assert make_store(parse({}), 64, 256, torch.float32).pool_decay == 1.0
    assert parse({}, {"KVREVIVER_POOL_DECAY": "0.3"}).pool_decay == 0.3


def test_section_must_be_an_object():
    with pytest.raises(KVReviverConfigError, match="must be a JSON object"):
        KVReviverConfig.from_sources({"kvreviver": 0.1}, {})


def test_budget_fraction_and_tokens():
    assert parse({"budget": 0.1}).budget_tokens(2048) == 205
    assert parse({"budget": 1}).budget_tokens(2048) == 2048
    tokens = parse({"budget": 512.0})
    assert tokens.budget == 512 and isinstance(tokens.budget, int)
    assert tokens.budget_tokens(2048) == 512 and tokens.budget_tokens(300) == 300
    assert not parse({}).compresses(8192)
    assert parse({"budget": 0.25}).compresses(8192)
    assert not parse({"budget": 8192}).compresses(8192)


def test_environment_fallback_and_precedence():
    env = {"KVREVIVER_BUDGET": "0.25", "KVREVIVER_SINK": "8", "KVREVIVER_VARIANT": "evict"}
    cfg = KVReviverConfig.from_sources({}, env)
    assert (cfg.budget, cfg.sink, cfg.variant) == (0.25, 8, "evict")
    # additional_config wins over the environment.
    cfg = KVReviverConfig.from_sources({"kvreviver": {"sink": 2}}, env)
    assert (cfg.budget, cfg.sink) == (0.25, 2)
    assert KVReviverConfig.from_sources({}, {"KVREVIVER_CANDIDATES": "false"}).candidates is False
    with pytest.raises(KVReviverConfigError, match="KVREVIVER_CANDIDATES='maybe' is not a boolean"):
        KVReviverConfig.from_sources({}, {"KVREVIVER_CANDIDATES": "maybe"})
    with pytest.raises(KVReviverConfigError, match="KVREVIVER_RECENT='many' is not a number"):
        KVReviverConfig.from_sources({}, {"KVREVIVER_RECENT": "many"})
    with pytest.raises(KVReviverConfigError, match="kvreviver.budget=0.0 is out of range"):
        KVReviverConfig.from_sources({}, {"KVREVIVER_BUDGET": "0"})


def test_attention_kernel_auto_is_triton_on_the_gpu_only():
    auto = KVReviverConfig()
    assert auto.uses_triton("cuda") and not auto.uses_triton("cpu")
    assert KVReviverConfig(attention_kernel="triton").uses_triton("cpu")
    assert not KVReviverConfig(attention_kernel="compiled").uses_triton("cuda")
    assert KVReviverConfig.from_sources({}, {"KVREVIVER_ATTENTION_KERNEL": "triton"}).attention_kernel == "triton"


@pytest.mark.parametrize("key, value", [
    ("variant", "__import__('os').system('touch {marker}')"),
    ("variant", "{marker}"),
    ("attention_kernel", "kvreviver_vllm.backend:{marker}"),
    ("budget", "__import__('os').system('touch {marker}') or 0.1"),
    ("candidates", "exec('open(\"{marker}\", \"w\")')"),
    ("sink", "open('{marker}').read()"),
])
def test_hostile_values_are_refused_never_run_or_read(tmp_path, key, value):
    """``--additional-config`` and ``KVREVIVER_*`` are data: a value that names code
    or a file is refused like any bad value (the text of the refusal names it), and
    nothing is run, imported or opened."""
    marker = tmp_path / "touched"
    value = value.format(marker=marker)
    for sources in (({"kvreviver": {key: value}}, {}),
                    ({}, {f"KVREVIVER_{key.upper()}": value})):
        with pytest.raises(KVReviverConfigError) as err:
            KVReviverConfig.from_sources(*sources)
        assert repr(value) in str(err.value) or value in str(err.value)
    assert not marker.exists()
