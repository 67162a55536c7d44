// Torch binding of compaction on CUDA (built only against a CUDA torch):
// validates arguments as the CPU ops do (op_checks.h); slots move through
// compaction_kernels.cu, records are made by the quantize kernel of
// vague_store_kernels.cu, and the ranking (position order, pooled scores,
// stable top-k) runs as ATen ops on the GPU. Semantics: kvreviver_vllm/ops/reference.py
// (compact_slots, compact_quantized).

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <limits>

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "../common/quantized_records.h"
#include "compaction_kernels.cuh"
#include "vague_store_kernels.cuh"

namespace kvreviver {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

cuda::SlotSpace slot_space(torch::Tensor& kv_cache, const torch::Tensor& row) {
  return {static_cast<uint32_t*>(kv_cache.data_ptr()), row.data_ptr<int64_t>(),
          static_cast<int>(kv_cache.size(1)), static_cast<int>(kv_cache.size(2)),
          static_cast<int>(kv_cache.size(3) * kv_cache.element_size() / 4)};
}

// Slots [heads, n, slot bytes] (uint8) of `indices` [heads, n] or of [first, first + n).
torch::Tensor gather(const cuda::SlotSpace& space, const torch::Tensor& like,
                     const torch::Tensor* indices, int64_t first, int64_t n) {
  auto out = torch::empty({space.num_kv_heads, n, space.slot_words * 4},
                          like.options().dtype(torch::kUInt8));
  check(cuda::launch_gather_slots(space, indices ? indices->data_ptr<int64_t>() : nullptr, first,
                                  n, reinterpret_cast<uint32_t*>(out.data_ptr<uint8_t>()),
                                  c10::cuda::getCurrentCUDAStream()),
        "kvreviver gather_slots");
  return out;
}

void scatter(const cuda::SlotSpace& space, int64_t first, const torch::Tensor& slots,
             bool reset_scores) {
  const auto src = slots.contiguous();
  check(cuda::launch_scatter_slots(space, first, src.size(1),
                                   reinterpret_cast<const uint32_t*>(src.data_ptr<uint8_t>()),
                                   reset_scores, c10::cuda::getCurrentCUDAStream()),
        "kvreviver scatter_slots");
}

}  // namespace

void compact_slots_cuda(torch::Tensor kv_cache, const torch::Tensor& block_row,
                        const torch::Tensor& kept_slots) {
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const CheckedCompaction args = check_compact_slots(kv_cache, block_row, kept_slots);
  const torch::Tensor& kept = args.kept;
  const auto space = slot_space(kv_cache, args.row);
  // Gathered first: a kept slot may be overwritten before it is read.
  scatter(space, 0, gather(space, kv_cache, &kept, 0, kept.size(1)), true);
}

