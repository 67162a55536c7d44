// CPU kernels of KVReviver attention: KV write, paged attention over a
// request's exact slots, and the same with its quantized vague store revived
// into the softmax. Semantics are those of the PyTorch reference in
// kvreviver_vllm/ops/reference.py (write_kv, paged_attention, paged_attention_quantized).
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
#include <utility>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "../common/quantized_records.h"
#include "../common/scratch.h"

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
// Keys a decode step's logits and output sums take at a time (dot4).
constexpr int64_t kKeyBlock = 4;
// Fewest keys worth a part of their own when a decode item is split.
constexpr int64_t kMinPartKeys = 128;

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
// logits, zero up to `span`; returns their sum (the caller normalizes) and
// stores the max (-inf when nothing is visible) in *max_out if given.
inline float softmax_row(float* __restrict__ l, int64_t visible, int64_t span,
                         float* max_out = nullptr) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < visible; ++j) m = l[j] > m ? l[j] : m;
  if (max_out) *max_out = m;
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < visible; ++j) {
    l[j] = softmax_exp(l[j] - m);
    sum += l[j];
  }
  for (int64_t j = visible; j < span; ++j) l[j] = 0.f;
  return sum;
}

// Dot products of q with four rows k[0..3], all of length d, into out[0..3].
// Four independent sums keep the FMA units busy where one dot product's
// chain would stall them; with AVX2 the four vector sums are reduced together
// (GCC's `omp simd reduction` spills each one and adds its lanes serially).
inline void dot4(const float* __restrict__ q, const float* const* k, int64_t d, float* out) {
#if defined(__AVX2__)
  if (d % 8 == 0) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < d; i += 8) {
      const __m256 x = _mm256_loadu_ps(q + i);
      a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[0] + i), a0);
      a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[1] + i), a1);
      a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[2] + i), a2);
      a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(k[3] + i), a3);
    }
    // Lane sums of a0..a3: pairwise adds leave [a0 a1 a2 a3] in each half.
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
    return;
  }
#endif
  float d0 = 0.f, d1 = 0.f, d2 = 0.f, d3 = 0.f;
  for (int64_t i = 0; i < d; ++i) {
    d0 += q[i] * k[0][i];
    d1 += q[i] * k[1][i];
    d2 += q[i] * k[2][i];
    d3 += q[i] * k[3][i];
  }
  out[0] = d0, out[1] = d1, out[2] = d2, out[3] = d3;
}

