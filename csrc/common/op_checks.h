// Argument checks shared by the CPU ops and the CUDA bindings, so that both
// refuse the same inputs with the same messages (value and allowed range).
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cstdint>
#include <utility>

#include "quantized_records.h"
#include "sketch_hash.h"

namespace kvreviver {

// Bit widths (keys; values, 0: the keys') and channel group of a quantized store.
inline void check_store_layout(int64_t head_size, int64_t bits, int64_t group,
                               int64_t value_bits = 0) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8,
              "bits=", bits, " is not supported: allowed values are 2, 3, 4, 8");
  TORCH_CHECK(value_bits == 0 || value_bits == 2 || value_bits == 3 || value_bits == 4 ||
                  value_bits == 8,
              "value_bits=", value_bits, " is not supported: allowed values are 0 (bits), 2, 3, 4, 8");
  const int64_t vbits = value_bits ? value_bits : bits;
  TORCH_CHECK(group > 0 && head_size % group == 0 && (group * bits) % 8 == 0 &&
                  (group * vbits) % 8 == 0,
              "group=", group, " must divide the head size ", head_size,
              " into whole bytes of codes");
}

// Tokens to quantize: keys/values [N, D], one position and score each.
inline void check_record_inputs(const torch::Tensor& keys, const torch::Tensor& values,
                                const torch::Tensor& positions, const torch::Tensor& scores,
                                int64_t bits, int64_t group, int64_t value_bits) {
  TORCH_CHECK(keys.dim() == 2 && keys.sizes() == values.sizes(),
              "keys and values must both be [N, head_size]");
  check_store_layout(keys.size(1), bits, group, value_bits);
  TORCH_CHECK(positions.numel() == keys.size(0) && scores.numel() == keys.size(0),
              "one position and score per token");
}

// Records uint8 [N, record_bytes] of the given layout.
inline void check_records(const torch::Tensor& records, int64_t head_size, int64_t bits,
                          int64_t group, int64_t value_bits) {
  check_store_layout(head_size, bits, group, value_bits);
  const int64_t rb = RecordLayout{bits, group, value_bits}.record_bytes(head_size);
  TORCH_CHECK(records.scalar_type() == torch::kUInt8 && records.dim() == 2 &&
                  records.size(1) == rb,
              "records must be uint8 [N, ", rb, "] for head size ", head_size, ", bits=", bits,
              ", group=", group, ", value_bits=", value_bits);
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
// Smallest and largest element of a non-empty int64 tensor. On the CPU a loop
// over its data: two ATen reductions with their dispatch cost more than a
// decode-sized op itself.
inline std::pair<int64_t, int64_t> min_max(const torch::Tensor& x) {
  if (!x.device().is_cpu() || !x.is_contiguous())
    return {x.min().item<int64_t>(), x.max().item<int64_t>()};
  const int64_t* p = x.data_ptr<int64_t>();
  const auto [mn, mx] = std::minmax_element(p, p + x.numel());
  return {*mn, *mx};
}

// Whether every element of a non-empty int64 tensor lies in [lo, hi).
inline bool in_range(const torch::Tensor& x, int64_t lo, int64_t hi) {
  const auto [mn, mx] = min_max(x);
  return mn >= lo && mx < hi;
}

inline torch::Tensor sketch_positions(const torch::Tensor& positions, int64_t n,
                                      const torch::Device& device) {
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == n, "positions must be [", n, "]");
  auto p = positions.to(device, torch::kInt64).contiguous();
  if (n > 0)
    TORCH_CHECK(in_range(p, 0, kSketchPrime), "positions must lie in [0, 2**31 - 1)");
  return p;
}

// Hash coefficients int64 [rows, 4], each in [1, 2**31 - 1), contiguous on `device`.
inline torch::Tensor sketch_coefficients(const torch::Tensor& coefficients, int64_t rows,
                                         const torch::Device& device) {
  TORCH_CHECK(coefficients.scalar_type() == torch::kInt64 && coefficients.dim() == 2 &&
                  coefficients.size(0) == rows && coefficients.size(1) == 4,
              "coefficients must be a contiguous int64 [rows=", rows, ", 4]");
  TORCH_CHECK(in_range(coefficients, 1, kSketchPrime),
              "hash coefficients must lie in [1, 2**31 - 1)");
  return coefficients.to(device).contiguous();
}

