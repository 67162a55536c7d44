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
# Two pytest workers where there are two cores, each with every process it starts on
# its own core (tests/cores.py): the engine tests, most of the time, run two at a
# time. A test file stays on one worker, so its module-scoped engine runs are shared;
# files go out in collection order, the engine-heavy benchmarks and engine tests first.
workers=$(.venv/bin/python -c "import os; print(min(2, len(os.sched_getaffinity(0))))")
exec .venv/bin/python -m pytest -v --durations=10 -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