// A request's quantized vague store (kvreviver_vllm/stores/quantized.py): its
// first exact_start slots of each KV head hold records (quantized_records.h)
// back to back.
struct QuantizedRecords {
  const int64_t* exact_start = nullptr;  // [num_reqs]; null: no vague tokens
  const int64_t* num_tokens = nullptr;   // [num_reqs]
  RecordLayout layout;                   // bits 0: no store
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
  int64_t max_keys = 0;
  std::vector<int64_t> prompt_chunks;  // requests with more than one tile of rows
  for (int64_t r = 0; r < num_reqs; ++r) {
    if (qsl_p[r + 1] - qsl_p[r] > kTileRows) {
      prompt_chunks.push_back(r);
      continue;
    }
    max_keys = std::max(max_keys, num_vague(r) + lens_p[r] - exact_start(r));
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
  const RecordLayout& layout = store.layout;
  const int64_t record_bytes = layout.bits ? layout.record_bytes(head_size) : 0;
  auto slot_at = [&](int64_t r, int64_t h, int64_t s) {
    return cache + table_p[r * table_width + s / block_size] * block_stride + h * head_stride +
           (s % block_size) * slot_stride;
  };
  // Request r's head-h vague records in order from record `first`, read in
  // place: a head's slots are contiguous within a block, so only a record
  // straddling two blocks is gathered (into `spill`). No division per record.
  struct RecordCursor {
    uint8_t* head;  // the cache's bytes, offset to this KV head
    const int64_t* blocks;
    int64_t block_stride, block_bytes, record_bytes;
    int64_t b, off;  // the current record: its block (in the request's row), byte offset there

    uint8_t* at(int64_t blk, int64_t o) const { return head + blocks[blk] * block_stride + o; }
    const uint8_t* get(uint8_t* spill) const {
      if (off + record_bytes <= block_bytes) return at(b, off);
      const int64_t first = block_bytes - off;
      std::memcpy(spill, at(b, off), first);
      std::memcpy(spill + first, at(b + 1, 0), record_bytes - first);
      return spill;
    }
    // The score field: 4-byte aligned, so it never straddles two blocks.
    float* score() const {
      const int64_t o = off + record_bytes - 4;
      return reinterpret_cast<float*>(o < block_bytes ? at(b, o) : at(b + 1, o - block_bytes));
    }
    void next() {
      off += record_bytes;
      if (off >= block_bytes) off -= block_bytes, ++b;
    }
  };
  const int64_t elem = kv_cache.element_size();
  auto records_from = [&](int64_t r, int64_t h, int64_t first) {
    const int64_t block_bytes = block_size * slot_bytes, pos = first * record_bytes;
    return RecordCursor{reinterpret_cast<uint8_t*>(cache) + h * head_stride * elem,
                        table_p + r * table_width, block_stride * elem, block_bytes,
                        record_bytes, pos / block_bytes, pos % block_bytes};
  };
  // Request r's head-h records dequantized: keys and values row-major ([nv, D]).
  auto revive = [&](int64_t r, int64_t h, uint8_t* spill, float* k, float* v) {
    auto record = records_from(r, h, 0);
    for (int64_t j = 0; j < num_vague(r); ++j, record.next())
      decode_record(record.get(spill), head_size, layout, k + j * head_size, v + j * head_size);
  };
  // Adds the attention each key of request r's head h in [k0, k1) received
  // from the scoring rows (weights logits[row * stride + j] * factor[row]) to
  // its score: a vague record's score field or an exact slot's. Each (request,
  // KV head) is one task, so no other thread adds to these keys.
  auto add_scores = [&](int64_t r, int64_t h, const float* logits, int64_t stride, int64_t rows,
                        const float* factor, int64_t k0, int64_t k1) {
    bool scoring = false;
    for (int64_t row = 0; row < rows; ++row) scoring |= factor[row] != 0.f;
    if (!scoring) return;
    const int64_t nv = num_vague(r);
    auto record = records_from(r, h, std::min(k0, nv));
    for (int64_t j = k0; j < k1; ++j) {
      float received = 0.f;
      for (int64_t row = 0; row < rows; ++row) received += logits[row * stride + j] * factor[row];
      if (j < nv) {
        *record.score() += received;
        record.next();
      } else {
        *slot_score(slot_at(r, h, exact_start(r) + j - nv), head_size) += received;
      }
    }
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
    std::vector<uint8_t> spill(record_bytes);  // a record straddling two blocks
    std::vector<float> received(score_window > 0 ? total : 0);
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      float* kp = keys.data_ptr<float>();
      float* vp = values.data_ptr<float>();
      if (nv > 0) revive(r, h, spill.data(), kp, vp);
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
      const float whole = 1.f;  // received already sums the scoring rows
      if (!received.empty()) add_scores(r, h, received.data(), 0, 1, &whole, 0, total);
    }
  }

  // Decode units: (tile, KV head, part of its keys). Where a batch has fewer
  // (tile, KV head) items than twice the threads (batch 1: a few KV heads), each
  // item's keys are split into parts so that every thread works. A part keeps
  // its rows' softmax max, sum and output sums; a second pass merges them.
  const int64_t threads = at::get_num_threads();
  const int64_t parts =
      num_items > 0 && num_items < 2 * threads
          ? std::clamp<int64_t>(max_keys / kMinPartKeys, 1, (2 * threads + num_items - 1) / num_items)
          : 1;
  const int64_t num_units = num_items * parts;
  const int64_t max_rows = kTileRows * group;
  const int64_t max_stride = max_keys + kKeyBlock - 1;  // logits_stride(max_keys)
  // Split items only: logits per item (read again by the merge), and per unit
  // its rows' max, sum and output sums.
  float* split_logits = parts > 1 ? scratch<float, 4>(num_items * max_rows * max_stride) : nullptr;
  auto item_logits = [&](int64_t item) { return split_logits + item * max_rows * max_stride; };
  auto logits_stride = [](int64_t span) { return span + kKeyBlock - 1; };
  std::vector<float> part_max(parts > 1 ? num_units * max_rows : 0);
  std::vector<float> part_sum(part_max.size());
  std::vector<float> part_acc(part_max.size() * head_size);

