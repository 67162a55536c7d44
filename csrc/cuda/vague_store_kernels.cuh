// CUDA kernels of the vague stores on raw pointers (no torch headers, as in
// attention_kernels.cuh): quantized-record insert and reconstruction, and the
// Count Sketch's signed add, estimate and bucket-space logit gather.
// Semantics: kvreviver_vllm/ops/reference.py (quantize_records, dequantize_records,
// count_sketch_add, count_sketch_estimate, count_sketch_logits).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace kvreviver::cuda {

// keys/values [n, d] float32 contiguous, positions int32 [n], scores float32
// [n] -> records uint8 [n, record_bytes], keys at `bits` bits, values at
// `value_bits` (resolved, not 0). group * bits must be whole bytes.
cudaError_t launch_quantize_records(const float* keys, const float* values,
                                    const int32_t* positions, const float* scores,
                                    uint8_t* records, int64_t n, int d, int bits, int value_bits,
                                    int group, cudaStream_t stream);

// records uint8 [n, record_bytes] -> keys/values float32 [n, d].
cudaError_t launch_dequantize_records(const uint8_t* records, float* keys, float* values,
                                      int64_t n, int d, int bits, int value_bits, int group,
                                      cudaStream_t stream);

// sums float32 [rows, buckets, d] += sign * x[n, d] at each position's bucket
// (atomically); coefficients int64 [rows, 4] on the device.
cudaError_t launch_count_sketch_add(float* bucket_keys, float* bucket_values, const float* keys,
                                    const float* values, const int64_t* positions,
                                    const int64_t* coefficients, int64_t n, int rows,
                                    int buckets, int d, cudaStream_t stream);

// out float32 [n, d] = mean over rows of sign * sums[row, bucket].
cudaError_t launch_count_sketch_estimate(const float* sums, const int64_t* positions,
                                         const int64_t* coefficients, float* out, int64_t n,
                                         int rows, int buckets, int d, cudaStream_t stream);

// out float32 [q, n] = mean over rows of sign * per_bucket[q, row, bucket]
// (per_bucket [q, rows * buckets]: the query's dot product with each bucket).
cudaError_t launch_count_sketch_gather(const float* per_bucket, const int64_t* positions,
                                       const int64_t* coefficients, float* out, int64_t q,
                                       int64_t n, int rows, int buckets, cudaStream_t stream);

}  // namespace kvreviver::cuda
