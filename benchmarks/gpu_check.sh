#!/usr/bin/env bash
# On a CUDA machine with torch (CUDA build) and nvcc, no vLLM, no network:
# build the ops (CPU + CUDA) in place, check the CUDA ops against the PyTorch
# reference and time decode attention. Report: $OUT/gpu_check.json (default
# benchmarks/results). Not yet run on a GPU: no GPU was lent to this project so far.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python setup.py -q build_ext --inplace
python benchmarks/gpu_check.py --out "$OUT"