void compact_quantized_cuda(torch::Tensor kv_cache, const torch::Tensor& block_row,
                            int64_t exact_start, int64_t seq_len, int64_t num_vague,
                            const torch::Tensor& kept_exact, int64_t keep_vague, int64_t bits,
                            int64_t group, int64_t value_bits, int64_t pool_before,
                            int64_t pool_after, double pool_decay) {
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const CheckedCompaction args =
      check_compact_quantized(kv_cache, block_row, exact_start, seq_len, num_vague, kept_exact,
                              keep_vague, bits, group, value_bits, pool_before, pool_after,
                              pool_decay);
  const torch::Tensor& kept = args.kept;
  const int64_t new_slots = args.new_slots;
  const int64_t heads = kv_cache.size(1), num_exact = std::max<int64_t>(0, seq_len - exact_start);
  const int64_t num_kept = kept.size(1), num_demoted = num_exact - num_kept;
  const int64_t sb = kv_cache.size(3) * kv_cache.element_size();
  const int64_t d = slot_head_size(kv_cache);
  const RecordLayout layout{bits, group, value_bits};
  const int64_t rb = layout.record_bytes(d);
  const auto space = slot_space(kv_cache, args.row);

  const auto exact = gather(space, kv_cache, nullptr, exact_start, num_exact);  // [H, E, sb]
  const auto old = gather(space, kv_cache, nullptr, 0, (num_vague * rb + sb - 1) / sb)
                       .view({heads, -1})
                       .narrow(1, 0, num_vague * rb)
                       .view({heads, num_vague, rb});
  // The demoted exact slots, in position order, become records.
  auto demoted_mask = torch::ones({heads, num_exact}, kept.options().dtype(torch::kBool));
  demoted_mask.scatter_(1, kept, false);
  const auto demoted_at = demoted_mask.nonzero().select(1, 1).view({heads, num_demoted});
  const auto demoted = exact.gather(1, demoted_at.unsqueeze(2).expand({heads, num_demoted, sb}));
  const auto kv = demoted.narrow(2, 0, sb - kSlotMetaBytes).view(kv_cache.scalar_type())
                      .to(torch::kFloat32).reshape({heads * num_demoted, 2 * d});
  const auto keys = kv.narrow(1, 0, d).contiguous(), values = kv.narrow(1, d, d).contiguous();
  const auto meta = demoted.narrow(2, sb - kSlotMetaBytes, kSlotMetaBytes).contiguous();
  const auto positions = meta.narrow(2, 0, 4).contiguous().view(torch::kInt32).reshape({-1});
  const auto scores = meta.narrow(2, 4, 4).contiguous().view(torch::kFloat32).reshape({-1});
  auto fresh = torch::empty({heads * num_demoted, rb}, kv_cache.options().dtype(torch::kUInt8));
  check(cuda::launch_quantize_records(keys.data_ptr<float>(), values.data_ptr<float>(),
                                      positions.data_ptr<int32_t>(), scores.data_ptr<float>(),
                                      fresh.data_ptr<uint8_t>(), heads * num_demoted,
                                      static_cast<int>(d), static_cast<int>(bits),
                                      static_cast<int>(layout.val_bits()), static_cast<int>(group),
                                      c10::cuda::getCurrentCUDAStream()),
        "kvreviver quantize_records");

  // Old and new records in position order, ranked by pooled score; the
  // keep_vague best (ties: the older) stay, in position order, scores reset.
  auto records = torch::cat({old, fresh.view({heads, num_demoted, rb})}, 1);
  const auto rec_meta = records.narrow(2, rb - kSlotMetaBytes, kSlotMetaBytes).contiguous();
  const auto rec_positions = rec_meta.narrow(2, 0, 4).contiguous().view(torch::kInt32).squeeze(2);
  const auto order = torch::argsort(rec_positions, /*stable=*/true, /*dim=*/1);
  records = records.gather(1, order.unsqueeze(2).expand({heads, order.size(1), rb}));
  const auto rec_scores = rec_meta.narrow(2, 4, 4).contiguous().view(torch::kFloat32).squeeze(2)
                              .gather(1, order);
  std::vector<int64_t> best_sizes{heads, keep_vague};
  torch::Tensor best;
  if (rec_scores.size(1) > 0) {
    // policy.pooled_scores: max(own, pool_decay * the max over records
    // [i - pool_after, i + pool_before]).
    const auto padded = torch::constant_pad_nd(rec_scores.unsqueeze(1), {pool_after, pool_before},
                                               -std::numeric_limits<double>::infinity());
    auto pooled = torch::max_pool1d(padded, {pool_before + pool_after + 1}, {1}).squeeze(1);
    if (pool_decay != 1) pooled = torch::maximum(rec_scores, pooled * pool_decay);
    const auto ranked = std::get<1>(torch::sort(pooled, /*stable=*/true, /*dim=*/1,
                                                /*descending=*/true));
    best = std::get<0>(torch::sort(ranked.narrow(1, 0, keep_vague), /*dim=*/1));
  } else {
    best = torch::empty(best_sizes, order.options());
  }
  auto chosen = records.gather(1, best.unsqueeze(2).expand({heads, keep_vague, rb}));
  chosen.narrow(2, rb - 4, 4).zero_();
  auto pages = torch::zeros({heads, new_slots * sb}, chosen.options());
  pages.narrow(1, 0, keep_vague * rb).copy_(chosen.view({heads, keep_vague * rb}));
  scatter(space, 0, pages.view({heads, new_slots, sb}), false);
  scatter(space, new_slots, exact.gather(1, kept.unsqueeze(2).expand({heads, num_kept, sb})),
          true);
}

TORCH_LIBRARY_IMPL(kvreviver, CUDA, m) {
  m.impl("compact_slots", static_cast<op::compact_slots*>(&compact_slots_cuda));
  m.impl("compact_quantized", static_cast<op::compact_quantized*>(&compact_quantized_cuda));
}

}  // namespace kvreviver
