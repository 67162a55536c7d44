// CPU kernels of the exact part of KVReviver attention: KV write and paged
// attention over a request's slots. Semantics are those of the PyTorch
// reference in kvreviver_vllm/sketch.py (write_kv, paged_attention).
//
// Paged cache of one layer: [num_blocks, num_kv_heads, block_size, W]; a token
// slot holds its key in [0, D), its value in [D, 2D), then 8 metadata bytes:
// the logical position (int32) and the attention score (float32).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace kvreviver {
namespace {

constexpr int64_t kMetaBytes = 8;

// Metadata of the slot whose first element is `slot` (head size `d`).
template <typename scalar_t>
inline int32_t* slot_position(scalar_t* slot, int64_t d) {
  return reinterpret_cast<int32_t*>(slot + 2 * d);
}
template <typename scalar_t>
inline float* slot_score(scalar_t* slot, int64_t d) {
  return reinterpret_cast<float*>(slot + 2 * d) + 1;
}

// Query rows of one request processed together, so each key/value read from the
// cache is reused by kTileRows x (query heads per KV head) dot products.
constexpr int64_t kTileRows = 8;

template <typename scalar_t>
inline float dot(const float* __restrict__ q, const scalar_t* __restrict__ k,
                 int64_t d) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < d; ++i) acc += q[i] * static_cast<float>(k[i]);
  return acc;
}

template <typename scalar_t>
inline void axpy(float* __restrict__ acc, float p,
                 const scalar_t* __restrict__ v, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += p * static_cast<float>(v[i]);
}

