// CPU kernels of KVReviver attention: KV write, paged attention over a
// request's exact slots, and the same with its quantized vague store revived
// into the softmax. Semantics are those of the PyTorch reference in
// kvreviver_vllm/sketch.py (write_kv, paged_attention, paged_attention_revived).
//
// Paged cache of one layer: [num_blocks, num_kv_heads, block_size, W]; a token
// slot holds its key in [0, D), its value in [D, 2D), then 8 metadata bytes:
// the logical position (int32) and the attention score (float32).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "op_checks.h"
#include "quantized_records.h"

namespace kvreviver {
namespace {

// Metadata of the slot whose first element is `slot` (head size `d`).
template <typename scalar_t>
inline int32_t* slot_position(scalar_t* slot, int64_t d) {
  return reinterpret_cast<int32_t*>(slot + 2 * d);
}
template <typename scalar_t>
inline float* slot_score(scalar_t* slot, int64_t d) {
  return reinterpret_cast<float*>(slot + 2 * d) + 1;
}

// A request with at most kTileRows query rows (a decode step) is one work item
// per KV head: each key and value is read once for all its rows and the query
// heads sharing the KV head. Longer prompt chunks go through GEMMs.
constexpr int64_t kTileRows = 8;

template <typename scalar_t>
inline void axpy(float* __restrict__ acc, float p,
                 const scalar_t* __restrict__ v, int64_t d) {
#pragma omp simd
  for (int64_t i = 0; i < d; ++i) acc[i] += p * static_cast<float>(v[i]);
}

// exp(x) for x <= 0 (softmax weights), vectorizable: Cephes' expf (range
// reduction by ln 2, degree-6 polynomial, exponent bits), ~1 ulp; x below
// -87 gives ~1e-38 instead of a denormal.
inline float softmax_exp(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// Softmax weights of one row in place: exp(x - max) over its `visible` first
// logits, zero up to `span`; returns their sum (the caller normalizes).
inline float softmax_row(float* __restrict__ l, int64_t visible, int64_t span) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < visible; ++j) m = std::max(m, l[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < visible; ++j) {
    l[j] = softmax_exp(l[j] - m);
    sum += l[j];
  }
  for (int64_t j = visible; j < span; ++j) l[j] = 0.f;
  return sum;
}

// Per-thread scratch of at least n elements, kept between calls (Tag tells
// buffers apart): a decode step runs this kernel once per layer, and
// zero-filling fresh buffers of the store's size cost as much as the work.
template <typename T, int Tag>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// A request's quantized vague store (kvreviver_vllm/stores/quantized.py): its
// first exact_start slots of each KV head hold records (quantized_records.h)
// back to back.
struct QuantizedRecords {
  const int64_t* exact_start = nullptr;  // [num_reqs]; null: no vague tokens
  const int64_t* num_tokens = nullptr;   // [num_reqs]
  int64_t bits = 0, group = 0;