  // The geometry of item `item`: its rows' visible key counts and score flags
  // (and scaled queries into qf if given); returns the keys any row sees.
  auto item_rows = [&](int64_t item, int64_t* visible, float* scored, float* qf) {
    const Item& tile = tiles[item / num_kv_heads];
    const int64_t h = item % num_kv_heads, r = tile.req, nv = num_vague(r);
    const int64_t num_queries = qsl_p[r + 1] - qsl_p[r];
    int64_t span = nv;
    for (int64_t t = 0; t < tile.rows; ++t) {
      const int64_t i = tile.row0 + t - qsl_p[r];
      const int64_t vis = nv + lens_p[r] - exact_start(r) - num_queries + i + 1;
      span = std::max(span, vis);
      for (int64_t g = 0; g < group; ++g) {
        const int64_t row = t * group + g;
        visible[row] = vis;
        scored[row] = i >= num_queries - score_window ? 1.f : 0.f;
        if (!qf) continue;
        const scalar_t* q = q_base + (tile.row0 + t) * q_tok_stride + (h * group + g) * q_head_stride;
        for (int64_t d = 0; d < head_size; ++d)
          qf[row * head_size + d] = static_cast<float>(q[d]) * fscale;
      }
    }
    return span;
  };
  // Part p's keys [k0, k1) of `span`; parts start on whole key blocks.
  auto part_keys = [&](int64_t p, int64_t span) {
    auto start = [&](int64_t q) { return q == parts ? span : q * span / parts / kKeyBlock * kKeyBlock; };
    return std::pair<int64_t, int64_t>{start(p), start(p + 1)};
  };
  auto write_out = [&](int64_t item, int64_t row, const float* acc, float inv_sum) {
    const Item& tile = tiles[item / num_kv_heads];
    const int64_t h = item % num_kv_heads, t = row / group, g = row % group;
    scalar_t* o = out_base + (tile.row0 + t) * o_tok_stride + (h * group + g) * o_head_stride;
    for (int64_t d = 0; d < head_size; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv_sum);
  };

