// Argument checks shared by the CPU ops and the CUDA bindings, so that both
// refuse the same inputs with the same messages (value and allowed range).
#pragma once

#include <torch/torch.h>

#include <cstdint>

#include "quantized_records.h"

namespace kvreviver {

constexpr int64_t kSketchPrime = 2147483647;  // 2**31 - 1: sketch hash modulus

// Bit width and channel group of a quantized store.
inline void check_store_layout(int64_t head_size, int64_t bits, int64_t group) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "bits=", bits, " is not supported: allowed values are 2, 3, 4, 8");
  TORCH_CHECK(group > 0 && head_size % group == 0 && (group * bits) % 8 == 0,
              "group=", group, " must divide the head size ", head_size,
              " into whole bytes of codes");
}

// Tokens to quantize: keys/values [N, D], one position and score each.
inline void check_record_inputs(const torch::Tensor& keys, const torch::Tensor& values,
                                const torch::Tensor& positions, const torch::Tensor& scores,
                                int64_t bits, int64_t group) {
  TORCH_CHECK(keys.dim() == 2 && keys.sizes() == values.sizes(),
              "keys and values must both be [N, head_size]");
  check_store_layout(keys.size(1), bits, group);
  TORCH_CHECK(positions.numel() == keys.size(0) && scores.numel() == keys.size(0),
              "one position and score per token");
}

// Records uint8 [N, record_bytes] of the given layout.
inline void check_records(const torch::Tensor& records, int64_t head_size, int64_t bits,
                          int64_t group) {
  check_store_layout(head_size, bits, group);
  const int64_t rb = RecordLayout{bits, group}.record_bytes(head_size);
  TORCH_CHECK(records.scalar_type() == torch::kUInt8 && records.dim() == 2 &&
                  records.size(1) == rb,
              "records must be uint8 [N, ", rb, "] for head size ", head_size, ", bits=", bits,
              ", group=", group);
}

// Count Sketch sums: float32 [rows, buckets, D], contiguous.
inline void check_buckets(const torch::Tensor& buckets, const char* name) {
  TORCH_CHECK(buckets.scalar_type() == torch::kFloat32 && buckets.is_contiguous() &&
                  buckets.dim() == 3,
              name, " must be a contiguous float32 [rows, buckets, D]");
}

// In-place sketch add: two matching sums and keys/values [N, D].
inline void check_sketch_add(const torch::Tensor& bucket_keys, const torch::Tensor& bucket_values,
                             const torch::Tensor& keys, const torch::Tensor& values) {
  check_buckets(bucket_keys, "bucket_keys");
  check_buckets(bucket_values, "bucket_values");
  TORCH_CHECK(bucket_keys.sizes() == bucket_values.sizes(), "bucket sums must match in shape");
  const int64_t d = bucket_keys.size(2);
  TORCH_CHECK(keys.dim() == 2 && keys.sizes() == values.sizes() && keys.size(1) == d,
              "keys and values must both be [N, ", d, "]");
}

// Token positions as contiguous int64 on `device`, each in [0, 2**31 - 1).
inline torch::Tensor sketch_positions(const torch::Tensor& positions, int64_t n,
                                      const torch::Device& device) {
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == n, "positions must be [", n, "]");
  auto p = positions.to(device, torch::kInt64).contiguous();
  if (n > 0)
    TORCH_CHECK(p.min().item<int64_t>() >= 0 && p.max().item<int64_t>() < kSketchPrime,
                "positions must lie in [0, 2**31 - 1)");
  return p;
}

// Hash coefficients int64 [rows, 4], each in [1, 2**31 - 1), contiguous on `device`.
inline torch::Tensor sketch_coefficients(const torch::Tensor& coefficients, int64_t rows,
                                         const torch::Device& device) {
  TORCH_CHECK(coefficients.scalar_type() == torch::kInt64 && coefficients.dim() == 2 &&
                  coefficients.size(0) == rows && coefficients.size(1) == 4,
              "coefficients must be a contiguous int64 [rows=", rows, ", 4]");
  TORCH_CHECK(coefficients.min().item<int64_t>() > 0 &&
                  coefficients.max().item<int64_t>() < kSketchPrime,
              "hash coefficients must lie in [1, 2**31 - 1)");
  return coefficients.to(device).contiguous();
}

}  // namespace kvreviver
