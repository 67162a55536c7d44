"""Plugin registration: entry point, spawn-safe enum member, CPU selector, startup checks."""

from __future__ import annotations

import multiprocessing
import pickle
from importlib.metadata import entry_points

import pytest
import torch

from kvreviver_vllm import plugin


def _name_and_path_in_child(member):
    # Runs in a fresh spawned interpreter: unpickling `member` is what registers it.
    return member.name, member.get_path()


def test_entry_point_is_declared():
    eps = entry_points(group="vllm.general_plugins")
    assert any(ep.value == "kvreviver_vllm.plugin:register" for ep in eps)


def test_register_is_idempotent_and_member_survives_spawn():
    plugin.register()
    plugin.register()
    member = plugin.backend_member()
    assert member.name == "KVREVIVER"
    assert pickle.loads(pickle.dumps(member)) is member
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        name, path = pool.apply(_name_and_path_in_child, (member,))
    assert (name, path) == ("KVREVIVER", plugin.BACKEND_CLASS_PATH)


def test_cli_name_is_case_insensitive():
    from vllm.config.attention import AttentionConfig

    plugin.register()
    assert AttentionConfig.validate_backend_before("kvreviver") is plugin.backend_member()


def _selector_config(**overrides):
    from vllm.v1.attention.selector import AttentionSelectorConfig

    base = dict(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=128)
    return AttentionSelectorConfig(**{**base, **overrides})


def test_cpu_selector_honours_kvreviver_and_refuses_what_it_cannot_serve():
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    plugin.register()
    member = plugin.backend_member()
    assert CpuPlatform.get_attn_backend_cls(member, _selector_config()) == plugin.BACKEND_CLASS_PATH
    assert member.get_class().get_name() == "KVREVIVER"
    # Other selections keep vLLM's behaviour.
    assert CpuPlatform.get_attn_backend_cls(None, _selector_config()) == (
        AttentionBackendEnum.CPU_ATTN.get_path()
    )
    with pytest.raises(ValueError, match="sliding window not supported"):
        CpuPlatform.get_attn_backend_cls(member, _selector_config(has_sliding_window=True))
    with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
        CpuPlatform.get_attn_backend_cls(member, _selector_config(kv_cache_dtype="fp8"))
    with pytest.raises(ValueError, match="MLA not supported"):
        CpuPlatform.get_attn_backend_cls(member, _selector_config(use_mla=True))


def _engine_config(model_dir, additional=None, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(
        model=model_dir,
        attention_backend="kvreviver",
        max_model_len=4096,
        additional_config=additional or {},
        **kwargs,
    )
    return args.create_engine_config()


@pytest.mark.parametrize(
    "section, message",
    [
        ({"budget": 0}, "kvreviver.budget=0 is out of range"),
        ({"budget": 1.5}, "kvreviver.budget=1.5 is out of range"),
        ({"budget": -3}, "kvreviver.budget=-3 is out of range"),
        ({"budget": "half"}, "kvreviver.budget='half' is not a number"),
        ({"budget": 1.0, "window": 64}, "unknown kvreviver config key(s) 'window'"),
    ],
)
def test_bad_config_stops_engine_config(model_dir, section, message):
    # vLLM's pydantic config wraps the error (a ValueError) but keeps the message.
    with pytest.raises(ValueError) as err:
        _engine_config(model_dir, {"kvreviver": section})
    assert message in str(err.value)


def test_engine_config_refuses_what_compression_cannot_serve(model_dir):
    config = _engine_config(model_dir, {"kvreviver": {"budget": 1.0}})
    assert plugin.is_kvreviver_selected(config)
    with pytest.raises(ValueError, match=r"prefix caching \(add --no-enable-prefix-caching\)"):
        _engine_config(model_dir, {"kvreviver": {"budget": 0.1, "variant": "evict"}})
    config = _engine_config(
        model_dir, {"kvreviver": {"budget": 0.1, "variant": "evict"}}, enable_prefix_caching=False
    )
    assert plugin.is_kvreviver_selected(config)
    with pytest.raises(ValueError, match="--kv-cache-dtype fp8 is not supported"):
        _engine_config(model_dir, kv_cache_dtype="fp8")


def test_gpu_serving_captures_piecewise_cuda_graphs():
    """vLLM's default CUDA-graph mode, resolved against the support the builder
    declares, becomes piecewise graphs around attention: GPU serving needs no
    eager mode (and no full graph replays this backend's host plan)."""
    from vllm.config import CompilationConfig
    from vllm.config.compilation import CompilationMode, CUDAGraphMode

    from kvreviver_vllm.backend import KVReviverBackend

    builder = KVReviverBackend.get_builder_cls()
    support = builder.get_cudagraph_support(None, None)
    config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE,
                               cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE)
    config.set_splitting_ops_for_v1(all2all_backend="naive")
    resolved = config.resolve_cudagraph_mode_and_sizes(support, KVReviverBackend.get_name(),
                                                       max_num_reqs=16)
    assert resolved == CUDAGraphMode.PIECEWISE
