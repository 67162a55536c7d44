// See vague_store_kernels.cuh.

#include "vague_store_kernels.cuh"

#include <cuda_fp16.h>

#include "../common/quantize_group.h"
#include "../common/record_layout.h"
#include "../common/sketch_hash.h"
#include "launch.cuh"

namespace kvreviver::cuda {
namespace {

__device__ __forceinline__ float load_half(const uint8_t* p) {
  return half_bits_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8)));
}

// One thread per (token, K or V, group): its codes fill whole bytes, so no
// two threads write the same byte.
__global__ void quantize_records_kernel(const float* __restrict__ keys,
                                        const float* __restrict__ values,
                                        const int32_t* __restrict__ positions,
                                        const float* __restrict__ scores,
                                        uint8_t* __restrict__ records, int64_t n, int d,
                                        int key_bits, int value_bits, int group) {
  const int groups = d / group;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * 2 * groups) return;
  const int64_t token = item / (2 * groups);
  const int which = static_cast<int>(item / groups % 2);  // 0: key, 1: value
  const int g = static_cast<int>(item % groups);
  const float* x = (which ? values : keys) + token * d + g * group;
  const RecordLayout layout{key_bits, group, value_bits};  // value_bits resolved: never 0 here
  const int64_t rb = layout.record_bytes(d);
  uint8_t* rec = records + token * rb;
  const int bits = which ? value_bits : key_bits;
  // The arithmetic (and its rounding rule, reference.py quantize_groups) is
  // quantize_group, the function the CPU kernels run and the CPU tests check
  // byte for byte against the reference.
  uint8_t* params = rec + layout.params_offset(d) + which * 4 * groups;
  quantize_group(x, group, bits, rec + which * layout.key_code_bytes(d) + g * group * bits / 8,
                 params + 2 * g, params + 2 * (groups + g));
  if (which == 0 && g == 0) {
    uint8_t* meta = rec + rb - 8;
    const int32_t pos = positions[token];
    const float score = scores[token];
    memcpy(meta, &pos, 4);
    memcpy(meta + 4, &score, 4);
  }
}

// One thread per (token, K or V, channel).
__global__ void dequantize_records_kernel(const uint8_t* __restrict__ records,
                                          float* __restrict__ keys, float* __restrict__ values,
                                          int64_t n, int d, int key_bits, int value_bits,
                                          int group) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * 2 * d) return;
  const int64_t token = item / (2 * d);
  const int which = static_cast<int>(item / d % 2);
  const int c = static_cast<int>(item % d);
  const int bits = which ? value_bits : key_bits;
  const RecordLayout layout{key_bits, group, value_bits};
  const int groups = d / group;
  const uint8_t* rec = records + token * layout.record_bytes(d);
  const uint8_t* codes = rec + which * layout.key_code_bytes(d);
  const uint8_t* params = rec + layout.params_offset(d) + which * 4 * groups;
  const int bit = c * bits;
  uint32_t word = codes[bit >> 3];
  if ((bit & 7) + bits > 8) word |= static_cast<uint32_t>(codes[(bit >> 3) + 1]) << 8;
  const float q = static_cast<float>((word >> (bit & 7)) & ((1u << bits) - 1));
  const int g = c / group;
  (which ? values : keys)[token * d + c] =
      q * load_half(params + 2 * g) + load_half(params + 2 * (groups + g));
}

// sketch_bucket, sketch_sign: ../common/sketch_hash.h, shared with the CPU kernels.

// One thread per (token, row, channel), for keys and values.
__global__ void count_sketch_add_kernel(float* __restrict__ bucket_keys,
                                        float* __restrict__ bucket_values,
                                        const float* __restrict__ keys,
                                        const float* __restrict__ values,
                                        const int64_t* __restrict__ positions,
                                        const int64_t* __restrict__ coefficients, int64_t n,
                                        int rows, int buckets, int d) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * rows * d) return;
  const int64_t token = item / (rows * d);
  const int r = static_cast<int>(item / d % rows);
  const int c = static_cast<int>(item % d);
  const int64_t* coef = coefficients + 4 * r;
  const int64_t p = positions[token];
  const int64_t at = (r * static_cast<int64_t>(buckets) + sketch_bucket(coef, p, buckets)) * d + c;
  const float s = sketch_sign(coef, p);
  atomicAdd(bucket_keys + at, s * keys[token * d + c]);
  atomicAdd(bucket_values + at, s * values[token * d + c]);
}