  int64_t record_bytes(int64_t d) const { return RecordLayout{bits, group}.record_bytes(d); }
};

// Causal attention of each request's query rows over [its revived vague tokens |
// its exact slots [exact_start, seq_len)] with one softmax (vague tokens are
// older than every query); the last score_window rows of each request add the
// attention each token received to its score (slot or record).
template <typename scalar_t>
void paged_attention_kernel(torch::Tensor& out, const torch::Tensor& query,
                            const torch::Tensor& kv_cache,
                            const torch::Tensor& block_table,
                            const torch::Tensor& seq_lens,
                            const torch::Tensor& query_start_loc, double scale,
                            int64_t score_window, const QuantizedRecords& store) {
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
  auto exact_start = [&](int64_t r) { return store.exact_start ? store.exact_start[r] : 0; };
  auto num_vague = [&](int64_t r) { return store.num_tokens ? store.num_tokens[r] : 0; };

  // Work items: (request, query tile, KV head).
  struct Item {
    int64_t req, row0, rows;
  };
  std::vector<Item> tiles;
  int64_t max_keys = 0, max_vague = 0, max_store_slots = 0;
  std::vector<int64_t> prompt_chunks;  // requests with more than one tile of rows
  for (int64_t r = 0; r < num_reqs; ++r) {
    max_store_slots = std::max(max_store_slots, exact_start(r));
    if (qsl_p[r + 1] - qsl_p[r] > kTileRows) {
      prompt_chunks.push_back(r);
      continue;
    }
    max_keys = std::max(max_keys, num_vague(r) + lens_p[r] - exact_start(r));
    max_vague = std::max(max_vague, num_vague(r));
    if (qsl_p[r + 1] > qsl_p[r]) tiles.push_back({r, qsl_p[r], qsl_p[r + 1] - qsl_p[r]});
  }
  const int64_t num_items = static_cast<int64_t>(tiles.size()) * num_kv_heads;

  const scalar_t* q_base = query.data_ptr<scalar_t>();
  scalar_t* cache = kv_cache.data_ptr<scalar_t>();
  scalar_t* out_base = out.data_ptr<scalar_t>();
  const int64_t q_tok_stride = query.stride(0), q_head_stride = query.stride(1);
  const int64_t o_tok_stride = out.stride(0), o_head_stride = out.stride(1);
  const int64_t slot_stride = kv_cache.size(3);
  const int64_t slot_bytes = slot_stride * kv_cache.element_size();
  const int64_t head_stride = block_size * slot_stride;
  const int64_t block_stride = num_kv_heads * head_stride;
  const float fscale = static_cast<float>(scale);
  const int64_t record_bytes = store.bits ? store.record_bytes(head_size) : 0;
  const RecordLayout layout{store.bits, store.group};
  auto slot_at = [&](int64_t r, int64_t h, int64_t s) {
    return cache + table_p[r * table_width + s / block_size] * block_stride + h * head_stride +
           (s % block_size) * slot_stride;
  };
  // Copies request r's head-h store slots into `records` (a record may
  // straddle two slots) and dequantizes its records: keys and values
  // row-major ([nv, D]) into k and v.
  auto revive = [&](int64_t r, int64_t h, uint8_t* records, float* k, float* v) {
    for (int64_t s = 0; s < exact_start(r); ++s)
      std::memcpy(&records[s * slot_bytes], slot_at(r, h, s), slot_bytes);
    for (int64_t j = 0; j < num_vague(r); ++j)
      decode_record(&records[j * record_bytes], head_size, layout, k + j * head_size,
                    v + j * head_size);
  };
  // Adds `received` (attention from the scoring rows) to the score of request
  // r's head-h key j: a vague record's score field or an exact slot's.
  auto add_score = [&](int64_t r, int64_t h, int64_t j, float received) {
    const int64_t nv = num_vague(r);
    float* field;
    if (j < nv) {
      // The record's score field: 4-byte aligned, so never split across slots.
      const int64_t at = j * record_bytes + record_bytes - 4;
      field = reinterpret_cast<float*>(
          reinterpret_cast<uint8_t*>(slot_at(r, h, at / slot_bytes)) + at % slot_bytes);
    } else {
      field = slot_score(slot_at(r, h, exact_start(r) + j - nv), head_size);
    }
    // Each (request, KV head) is one task, so no other thread adds to this key.
    *field += received;
  };

  // Prompt chunks: per (request, KV head) its keys and values as float rows
  // ([revived vague | exact]), then logits and outputs as two GEMMs per block
  // of query rows (ATen's, threaded), the causal softmax in between.
  constexpr int64_t kGemmQueries = 128;
  for (const int64_t r : prompt_chunks) {
    const int64_t n = qsl_p[r + 1] - qsl_p[r], nv = num_vague(r);
    const int64_t ne = lens_p[r] - exact_start(r), total = nv + ne;
    const auto f32 = torch::TensorOptions().dtype(torch::kFloat32);
    auto keys = torch::empty({total, head_size}, f32), values = torch::empty({total, head_size}, f32);
    std::vector<uint8_t> records(exact_start(r) * slot_bytes);
    std::vector<float> received(score_window > 0 ? total : 0);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      float* kp = keys.data_ptr<float>();
      float* vp = values.data_ptr<float>();
      if (nv > 0) revive(r, h, records.data(), kp, vp);
      at::parallel_for(0, ne, 64, [&](int64_t begin, int64_t end) {
        for (int64_t s = begin; s < end; ++s) {
          const scalar_t* slot = slot_at(r, h, exact_start(r) + s);
          for (int64_t d = 0; d < head_size; ++d) {
            kp[(nv + s) * head_size + d] = static_cast<float>(slot[d]);
            vp[(nv + s) * head_size + d] = static_cast<float>(slot[head_size + d]);
          }
        }
      });
      std::fill(received.begin(), received.end(), 0.f);
      for (int64_t q0 = 0; q0 < n; q0 += kGemmQueries) {
        const int64_t qn = std::min(kGemmQueries, n - q0), rows = qn * group;
        const int64_t span = total - n + q0 + qn;  // keys the block's last row sees
        auto qf = torch::empty({rows, head_size}, f32);
        float* qp = qf.data_ptr<float>();
        for (int64_t i = 0; i < qn; ++i)
          for (int64_t g = 0; g < group; ++g) {
            const scalar_t* q = q_base + (qsl_p[r] + q0 + i) * q_tok_stride +
                                (h * group + g) * q_head_stride;
            for (int64_t d = 0; d < head_size; ++d)
              qp[(i * group + g) * head_size + d] = static_cast<float>(q[d]) * fscale;
          }
        auto probs = at::mm(qf, keys.narrow(0, 0, span).t());
        float* pp = probs.data_ptr<float>();
        at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
          for (int64_t row = begin; row < end; ++row) {
            float* l = pp + row * span;
            const int64_t vis = total - n + q0 + row / group + 1;
            const float inv = 1.f / softmax_row(l, vis, span);
#pragma omp simd
            for (int64_t j = 0; j < vis; ++j) l[j] *= inv;
          }
        });
        const auto o = at::mm(probs, values.narrow(0, 0, span));
        const float* op = o.data_ptr<float>();
        for (int64_t i = 0; i < qn; ++i)
          for (int64_t g = 0; g < group; ++g) {
            scalar_t* dst = out_base + (qsl_p[r] + q0 + i) * o_tok_stride +
                            (h * group + g) * o_head_stride;
            for (int64_t d = 0; d < head_size; ++d)
              dst[d] = static_cast<scalar_t>(op[(i * group + g) * head_size + d]);
          }
        for (int64_t i = std::max<int64_t>(0, n - score_window - q0); i < qn; ++i)
          for (int64_t g = 0; g < group; ++g) {
            const float* l = pp + (i * group + g) * span;
#pragma omp simd
            for (int64_t j = 0; j < span; ++j) received[j] += l[j];
          }
      }
      for (int64_t j = 0; j < static_cast<int64_t>(received.size()); ++j)
        if (received[j] != 0.f) add_score(r, h, j, received[j]);
    }
  }

  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    const int64_t max_rows = kTileRows * group;
    std::vector<float> qf(max_rows * head_size);
    std::vector<float> acc(max_rows * head_size);
    float* logits = scratch<float, 0>(max_rows * std::max<int64_t>(max_keys, 1));
    std::vector<int64_t> visible(max_rows);
    std::vector<float> scored(max_rows);  // 1 where the row adds to scores
    std::vector<float> inv_sum(max_rows);
    uint8_t* records = scratch<uint8_t, 1>(max_store_slots * slot_bytes);
    // Revived vague keys and values, row-major; one exact key or value as float.
    float* vague_k = scratch<float, 2>(max_vague * head_size);
    float* vague_v = scratch<float, 3>(max_vague * head_size);
    std::vector<float> key_f(head_size);

    for (int64_t item = begin; item < end; ++item) {
      const Item& tile = tiles[item / num_kv_heads];
      const int64_t h = item % num_kv_heads;
      const int64_t r = tile.req;
      const int64_t seq_len = lens_p[r];
      const int64_t first_exact = exact_start(r);
      const int64_t nv = num_vague(r);
      const int64_t num_queries = qsl_p[r + 1] - qsl_p[r];
      const int64_t rows = tile.rows * group;  // (query row, head) pairs
      const int64_t* blocks = table_p + r * table_width;
      auto slot_ptr = [&](int64_t s) {
        return cache + blocks[s / block_size] * block_stride + h * head_stride +
               (s % block_size) * slot_stride;
      };

      int64_t span = nv;  // keys (vague, then exact) any row of the tile sees
      for (int64_t t = 0; t < tile.rows; ++t) {
        const int64_t i = tile.row0 + t - qsl_p[r];
        const int64_t vis = nv + seq_len - first_exact - num_queries + i + 1;
        span = std::max(span, vis);
        const float in_window = i >= num_queries - score_window ? 1.f : 0.f;
        for (int64_t g = 0; g < group; ++g) {
          const int64_t row = t * group + g;
          visible[row] = vis;
          scored[row] = in_window;
          const scalar_t* q = q_base + (tile.row0 + t) * q_tok_stride +
                              (h * group + g) * q_head_stride;
          for (int64_t d = 0; d < head_size; ++d)
            qf[row * head_size + d] = static_cast<float>(q[d]) * fscale;
        }
      }

      // Logits one key at a time: each key converted once, dotted with every row.
      auto key_logits = [&](int64_t j, const float* k) {
        for (int64_t row = 0; row < rows; ++row) {
          const float* q = &qf[row * head_size];
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_size; ++d) dot += q[d] * k[d];
          logits[row * span + j] = dot;
        }
      };
      const float* vk = vague_k;
      const float* vv = vague_v;
      if (nv > 0) {
        revive(r, h, records, vague_k, vague_v);
        for (int64_t j = 0; j < nv; ++j) key_logits(j, vk + j * head_size);
      }

      for (int64_t s = first_exact; s < first_exact + span - nv; ++s) {
        const scalar_t* k = slot_ptr(s);
#pragma omp simd
        for (int64_t d = 0; d < head_size; ++d) key_f[d] = static_cast<float>(k[d]);
        key_logits(nv + s - first_exact, key_f.data());
      }

      // Softmax per row over its visible keys; weights overwrite logits.
      for (int64_t row = 0; row < rows; ++row)
        inv_sum[row] = 1.f / softmax_row(&logits[row * span], visible[row], span);

      std::fill(acc.begin(), acc.begin() + rows * head_size, 0.f);
      // Adds key j's weights to the outputs; returns the attention it received
      // from the scoring rows.
      auto accumulate = [&](int64_t j, const float* v) {
        float received = 0.f;
        for (int64_t row = 0; row < rows; ++row) {
          const float p = logits[row * span + j];
          if (p != 0.f) axpy(&acc[row * head_size], p, v, head_size);
          received += p * inv_sum[row] * scored[row];
        }
        return received;
      };
      for (int64_t j = 0; j < nv; ++j) {
        const float received = accumulate(j, &vv[j * head_size]);
        if (received != 0.f) add_score(r, h, j, received);
      }
      for (int64_t s = first_exact; s < first_exact + span - nv; ++s) {
        scalar_t* slot = slot_ptr(s);
#pragma omp simd
        for (int64_t d = 0; d < head_size; ++d) key_f[d] = static_cast<float>(slot[head_size + d]);
        const float received = accumulate(nv + s - first_exact, key_f.data());
        if (received != 0.f) *slot_score(slot, head_size) += received;
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
                  2 * query.size(2) * kv_cache.element_size() + kSlotMetaBytes,
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
                         int64_t score_window) {
  check_attention_args(out, query, kv_cache, block_table, seq_lens,
                       query_start_loc);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
      "kvreviver_paged_attention", [&] {
        paged_attention_kernel<scalar_t>(out, query, kv_cache, block_table,
                                         seq_lens, query_start_loc, scale,
                                         score_window, QuantizedRecords{});
      });
}

