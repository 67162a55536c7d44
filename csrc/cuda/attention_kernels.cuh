// CUDA kernels of the exact part of KVReviver attention, on raw pointers.
//
// No torch headers here: the CPU torch wheel cannot compile c10/cuda, and the
// CuPy check on the GPU machine loads these kernels without torch. The torch
// binding (attention_cuda.cpp) passes pointers, sizes and the current stream.
// Semantics: kvreviver_vllm/ops/reference.py (write_kv, paged_attention,
// paged_attention_quantized).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvreviver::cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A request's quantized vague store (kvreviver_vllm/stores/quantized.py): the
// first exact_start[r] slots of each KV head hold fixed-size records back to
// back, [K codes | V codes | K scale, K min, V scale, V min (fp16 per group) |
// position int32 | score float32], key codes little-endian at `bits` bits,
// value codes at `value_bits`.
struct QuantizedStoreArgs {
  const int32_t* exact_start = nullptr;   // [num_reqs] int32; null: no store
  const int32_t* vague_tokens = nullptr;  // [num_reqs] int32
  int bits = 0;
  int group = 0;
  int value_bits = 0;  // the binding passes it resolved (never 0 with a store)
};

// kv_cache [num_blocks, num_kv_heads, block_size, slot_width]: per slot K (D),
// V (D), then int32 position and float32 score. key/value [num_tokens,
// num_kv_heads, head_size] contiguous; slots < 0 are skipped.
cudaError_t launch_write_kv(DType dtype, void* kv_cache, const void* key,
                            const void* value, const int64_t* slot_mapping,
                            const int64_t* positions, int64_t num_tokens,
                            int64_t num_kv_heads, int64_t head_size,
                            int64_t block_size, int64_t slot_width,
                            cudaStream_t stream);

// out/query [num_tokens, num_q_heads, head_size] with the given token and head
// strides (elements); block_table [num_reqs, table_width] int32; seq_lens
// [num_reqs] int32; query_start_loc [num_reqs + 1] int32. head_size must be a
// multiple of 32 and at most 256. Each of the last score_window query rows of a
// request adds the attention probability each slot received to its score
// (atomically); 0 scores nothing.
cudaError_t launch_paged_attention(
    DType dtype, void* out, const void* query, void* kv_cache,
    const int32_t* block_table, const int32_t* seq_lens,
    const int32_t* query_start_loc, int64_t num_tokens, int64_t num_reqs,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t head_size,
    int64_t block_size, int64_t slot_width, int64_t table_width,
    int64_t q_token_stride, int64_t q_head_stride, int64_t out_token_stride,
    int64_t out_head_stride, float scale, int64_t score_window,
    QuantizedStoreArgs store, cudaStream_t stream);

}  // namespace kvreviver::cuda
