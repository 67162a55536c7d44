#!/usr/bin/env bash
# Set up (scripts/install.sh), then run the whole test suite. Extra arguments go
# to pytest, e.g. `-m "not engine"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m pytest -v "$@"