// One thread per (token, channel).
__global__ void count_sketch_estimate_kernel(const float* __restrict__ sums,
                                             const int64_t* __restrict__ positions,
                                             const int64_t* __restrict__ coefficients,
                                             float* __restrict__ out, int64_t n, int rows,
                                             int buckets, int d) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= n * d) return;
  const int64_t token = item / d;
  const int c = static_cast<int>(item % d);
  const int64_t p = positions[token];
  float acc = 0.f;
  for (int r = 0; r < rows; ++r) {
    const int64_t* coef = coefficients + 4 * r;
    acc += sketch_sign(coef, p) *
           sums[(r * static_cast<int64_t>(buckets) + sketch_bucket(coef, p, buckets)) * d + c];
  }
  out[item] = acc / static_cast<float>(rows);
}

// One thread per (query, token).
__global__ void count_sketch_gather_kernel(const float* __restrict__ per_bucket,
                                           const int64_t* __restrict__ positions,
                                           const int64_t* __restrict__ coefficients,
                                           float* __restrict__ out, int64_t q, int64_t n,
                                           int rows, int buckets) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= q * n) return;
  const int64_t qi = item / n, token = item % n;
  const int64_t p = positions[token];
  const float* row = per_bucket + qi * rows * static_cast<int64_t>(buckets);
  float acc = 0.f;
  for (int r = 0; r < rows; ++r) {
    const int64_t* coef = coefficients + 4 * r;
    acc += sketch_sign(coef, p) * row[r * static_cast<int64_t>(buckets) + sketch_bucket(coef, p, buckets)];
  }
  out[item] = acc / static_cast<float>(rows);
}

}  // namespace

cudaError_t launch_quantize_records(const float* keys, const float* values,
                                    const int32_t* positions, const float* scores,
                                    uint8_t* records, int64_t n, int d, int bits, int value_bits,
                                    int group, cudaStream_t stream) {
  return launch_per_item(quantize_records_kernel, n * 2 * (d / group), stream, keys, values,
                         positions, scores, records, n, d, bits, value_bits, group);
}

cudaError_t launch_dequantize_records(const uint8_t* records, float* keys, float* values,
                                      int64_t n, int d, int bits, int value_bits, int group,
                                      cudaStream_t stream) {
  return launch_per_item(dequantize_records_kernel, n * 2 * d, stream, records, keys, values, n, d,
                         bits, value_bits, group);
}

cudaError_t launch_count_sketch_add(float* bucket_keys, float* bucket_values, const float* keys,
                                    const float* values, const int64_t* positions,
                                    const int64_t* coefficients, int64_t n, int rows,
                                    int buckets, int d, cudaStream_t stream) {
  return launch_per_item(count_sketch_add_kernel, n * rows * d, stream, bucket_keys, bucket_values,
                         keys, values, positions, coefficients, n, rows, buckets, d);
}

cudaError_t launch_count_sketch_estimate(const float* sums, const int64_t* positions,
                                         const int64_t* coefficients, float* out, int64_t n,
                                         int rows, int buckets, int d, cudaStream_t stream) {
  return launch_per_item(count_sketch_estimate_kernel, n * d, stream, sums, positions,
                         coefficients, out, n, rows, buckets, d);
}

cudaError_t launch_count_sketch_gather(const float* per_bucket, const int64_t* positions,
                                       const int64_t* coefficients, float* out, int64_t q,
                                       int64_t n, int rows, int buckets, cudaStream_t stream) {
  return launch_per_item(count_sketch_gather_kernel, q * n, stream, per_bucket, positions,
                         coefficients, out, q, n, rows, buckets);
}

}  // namespace kvreviver::cuda