  at::parallel_for(0, num_units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(max_rows * head_size);
    std::vector<float> acc(max_rows * head_size);
    float* own_logits = parts > 1 ? nullptr : scratch<float, 0>(max_rows * max_stride);
    std::vector<int64_t> visible(max_rows);
    std::vector<float> scored(max_rows);  // 1 where the row adds to scores
    std::vector<float> row_sum(max_rows), row_max(max_rows), factor(max_rows);
    std::vector<uint8_t> spill(record_bytes);  // a record straddling two blocks
    // A block of keys or values as float rows: revived straight before use,
    // so the store's float copy never leaves L1.
    std::vector<float> key_f(kKeyBlock * head_size);

    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / parts, part = unit % parts;
      const Item& tile = tiles[item / num_kv_heads];
      const int64_t h = item % num_kv_heads;
      const int64_t r = tile.req;
      const int64_t first_exact = exact_start(r);
      const int64_t nv = num_vague(r);
      const int64_t rows = tile.rows * group;  // (query row, head) pairs
      const int64_t span = item_rows(item, visible.data(), scored.data(), qf.data());
      const int64_t stride = logits_stride(span);
      float* logits = parts > 1 ? item_logits(item) : own_logits;
      const auto [ka, kb] = part_keys(part, span);  // the unit's keys

      // Keys and values go kKeyBlock at a time (float rows; a short block
      // repeats its last row; see dot4).
      auto block_logits = [&](int64_t j0, int64_t n, const float* const* k) {
        float dots[kKeyBlock];
        for (int64_t row = 0; row < rows; ++row) {
          dot4(&qf[row * head_size], k, head_size, dots);
          std::copy_n(dots, n, &logits[row * stride + j0]);
        }
      };
      // Adds the weighted values of keys [j0, j0 + n) to every row's output.
      auto block_accumulate = [&](int64_t j0, int64_t n, const float* const* v) {
        const float *v0 = v[0], *v1 = v[1], *v2 = v[2], *v3 = v[3];
        for (int64_t row = 0; row < rows; ++row) {
          const float* l = &logits[row * stride + j0];  // weights, zero past the visible keys
          const float p0 = l[0], p1 = n > 1 ? l[1] : 0.f, p2 = n > 2 ? l[2] : 0.f,
                      p3 = n > 3 ? l[3] : 0.f;
          float* a = &acc[row * head_size];
#pragma omp simd
          for (int64_t d = 0; d < head_size; ++d)
            a[d] += p0 * v0[d] + p1 * v1[d] + p2 * v2[d] + p3 * v3[d];
        }
      };
      const float* ptrs[kKeyBlock];
      auto point_rows = [&](int64_t n) {  // ptrs at key_f's first n rows
        for (int64_t i = 0; i < kKeyBlock; ++i)
          ptrs[i] = key_f.data() + std::min(i, n - 1) * head_size;
      };
      // Keys (or values) [j0, j0 + n), all vague (the next ones of `record`)
      // or all exact, as float rows.
      auto key_rows = [&](int64_t j0, int64_t n, bool values, RecordCursor& record) {
        for (int64_t i = 0; i < n; ++i) {
          float* x = &key_f[i * head_size];
          if (j0 < nv) {
            const uint8_t* rec = record.get(spill.data());
            if (values) decode_values(rec, head_size, layout, x);
            else decode_keys(rec, head_size, layout, x);
            record.next();
          } else {
            const scalar_t* slot = slot_at(r, h, first_exact + j0 + i - nv) + (values ? head_size : 0);
#pragma omp simd
            for (int64_t d = 0; d < head_size; ++d) x[d] = static_cast<float>(slot[d]);
          }
        }
        point_rows(n);
      };
      // The part's vague keys, then its exact keys, kKeyBlock at a time.
      auto for_blocks = [&](auto&& body) {
        for (const auto& [a, b] : {std::pair{ka, std::min(kb, nv)}, std::pair{std::max(ka, nv), kb}})
          for (int64_t j = a; j < b; j += kKeyBlock) body(j, std::min(kKeyBlock, b - j));
      };

      auto keys = records_from(r, h, std::min(ka, nv));
      for_blocks([&](int64_t j, int64_t n) {
        key_rows(j, n, false, keys);
        block_logits(j, n, ptrs);
      });
      // Softmax per row over the part's visible keys; weights overwrite logits.
      for (int64_t row = 0; row < rows; ++row) {
        const int64_t vis = std::clamp<int64_t>(visible[row] - ka, 0, kb - ka);
        row_sum[row] = softmax_row(&logits[row * stride + ka], vis, kb - ka, &row_max[row]);
      }
      std::fill(acc.begin(), acc.begin() + rows * head_size, 0.f);
      auto values = records_from(r, h, std::min(ka, nv));
      for_blocks([&](int64_t j, int64_t n) {
        key_rows(j, n, true, values);
        block_accumulate(j, n, ptrs);
      });

      if (parts == 1) {  // the whole item: normalize, write, score
        for (int64_t row = 0; row < rows; ++row) {
          write_out(item, row, &acc[row * head_size], 1.f / row_sum[row]);
          factor[row] = scored[row] / row_sum[row];
        }
        add_scores(r, h, logits, stride, rows, factor.data(), 0, span);
        continue;
      }
      for (int64_t row = 0; row < rows; ++row) {
        part_max[unit * max_rows + row] = row_max[row];
        part_sum[unit * max_rows + row] = row_sum[row];
      }
      std::copy_n(acc.begin(), rows * head_size, &part_acc[unit * max_rows * head_size]);
    }
  });
  if (parts == 1) return;

  // Merge of split items: each unit rescales its part's weights to the item's
  // softmax for the scores, and each item's first unit writes the output.
  at::parallel_for(0, num_units, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> visible(max_rows);
    std::vector<float> scored(max_rows), factor(max_rows), acc(head_size);
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t item = unit / parts, part = unit % parts, first = item * parts;
      const int64_t rows = tiles[item / num_kv_heads].rows * group;
      const int64_t span = item_rows(item, visible.data(), scored.data(), nullptr);
      for (int64_t row = 0; row < rows; ++row) {
        float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
        for (int64_t u = first; u < first + parts; ++u) m = std::max(m, part_max[u * max_rows + row]);
        for (int64_t u = first; u < first + parts; ++u)
          sum += part_sum[u * max_rows + row] * std::exp(part_max[u * max_rows + row] - m);
        factor[row] = scored[row] * std::exp(part_max[unit * max_rows + row] - m) / sum;
        if (part != 0) continue;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t u = first; u < first + parts; ++u) {
          const float w = std::exp(part_max[u * max_rows + row] - m);
          const float* a = &part_acc[(u * max_rows + row) * head_size];
          for (int64_t d = 0; d < head_size; ++d) acc[d] += w * a[d];
        }
        write_out(item, row, acc.data(), 1.f / sum);
      }
      const auto [ka, kb] = part_keys(part, span);
      add_scores(tiles[item / num_kv_heads].req, item % num_kv_heads, item_logits(item),
                 logits_stride(span), rows, factor.data(), ka, kb);
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
  check_slot_cache(kv_cache, query.size(2));
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
    int64_t bits, int64_t group, int64_t value_bits) {
  check_attention_args(out, query, kv_cache, block_table, seq_lens,
                       query_start_loc);
  const int64_t d = query.size(2);
  check_store_layout(d, bits, group, value_bits);
  TORCH_CHECK(exact_start.numel() == seq_lens.numel() &&
                  vague_tokens.numel() == seq_lens.numel(),
              "exact_start and vague_tokens need one entry per request");
  const auto starts = exact_start.to(torch::kInt64).contiguous();
  const auto counts = vague_tokens.to(torch::kInt64).contiguous();
  QuantizedRecords store{starts.data_ptr<int64_t>(), counts.data_ptr<int64_t>(),
                         {bits, group, value_bits}};
  const int64_t slot_bytes = kv_cache.size(3) * kv_cache.element_size();
  const int64_t record_bytes = store.layout.record_bytes(d);
  TORCH_CHECK(record_bytes % 4 == 0 && slot_bytes % 4 == 0,
              "records and slots must be whole 4-byte words");
  const int64_t* s = store.exact_start;
  const int64_t* n = store.num_tokens;
  for (int64_t r = 0; r < seq_lens.numel(); ++r)
    TORCH_CHECK(n[r] * record_bytes <= s[r] * slot_bytes,
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
  TORCH_CHECK(key.dim() == 3 && key.sizes() == value.sizes(),
              "key and value must both be [tokens, kv_heads, head_size]");
  check_slot_cache(kv_cache, key.size(2));
  TORCH_CHECK(kv_cache.size(1) == key.size(1), "kv_cache has ", kv_cache.size(1),
              " KV heads, key has ", key.size(1));
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
  m.impl("paged_attention", static_cast<op::paged_attention*>(&paged_attention_cpu));
  m.impl("paged_attention_quantized",
         static_cast<op::paged_attention_quantized*>(&paged_attention_quantized_cpu));
  m.impl("write_kv", static_cast<op::write_kv*>(&write_kv_cpu));
}

}  // namespace kvreviver
