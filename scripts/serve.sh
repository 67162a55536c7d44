#!/usr/bin/env bash
# Set up (scripts/install.sh), then serve the default model with the KVReviver
# backend on 127.0.0.1:8000. Extra arguments go to `vllm serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/kvreviver serve "$@"
