#!/usr/bin/env bash
# On a CUDA machine with torch (CUDA build), nvcc and Triton, no vLLM, no network:
# build the ops (CPU + CUDA) in place, check the CUDA ops against the PyTorch
# reference and time decode attention (the CUDA C++ kernels, then the Triton
# flash-decoding kernel), each against SDPA over dense K/V of the same tokens.
# Reports: $OUT/gpu_check.json and $OUT/gpu_decode.json (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python setup.py -q build_ext --inplace
python benchmarks/gpu_check.py --out "$OUT"
python benchmarks/gpu_decode.py --out "$OUT"