template <typename scalar_t>
void paged_attention_kernel(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache,
                            const torch::Tensor& block_table,
                            const torch::Tensor& seq_lens,
                            const torch::Tensor& query_start_loc, double scale,
                            bool accumulate_scores) {
  const int64_t num_kv_heads = kv_cache.size(1);
  const int64_t block_size = kv_cache.size(2);
  const int64_t head_size = query.size(2);
  const int64_t group = query.size(1) / num_kv_heads;
  const int64_t num_reqs = seq_lens.size(0);
  const int64_t table_width = block_table.size(1);

  const auto qsl = query_start_loc.to(torch::kInt64).contiguous();
  const auto lens = seq_lens.to(torch::kInt64).contiguous();
  const auto table = block_table.to(torch::kInt64).contiguous();
  const int64_t* qsl_p = qsl.data_ptr<int64_t>();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  const int64_t* table_p = table.data_ptr<int64_t>();

  // Work items: (request, query tile, KV head).
  struct Item {
    int64_t req, row0, rows;
  };
  std::vector<Item> tiles;
  int64_t max_len = 0;
  for (int64_t r = 0; r < num_reqs; ++r) {
    max_len = std::max(max_len, lens_p[r]);
    for (int64_t row = qsl_p[r]; row < qsl_p[r + 1]; row += kTileRows)
      tiles.push_back({r, row, std::min(kTileRows, qsl_p[r + 1] - row)});
  }
  const int64_t num_items = static_cast<int64_t>(tiles.size()) * num_kv_heads;

  const scalar_t* q_base = query.data_ptr<scalar_t>();
  scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* out_base = out.data_ptr<scalar_t>();
  const int64_t q_tok_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t o_tok_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t slot_stride = kv_cache.size(3);
  const int64_t head_stride = block_size * slot_stride;
  const int64_t block_stride = num_kv_heads * head_stride;
  const float fscale = static_cast<float>(scale);

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = kTileRows * group;
    std::vector<float> qf(max_rows * head_size);
    std::vector<float> acc(max_rows * head_size);
    std::vector<float> logits(max_rows * std::max<int64_t>(max_len, 1));
    std::vector<int64_t> visible(max_rows);

    for (int64_t item = begin; item < end; ++item) {
      const Item& tile = tiles[item / num_kv_heads];
      const int64_t h = item % num_kv_heads;
      const int64_t r = tile.req;
      const int64_t seq_len = lens_p[r];
      const int64_t num_queries = qsl_p[r + 1] - qsl_p[r];
      const int64_t rows = tile.rows * group;  // (query row, head) pairs
      const int64_t* blocks = table_p + r * table_width;

      int64_t span = 0;  // keys any row of the tile sees
      for (int64_t t = 0; t < tile.rows; ++t) {
        const int64_t i = tile.row0 + t - qsl_p[r];
        const int64_t vis = seq_len - num_queries + i + 1;
        span = std::max(span, vis);
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = t * group + g;
          visible[row] = vis;
          const scalar_t* q = q_base + (tile.row0 + t) * q_tok_stride +
                              (h * group + g) * q_head_stride;
          for (int64_t d = 0; d < head_size; ++d)
            qf[row * head_size + d] = static_cast<float>(q[d]);
        }
      }

      // Logits, one cache block at a time.
      for (int64_t j0 = 0; j0 < span; j0 += block_size) {
        const scalar_t* blk = cache + blocks[j0 / block_size] * block_stride +
                              h * head_stride;
        const int64_t n = std::min(block_size, span - j0);
        for (int64_t o = 0; o < n; ++o) {
          const scalar_t* k = blk + o * slot_stride;
          for (int64_t row = 0; row < rows; ++row)
            logits[row * span + j0 + o] =
                dot(&qf[row * head_size], k, head_size) * fscale;
        }
      }

      // Softmax per row over its visible keys; weights overwrite logits.
      std::vector<float> inv_sum(rows);
      for (int64_t row = 0; row < rows; ++row) {
        float* l = &logits[row * span];
        const int64_t vis = visible[row];
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < vis; ++j) m = std::max(m, l[j]);
        float s = 0.f;
        for (int64_t j = 0; j < vis; ++j) {
          l[j] = std::exp(l[j] - m);
          s += l[j];
        }
        for (int64_t j = vis; j < span; ++j) l[j] = 0.f;
        inv_sum[row] = 1.f / s;
      }

      std::fill(acc.begin(), acc.begin() + rows * head_size, 0.f);
      for (int64_t j0 = 0; j0 < span; j0 += block_size) {
        scalar_t* blk = cache + blocks[j0 / block_size] * block_stride +
                        h * head_stride;
        const int64_t n = std::min(block_size, span - j0);
        for (int64_t o = 0; o < n; ++o) {
          const scalar_t* v = blk + o * slot_stride + head_size;
          float received = 0.f;
          for (int64_t row = 0; row < rows; ++row) {
            const float p = logits[row * span + j0 + o];
            if (p != 0.f) axpy(&acc[row * head_size], p, v, head_size);
            received += p * inv_sum[row];
          }
          if (accumulate_scores && received != 0.f) {
            // Other query tiles of this request may add to the same slot.
            std::atomic_ref<float>(*slot_score(blk + o * slot_stride, head_size))
                .fetch_add(received, std::memory_order_relaxed);
          }
        }
      }

      for (int64_t t = 0; t < tile.rows; ++t)
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = t * group + g;
          scalar_t* o = out_base + (tile.row0 + t) * o_tok_stride +
                        (h * group + g) * o_head_stride;
          for (int64_t d = 0; d < head_size; ++d)
            o[d] = static_cast<scalar_t>(acc[row * head_size + d] * inv_sum[row]);
        }
    }
  });
}

void check_attention_args(const torch::Tensor& out, const torch::Tensor& query,
                          const torch::Tensor& kv_cache,
                          const torch::Tensor& block_table,
                          const torch::Tensor& seq_lens,
                          const torch::Tensor& query_start_loc) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(),
              "query and out must both be [tokens, heads, head_size]");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [blocks, kv_heads, block_size, W]");
  TORCH_CHECK(kv_cache.size(3) * kv_cache.element_size() ==
                  2 * query.size(2) * kv_cache.element_size() + kMetaBytes,
              "kv_cache slots must hold K, V and 8 metadata bytes");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0,
              "query heads must be a multiple of KV heads");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1,
              "query and out must be contiguous in the head dimension");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, out and kv_cache must share a dtype");
  TORCH_CHECK(block_table.dim() == 2 && seq_lens.dim() == 1 &&
                  query_start_loc.numel() == seq_lens.numel() + 1,
              "block_table [reqs, width], seq_lens [reqs], query_start_loc [reqs+1]");
}

}  // namespace