// -- paged cache and compaction ------------------------------------------------

constexpr int64_t kSlotMetaBytes = 8;  // position int32 + score float32 after K | V
constexpr int64_t kMaxPool = 256;      // config pool_before / pool_after: at most this

// How far a record lends its score: pool_before records before it, pool_after
// after; and what share of it: pool_decay.
inline void check_pool(int64_t pool_before, int64_t pool_after, double pool_decay) {
  TORCH_CHECK(pool_before >= 0 && pool_before <= kMaxPool && pool_after >= 0 &&
                  pool_after <= kMaxPool,
              "pool_before=", pool_before, ", pool_after=", pool_after,
              " are out of range: expected integers in [0, ", kMaxPool, "]");
  TORCH_CHECK(pool_decay >= 0 && pool_decay <= 1, "pool_decay=", pool_decay,
              " is out of range: expected a number in [0, 1]");
}

// A paged cache [blocks, kv_heads, block_size, W] whose slots hold K | V | meta.
inline void check_slot_cache(const torch::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [blocks, kv_heads, block_size, W]");
  TORCH_CHECK((kv_cache.size(3) * kv_cache.element_size() - kSlotMetaBytes) %
                      (2 * kv_cache.element_size()) == 0,
              "kv_cache slots must hold K, V and 8 metadata bytes");
}

// The same, with K and V of `head_size` each.
inline void check_slot_cache(const torch::Tensor& kv_cache, int64_t head_size) {
  check_slot_cache(kv_cache);
  TORCH_CHECK(kv_cache.size(3) * kv_cache.element_size() ==
                  2 * head_size * kv_cache.element_size() + kSlotMetaBytes,
              "kv_cache slots of width ", kv_cache.size(3), " do not hold K and V of head size ",
              head_size, " and 8 metadata bytes");
}

// Head size of a paged cache whose slots hold K | V | meta.
inline int64_t slot_head_size(const torch::Tensor& kv_cache) {
  return (kv_cache.size(3) * kv_cache.element_size() - kSlotMetaBytes) /
         (2 * kv_cache.element_size());
}

// One request's block row as contiguous int64 on the cache's device.
inline torch::Tensor request_block_row(const torch::Tensor& block_row,
                                       const torch::Tensor& kv_cache) {
  TORCH_CHECK(block_row.dim() == 1, "block_row must be one request's [width] block ids");
  auto row = block_row.to(kv_cache.device(), torch::kInt64).contiguous();
  if (row.numel() > 0) {
    const auto [lo, hi] = min_max(row);
    TORCH_CHECK(lo >= 0 && hi < kv_cache.size(0), "block ids must lie in [0, ",
                kv_cache.size(0), "), got [", lo, ", ", hi, "]");
  }
  return row;
}

// Kept slot indices [kv_heads, keep], each row strictly ascending within
// [0, limit); contiguous int64 on `device`.
inline torch::Tensor checked_kept(const torch::Tensor& kept, int64_t num_kv_heads,
                                  int64_t limit, const char* what,
                                  const torch::Device& device) {
  TORCH_CHECK(kept.dim() == 2 && kept.size(0) == num_kv_heads,
              what, " must be [kv_heads=", num_kv_heads, ", keep]");
  const auto k = kept.to(torch::kCPU, torch::kInt64).contiguous();
  const int64_t* p = k.data_ptr<int64_t>();
  for (int64_t h = 0; h < k.size(0); ++h)
    for (int64_t i = 0; i < k.size(1); ++i) {
      const int64_t s = p[h * k.size(1) + i];
      TORCH_CHECK(s >= 0 && s < limit, what, "[", h, ", ", i, "]=", s,
                  " is out of range [0, ", limit, ")");
      TORCH_CHECK(i == 0 || s > p[h * k.size(1) + i - 1], what, "[", h,
                  "] must be strictly ascending");
    }
  return k.to(device);
}

