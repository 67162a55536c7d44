#!/usr/bin/env bash
# Set up (scripts/install.sh), then run the whole test suite. Extra arguments go
# to pytest, e.g. `-m "not engine"` for the quick subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# bf16 runs far slower on x86 hosts without AVX-512, where the engine tests run float32
# (README: Quick start); say which this is.
.venv/bin/python -c "import torch; from kvreviver_vllm.host import fast_dtype; \
print('torch CPU capability:', torch.backends.cpu.get_cpu_capability(), '-> engine dtype', fast_dtype())"
exec .venv/bin/python -m pytest -v --durations=10 "$@"
