"""vLLM general plugin: makes ``--attention-backend kvreviver`` work.

vLLM calls :func:`register` once in every process (API server, engine core,
workers). It must stay idempotent and cheap: nothing here imports the backend,
the kernels or torch-heavy modules; the worker imports those when it resolves
the backend class.

Three things are needed beyond ``register_backend``:
  * the new enum member must survive ``spawn`` pickling (vLLM on CPU always
    spawns, and the config holding the member is unpickled before the child
    loads plugins);
  * vLLM's CPU selector returns CPU_ATTN whatever was asked for;
  * ``additional_config['kvreviver']`` must be validated before the engine starts.
"""

from __future__ import annotations

import functools

from vllm.logger import init_logger

# Under the "vllm" logger so messages show in vLLM's own log output.
logger = init_logger(f"vllm.{__name__}")

BACKEND_NAME = "KVREVIVER"
BACKEND_CLASS_PATH = "kvreviver_vllm.backend.KVReviverBackend"


def backend_member():
    """The ``AttentionBackendEnum.KVREVIVER`` member, registered on first use.

    Also the unpickle hook of that member: a spawned process that unpickles a
    config naming KVREVIVER calls this before vLLM has loaded any plugin.
    """
    from vllm.v1.attention.backends.registry import (
        AttentionBackendEnum,
        register_backend,
    )

    if BACKEND_NAME not in AttentionBackendEnum.__members__:
        register_backend(BACKEND_NAME, BACKEND_CLASS_PATH)
        member = AttentionBackendEnum[BACKEND_NAME]
        # Pickle looks __reduce_ex__ up on the instance: pickle by name via this hook.
        member.__reduce_ex__ = lambda protocol: (backend_member, ())
    return AttentionBackendEnum[BACKEND_NAME]


def is_kvreviver_selected(vllm_config) -> bool:
    attention_config = getattr(vllm_config, "attention_config", None)
    if attention_config is None:
        return False
    chosen = [attention_config.backend, *(attention_config.backend_per_kind or {}).values()]
    return any(b is not None and b.name == BACKEND_NAME for b in chosen)


def validate_engine_config(vllm_config) -> None:
    """Refuse, before the engine starts, what the backend cannot serve correctly."""
    from kvreviver_vllm.config import KVReviverConfig, KVReviverConfigError

    config = KVReviverConfig.from_vllm_config(vllm_config)
    if config.compresses(vllm_config.model_config.max_model_len):
        conflicts = {
            "prefix caching (add --no-enable-prefix-caching)":
                vllm_config.cache_config.enable_prefix_caching,
            "speculative decoding (drop --speculative-config)":
                vllm_config.speculative_config is not None,
            "KV transfer (drop --kv-transfer-config)":
                vllm_config.kv_transfer_config is not None,
        }
        bad = [name for name, present in conflicts.items() if present]
        if bad:
            raise KVReviverConfigError(
                f"kvreviver.budget={config.budget!r} compresses the KV cache, which "
                f"cannot be combined with {'; '.join(bad)}"
            )
    cache_dtype = vllm_config.cache_config.cache_dtype
    if cache_dtype not in ("auto", "float16", "bfloat16"):
        raise KVReviverConfigError(
            f"--kv-cache-dtype {cache_dtype} is not supported by the {BACKEND_NAME} "
            "backend: drop --kv-cache-dtype (or use auto, float16, bfloat16)"
        )
    logger.info("KVReviver attention backend selected: %s", config)


def _patch_config_check(platform_cls) -> None:
    """Run :func:`validate_engine_config` inside the platform's config check,
    which every ``VllmConfig`` passes through in the front-end process."""
    if getattr(platform_cls, "_kvreviver_config_check", False):
        return
    original = platform_cls.check_and_update_config.__func__

    @functools.wraps(original)
    def check_and_update_config(cls, vllm_config) -> None:
        if is_kvreviver_selected(vllm_config):
            validate_engine_config(vllm_config)
        original(cls, vllm_config)

    platform_cls.check_and_update_config = classmethod(check_and_update_config)
    platform_cls._kvreviver_config_check = True


def _patch_cpu_selector() -> None:
    """Let vLLM's CPU selector honour KVREVIVER (it otherwise forces CPU_ATTN)."""
    from vllm.platforms.cpu import CpuPlatform

    if getattr(CpuPlatform, "_kvreviver_selector", False):
        return
    original = CpuPlatform.get_attn_backend_cls.__func__

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        if selected_backend is None or selected_backend.name != BACKEND_NAME:
            return original(cls, selected_backend, attn_selector_config, num_heads)
        backend_cls = selected_backend.get_class()
        reasons = backend_cls.validate_configuration(
            device_capability=None, **attn_selector_config._asdict()
        )
        if reasons:
            raise ValueError(
                f"The {BACKEND_NAME} attention backend cannot serve this model on CPU: "
                f"{'; '.join(reasons)}. Serve it without --attention-backend kvreviver."
            )
        return selected_backend.get_path()

    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)
    CpuPlatform._kvreviver_selector = True


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    from vllm.platforms import current_platform

    from kvreviver_vllm.schedule import register_kv_cache_spec

    backend_member()
    register_kv_cache_spec()
    if current_platform.is_cpu():
        _patch_cpu_selector()
    _patch_config_check(type(current_platform))