// compact_quantized's layout: returns the store slots the kept records take.
inline int64_t check_quantized_compaction(const torch::Tensor& kv_cache, int64_t capacity,
                                          int64_t exact_start, int64_t seq_len,
                                          int64_t num_vague, int64_t num_kept,
                                          int64_t keep_vague, int64_t bits, int64_t group,
                                          int64_t value_bits) {
  const int64_t sb = kv_cache.size(3) * kv_cache.element_size();
  const int64_t d = slot_head_size(kv_cache);
  check_store_layout(d, bits, group, value_bits);
  const int64_t rb = RecordLayout{bits, group, value_bits}.record_bytes(d);
  TORCH_CHECK(exact_start >= 0 && exact_start <= seq_len && seq_len <= capacity,
              "need 0 <= exact_start (", exact_start, ") <= seq_len (", seq_len,
              ") <= the request's ", capacity, " slots");
  TORCH_CHECK(num_vague >= 0 && num_vague * rb <= exact_start * sb, "num_vague=", num_vague,
              " records do not fit in the ", exact_start, " store slots");
  const int64_t available = num_vague + seq_len - exact_start - num_kept;
  TORCH_CHECK(keep_vague >= 0 && keep_vague <= available, "keep_vague=", keep_vague,
              " is out of range [0, ", available, "] (old records + demoted tokens)");
  const int64_t new_slots = (keep_vague * rb + sb - 1) / sb;
  TORCH_CHECK(new_slots + num_kept <= capacity, "the compacted layout (", new_slots,
              " store slots + ", num_kept, " exact) exceeds the request's ", capacity, " slots");
  return new_slots;
}

// A compaction's checked arguments: the request's block row and kept slot
// indices, contiguous int64 on the cache's device, and its slot count.
struct CheckedCompaction {
  torch::Tensor row, kept;
  int64_t capacity = 0;
  int64_t new_slots = 0;  // compact_quantized: the store slots the kept records take
};

// compact_slots: kept_slots [kv_heads, keep] ascending within the request's slots.
inline CheckedCompaction check_compact_slots(const torch::Tensor& kv_cache,
                                             const torch::Tensor& block_row,
                                             const torch::Tensor& kept_slots) {
  check_slot_cache(kv_cache);
  auto row = request_block_row(block_row, kv_cache);
  const int64_t capacity = row.numel() * kv_cache.size(2);
  auto kept = checked_kept(kept_slots, kv_cache.size(1), capacity, "kept_slots",
                           kv_cache.device());
  return {std::move(row), std::move(kept), capacity};
}

// compact_quantized: kept_exact [kv_heads, K] ascending within [0, seq_len -
// exact_start), and a layout that fits (check_quantized_compaction).
inline CheckedCompaction check_compact_quantized(
    const torch::Tensor& kv_cache, const torch::Tensor& block_row, int64_t exact_start,
    int64_t seq_len, int64_t num_vague, const torch::Tensor& kept_exact, int64_t keep_vague,
    int64_t bits, int64_t group, int64_t value_bits, int64_t pool_before, int64_t pool_after,
    double pool_decay) {
  check_pool(pool_before, pool_after, pool_decay);
  check_slot_cache(kv_cache);
  auto row = request_block_row(block_row, kv_cache);
  const int64_t capacity = row.numel() * kv_cache.size(2);
  auto kept = checked_kept(kept_exact, kv_cache.size(1),
                           std::max<int64_t>(0, seq_len - exact_start), "kept_exact",
                           kv_cache.device());
  const int64_t new_slots =
      check_quantized_compaction(kv_cache, capacity, exact_start, seq_len, num_vague,
                                 kept.size(1), keep_vague, bits, group, value_bits);
  return {std::move(row), std::move(kept), capacity, new_slots};
}

}  // namespace kvreviver
