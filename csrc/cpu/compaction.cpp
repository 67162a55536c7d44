// CPU kernels of compaction: the moves that shrink one request's slots back to
// its budget after a step. Semantics: kvreviver_vllm/ops/reference.py (compact_slots,
// compact_quantized).
//
// A request's slots (paged cache [num_blocks, num_kv_heads, block_size, W]):
//   [0, exact_start)          quantized vague-store records, back to back
//   [exact_start, seq_len)    exact slots in position order (K | V | position | score)
// Every KV head is laid out, and compacted, independently.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "../common/quantized_records.h"

namespace kvreviver {
namespace {

// Byte addressing of one request's slots, per KV head; a slot's score is its
// last 4 bytes.
struct RequestSlots {
  uint8_t* cache;
  const int64_t* blocks;
  int64_t block_size, slot_bytes, head_stride, block_stride;

  uint8_t* slot(int64_t h, int64_t s) const {
    return cache + blocks[s / block_size] * block_stride + h * head_stride +
           (s % block_size) * slot_bytes;
  }
  // Copies slots [first, first + n) of head h to dst (n * slot_bytes bytes).
  void read(int64_t h, int64_t first, int64_t n, uint8_t* dst) const {
    for (int64_t s = 0; s < n; ++s) std::memcpy(dst + s * slot_bytes, slot(h, first + s), slot_bytes);
  }
  // Writes n slots from src to slots [first, first + n) of head h.
  void write(int64_t h, int64_t first, int64_t n, const uint8_t* src) const {
    for (int64_t s = 0; s < n; ++s) std::memcpy(slot(h, first + s), src + s * slot_bytes, slot_bytes);
  }
};

RequestSlots request_slots(torch::Tensor& kv_cache, const torch::Tensor& blocks) {
  const int64_t slot_bytes = kv_cache.size(3) * kv_cache.element_size();
  return {static_cast<uint8_t*>(kv_cache.data_ptr()), blocks.data_ptr<int64_t>(),
          kv_cache.size(2), slot_bytes, kv_cache.size(2) * slot_bytes,
          kv_cache.size(1) * kv_cache.size(2) * slot_bytes};
}

// Each record's score is max(its own, decay * the max over records
// [i - after, i + before]): policy.pooled_scores.
std::vector<float> pooled(const std::vector<float>& scores, int64_t before, int64_t after,
                          double decay) {
  const int64_t n = static_cast<int64_t>(scores.size());
  const float share = static_cast<float>(decay);
  std::vector<float> out(n);
  for (int64_t i = 0; i < n; ++i) {
    const float best = *std::max_element(scores.begin() + std::max<int64_t>(0, i - after),
                                         scores.begin() + std::min(n, i + before + 1));
    out[i] = decay == 1 ? best : std::max(scores[i], share * best);
  }
  return out;
}

template <typename scalar_t>
void compact_quantized_kernel(torch::Tensor& kv_cache, const RequestSlots& slots,
                              int64_t exact_start, int64_t seq_len, int64_t num_vague,
                              const int64_t* kept, int64_t num_kept, int64_t keep_vague,
                              const RecordLayout& layout, int64_t pool_before,
                              int64_t pool_after, double pool_decay) {
  const int64_t num_kv_heads = kv_cache.size(1);
  const int64_t d = (slots.slot_bytes - kSlotMetaBytes) / (2 * sizeof(scalar_t));
  const int64_t rb = layout.record_bytes(d);
  const int64_t sb = slots.slot_bytes;
  const int64_t num_exact = seq_len - exact_start;
  const int64_t num_demoted = num_exact - num_kept;
  const int64_t old_slots = (num_vague * rb + sb - 1) / sb;
  const int64_t new_slots = (keep_vague * rb + sb - 1) / sb;

  at::parallel_for(0, num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> exact(num_exact * sb), old(old_slots * sb);
    std::vector<uint8_t> records((num_vague + num_demoted) * rb);
    std::vector<uint8_t> pages(new_slots * sb);
    std::vector<float> kf(d), vf(d);
    for (int64_t h = begin; h < end; ++h) {
      // Sources first: the new layout overwrites them.
      slots.read(h, exact_start, num_exact, exact.data());
      slots.read(h, 0, old_slots, old.data());
      std::memcpy(records.data(), old.data(), num_vague * rb);

      // The demoted exact tokens become records (as quantize_records).
      const int64_t* keep = kept + h * num_kept;
      int64_t next_kept = 0, n = num_vague;
      for (int64_t e = 0; e < num_exact; ++e) {
        if (next_kept < num_kept && keep[next_kept] == e) {
          ++next_kept;
          continue;
        }
        const uint8_t* slot = &exact[e * sb];
        const auto* kv = reinterpret_cast<const scalar_t*>(slot);
        for (int64_t i = 0; i < d; ++i) {
          kf[i] = static_cast<float>(kv[i]);
          vf[i] = static_cast<float>(kv[d + i]);
        }
        int32_t position;
        float score;
        std::memcpy(&position, slot + sb - kSlotMetaBytes, 4);
        std::memcpy(&score, slot + sb - 4, 4);
        encode_record(kf.data(), vf.data(), position, score, d, layout, &records[n++ * rb]);
      }

      // Records in position order, ranked by pooled score: the keep_vague best
      // (ties: the older) survive, in position order, their scores reset.
      std::vector<int64_t> order(n);
      std::iota(order.begin(), order.end(), 0);
      auto position = [&](int64_t i) {
        int32_t p;
        std::memcpy(&p, &records[i * rb + rb - kSlotMetaBytes], 4);
        return p;
      };
      std::sort(order.begin(), order.end(),
                [&](int64_t a, int64_t b) { return position(a) < position(b); });
      std::vector<float> scores(n);
      for (int64_t i = 0; i < n; ++i)
        std::memcpy(&scores[i], &records[order[i] * rb + rb - 4], 4);
      const std::vector<float> ranked = pooled(scores, pool_before, pool_after, pool_decay);
      std::vector<int64_t> best(n);
      std::iota(best.begin(), best.end(), 0);
      std::stable_sort(best.begin(), best.end(),
                       [&](int64_t a, int64_t b) { return ranked[a] > ranked[b]; });
      best.resize(keep_vague);
      std::sort(best.begin(), best.end());

      std::fill(pages.begin(), pages.end(), 0);
      for (int64_t i = 0; i < keep_vague; ++i) {
        uint8_t* rec = &pages[i * rb];
        std::memcpy(rec, &records[order[best[i]] * rb], rb - 4);  // score stays 0
      }
      slots.write(h, 0, new_slots, pages.data());
      for (int64_t i = 0; i < num_kept; ++i) {
        uint8_t* dst = slots.slot(h, new_slots + i);
        std::memcpy(dst, &exact[keep[i] * sb], sb);
        std::memset(dst + sb - 4, 0, 4);  // score
      }
    }
  });
}

}  // namespace

