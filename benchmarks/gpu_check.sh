#!/usr/bin/env bash
# On a CUDA machine with torch (CUDA build), nvcc and Triton, no vLLM, no network:
# build the ops (CPU + CUDA) in place, check the CUDA ops against the PyTorch
# reference and time attention (the CUDA C++ decode kernels, then the Triton
# kernels the backend runs on a GPU: decode over exact slots and the quantized
# store at 25%/10%, prompt chunks), each against SDPA over dense K/V of the
# same tokens; gpu_decode.json says which of issue 19's decode targets are met.
# Reports: $OUT/gpu_check.json and $OUT/gpu_decode.json (default benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
python setup.py -q build_ext --inplace
python benchmarks/gpu_check.py --out "$OUT"
python benchmarks/gpu_decode.py --out "$OUT"
