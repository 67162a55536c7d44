// CUDA kernels of compaction on raw pointers (no torch headers, as in
// attention_kernels.cuh): whole-slot gathers and scatters of one request's
// slots, per KV head. The ranking between them runs as ATen ops on the GPU
// (compaction_cuda.cpp). Semantics: kvreviver_vllm/ops/reference.py (compact_slots,
// compact_quantized).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvreviver::cuda {

// Paged cache of one layer, addressed in 4-byte words: [num_blocks,
// num_kv_heads, block_size, slot_words]; one request's block row.
struct SlotSpace {
  uint32_t* cache;
  const int64_t* blocks;
  int num_kv_heads, block_size, slot_words;
};

// out [heads, n, slot_words] = the request's slots; slot i of head h is
// indices[h * n + i], or first + i where indices is null.
cudaError_t launch_gather_slots(SlotSpace space, const int64_t* indices, int64_t first,
                                int64_t n, uint32_t* out, cudaStream_t stream);

// The request's slots [first, first + n) of every head = src [heads, n,
// slot_words]; with reset_scores, each slot's score word (its last) is zeroed.
cudaError_t launch_scatter_slots(SlotSpace space, int64_t first, int64_t n, const uint32_t* src,
                                 bool reset_scores, cudaStream_t stream);

}  // namespace kvreviver::cuda