void compact_slots_cpu(torch::Tensor kv_cache, const torch::Tensor& block_row,
                       const torch::Tensor& kept_slots) {
  const CheckedCompaction args = check_compact_slots(kv_cache, block_row, kept_slots);
  const torch::Tensor& kept = args.kept;
  const RequestSlots slots = request_slots(kv_cache, args.row);
  const int64_t keep = kept.size(1), sb = slots.slot_bytes;
  const int64_t* kp = kept.data_ptr<int64_t>();
  at::parallel_for(0, kv_cache.size(1), 1, [&](int64_t begin, int64_t end) {
    for (int64_t h = begin; h < end; ++h)
      // In place, in ascending order: kept slots ascend, so kept[i] >= i, and
      // slot i is the source only of moves j <= i, all done before it is written.
      for (int64_t i = 0; i < keep; ++i) {
        uint8_t* dst = slots.slot(h, i);
        const int64_t src = kp[h * keep + i];
        if (src != i) std::memcpy(dst, slots.slot(h, src), sb);
        std::memset(dst + sb - 4, 0, 4);  // score
      }
  });
}

void compact_quantized_cpu(torch::Tensor kv_cache, const torch::Tensor& block_row,
                           int64_t exact_start, int64_t seq_len, int64_t num_vague,
                           const torch::Tensor& kept_exact, int64_t keep_vague, int64_t bits,
                           int64_t group, int64_t value_bits, int64_t pool_before,
                           int64_t pool_after, double pool_decay) {
  const CheckedCompaction args =
      check_compact_quantized(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                              keep_vague, bits, group, value_bits, pool_before, pool_after,
                              pool_decay);
  const torch::Tensor& kept = args.kept;
  const int64_t num_kept = kept.size(1);
  const RecordLayout layout{bits, group, value_bits};
  const RequestSlots slots = request_slots(kv_cache, args.row);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::ScalarType::BFloat16, at::ScalarType::Half, kv_cache.scalar_type(),
      "kvreviver_compact_quantized", [&] {
        compact_quantized_kernel<scalar_t>(kv_cache, slots, exact_start, seq_len, num_vague,
                                           kept.data_ptr<int64_t>(), num_kept, keep_vague,
                                           layout, pool_before, pool_after, pool_decay);
      });
}

TORCH_LIBRARY_IMPL(kvreviver, CPU, m) {
  m.impl("compact_slots", static_cast<op::compact_slots*>(&compact_slots_cpu));
  m.impl("compact_quantized", static_cast<op::compact_quantized*>(&compact_quantized_cpu));
}

}  // namespace kvreviver