void paged_attention_quantized_cpu(
    torch::Tensor out, const torch::Tensor& query, const torch::Tensor& kv_cache,
    const torch::Tensor& block_table, const torch::Tensor& exact_start,
    const torch::Tensor& seq_lens, const torch::Tensor& vague_tokens,
    const torch::Tensor& query_start_loc, double scale, int64_t score_window,
    int64_t bits, int64_t group) {
  check_attention_args(out, query, kv_cache, block_table, seq_lens,
                       query_start_loc);
  const int64_t d = query.size(2);
  check_store_layout(d, bits, group);
  TORCH_CHECK(exact_start.numel() == seq_lens.numel() &&
                  vague_tokens.numel() == seq_lens.numel(),
              "exact_start and vague_tokens need one entry per request");
  const auto starts = exact_start.to(torch::kInt64).contiguous();
  const auto counts = vague_tokens.to(torch::kInt64).contiguous();
  QuantizedRecords store{starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), bits, group};
  const int64_t slot_bytes = kv_cache.size(3) * kv_cache.element_size();
  TORCH_CHECK(store.record_bytes(d) % 4 == 0 && slot_bytes % 4 == 0,
              "records and slots must be whole 4-byte words");
  const int64_t* s = store.exact_start;
  const int64_t* n = store.num_tokens;
  for (int64_t r = 0; r < seq_lens.numel(); ++r)
    TORCH_CHECK(n[r] * store.record_bytes(d) <= s[r] * slot_bytes,
                "request ", r, ": ", n[r], " vague tokens do not fit in its ", s[r],
                " store slots");
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, query.scalar_type(),
      "kvreviver_paged_attention_quantized", [&] {
        paged_attention_kernel<scalar_t>(out, query, kv_cache, block_table,
                                         seq_lens, query_start_loc, scale,
                                         score_window, store);
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
                      2 * key.size(2) * kv_cache.element_size() + kSlotMetaBytes &&
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
  m.impl("paged_attention_quantized", &paged_attention_quantized_cpu);
  m.impl("write_kv", &write_kv_cpu);
}

}  // namespace kvreviver
