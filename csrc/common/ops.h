// One C++ function type per op of bindings.cpp, through which every CPU and
// CUDA m.impl registers (static_cast<op::name*>(&fn)).
// Why: a kernel whose signature differs (const at::Tensor& vs at::Tensor) then
// fails to compile, instead of aborting `import kvreviver_vllm._C` on the
// first machine that builds both (torch's "Mismatch in kernel C++ signatures").
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace kvreviver::op {

using at::Tensor;

using write_kv = void(Tensor kv_cache, const Tensor& key, const Tensor& value,
                      const Tensor& slot_mapping, const Tensor& positions);

// kv_cache's scores grow in place, through the const reference (as on the CPU).
using paged_attention = void(Tensor out, const Tensor& query, const Tensor& kv_cache,
                             const Tensor& block_table, const Tensor& seq_lens,
                             const Tensor& query_start_loc, double scale, int64_t score_window);

using paged_attention_quantized = void(Tensor out, const Tensor& query, const Tensor& kv_cache,
                                       const Tensor& block_table, const Tensor& exact_start,
                                       const Tensor& seq_lens, const Tensor& vague_tokens,
                                       const Tensor& query_start_loc, double scale,
                                       int64_t score_window, int64_t bits, int64_t group,
                                       int64_t value_bits);

using compact_slots = void(Tensor kv_cache, const Tensor& block_row, const Tensor& kept_slots);

using compact_quantized = void(Tensor kv_cache, const Tensor& block_row, int64_t exact_start,
                               int64_t seq_len, int64_t num_vague, const Tensor& kept_exact,
                               int64_t keep_vague, int64_t bits, int64_t group,
                               int64_t value_bits, int64_t pool_before, int64_t pool_after,
                               double pool_decay);

using quantize_records = Tensor(const Tensor& keys, const Tensor& values,
                                const Tensor& positions, const Tensor& scores, int64_t bits,
                                int64_t group, int64_t value_bits);

using dequantize_records = std::tuple<Tensor, Tensor>(const Tensor& records, int64_t head_size,
                                                      int64_t bits, int64_t group,
                                                      int64_t value_bits);

using count_sketch_add = void(Tensor bucket_keys, Tensor bucket_values, const Tensor& keys,
                              const Tensor& values, const Tensor& positions,
                              const Tensor& coefficients);

using count_sketch_estimate = Tensor(const Tensor& buckets, const Tensor& positions,
                                     const Tensor& coefficients);

using count_sketch_logits = Tensor(const Tensor& query, const Tensor& bucket_keys,
                                   const Tensor& positions, const Tensor& coefficients);

}  // namespace kvreviver::op