void paged_attention_cpu(torch::Tensor out, const torch::Tensor& query,
                         const torch::Tensor& kv_cache,
                         const torch::Tensor& block_table,
                         const torch::Tensor& seq_lens,
                         const torch::Tensor& query_start_loc, double scale,
                         bool accumulate_scores) {
  check_attention_args(out, query, kv_cache, block_table, seq_lens,
                       query_start_loc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
      "kvreviver_paged_attention", [&] {
        paged_attention_kernel<scalar_t>(out, query, kv_cache, block_table,
                                         seq_lens, query_start_loc, scale,
                                         accumulate_scores);
      });
}

void write_kv_cpu(torch::Tensor kv_cache, const torch::Tensor& key,
                  const torch::Tensor& value, const torch::Tensor& slot_mapping,
                  const torch::Tensor& positions) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous(),
              "kv_cache must be a contiguous [blocks, kv_heads, block_size, W]");
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(),
              "key and value must both be [tokens, kv_heads, head_size]");
  TORCH_CHECK(kv_cache.size(3) * kv_cache.element_size() ==
                      2 * key.size(2) * kv_cache.element_size() + kMetaBytes &&
                  kv_cache.size(1) == key.size(1),
              "kv_cache [blocks, kv_heads, block_size, K|V|meta] does not match key");
  TORCH_CHECK(slot_mapping.numel() == key.size(0) && positions.numel() == key.size(0),
              "one slot and one position per token");
  const auto slots = slot_mapping.to(torch::kInt64).contiguous();
  const auto pos = positions.to(torch::kInt64).contiguous();
  const int64_t* pos_p = pos.data_ptr<int64_t>();
  const int64_t width = kv_cache.size(3);
  const auto k = key.to(kv_cache.scalar_type()).contiguous();
  const auto v = value.to(kv_cache.scalar_type()).contiguous();
  const int64_t tokens = k.size(0), heads = k.size(1), d = k.size(2);
  const int64_t block_size = kv_cache.size(2);
  const int64_t num_slots = kv_cache.size(0) * block_size;
  const int64_t* slot_p = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(slot_p[t] < num_slots, "slot ", slot_p[t], " is out of range [0, ",
                num_slots, ")");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, kv_cache.scalar_type(),
      "kvreviver_write_kv", [&] {
        scalar_t* cache = kv_cache.data_ptr<scalar_t>();
        const scalar_t* kp = k.data_ptr<scalar_t>();
        const scalar_t* vp = v.data_ptr<scalar_t>();
        at::parallel_for(0, tokens, 16, [&](int64_t begin, int64_t end) {
          for (int64_t t = begin; t < end; ++t) {
            const int64_t slot = slot_p[t];
            if (slot < 0) continue;  // padding
            const int64_t blk = slot / block_size, off = slot % block_size;
            for (int64_t h = 0; h < heads; ++h) {
              scalar_t* dst = cache + ((blk * heads + h) * block_size + off) * width;
              std::copy_n(kp + (t * heads + h) * d, d, dst);
              std::copy_n(vp + (t * heads + h) * d, d, dst + d);
              *slot_position(dst, d) = static_cast<int32_t>(pos_p[t]);
              *slot_score(dst, d) = 0.f;
            }
          }
        });
      });
}

TORCH_LIBRARY_IMPL(kvreviver, CPU, m) {
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("write_kv", &write_kv_cpu);
}

}  // namespace kvreviver
