// Torch binding of the CUDA kernels: built only against a CUDA torch (the CPU
// wheel lacks c10/cuda). Validates arguments, then hands raw pointers and the
// current stream to attention_kernels.cu.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "attention_kernels.cuh"

namespace kvreviver {
namespace {

cuda::DType dtype_of(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return cuda::DType::kFloat32;
    case torch::kFloat16: return cuda::DType::kFloat16;
    case torch::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "unsupported dtype ", t.scalar_type());
  }
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

void write_kv_cuda(torch::Tensor kv_cache, const torch::Tensor& key,
                   const torch::Tensor& value, const torch::Tensor& slot_mapping,
                   const torch::Tensor& positions) {
  check_slot_cache(kv_cache, key.size(2));
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  const auto k = key.to(kv_cache.scalar_type()).contiguous();
  const auto v = value.to(kv_cache.scalar_type()).contiguous();
  const auto slots = slot_mapping.to(kv_cache.device(), torch::kInt64).contiguous();
  const auto pos = positions.to(kv_cache.device(), torch::kInt64).contiguous();
  check(cuda::launch_write_kv(dtype_of(kv_cache), kv_cache.data_ptr(), k.data_ptr(),
                              v.data_ptr(), slots.data_ptr<int64_t>(),
                              pos.data_ptr<int64_t>(), k.size(0), k.size(1),
                              k.size(2), kv_cache.size(2), kv_cache.size(3),
                              c10::cuda::getCurrentCUDAStream()),
        "kvreviver::write_kv");
}

void launch_attention(torch::Tensor& out, const torch::Tensor& query,
                      const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                      const torch::Tensor& seq_lens, const torch::Tensor& query_start_loc,
                      double scale, int64_t score_window, cuda::QuantizedStoreArgs store) {
  TORCH_CHECK(query.dim() == 3 && out.sizes() == query.sizes(),
              "query and out must both be [tokens, heads, head_size]");
  TORCH_CHECK(query.stride(2) == 1 && out.stride(2) == 1,
              "query and out must be contiguous in the head dimension");
  TORCH_CHECK(query.size(2) % 32 == 0 && query.size(2) <= 256,
              "head_size ", query.size(2), " unsupported on CUDA: multiples of 32 up to 256");
  check_slot_cache(kv_cache, query.size(2));
  const auto table = block_table.to(query.device(), torch::kInt32).contiguous();
  const auto lens = seq_lens.to(query.device(), torch::kInt32).contiguous();
  const auto qsl = query_start_loc.to(query.device(), torch::kInt32).contiguous();
  check(cuda::launch_paged_attention(
            dtype_of(query), out.data_ptr(), query.data_ptr(), kv_cache.data_ptr(),
            table.data_ptr<int32_t>(), lens.data_ptr<int32_t>(),
            qsl.data_ptr<int32_t>(), query.size(0), lens.size(0), query.size(1),
            kv_cache.size(1), query.size(2), kv_cache.size(2), kv_cache.size(3),
            table.size(1), query.stride(0), query.stride(1), out.stride(0),
            out.stride(1), static_cast<float>(scale), score_window, store,
            c10::cuda::getCurrentCUDAStream()),
        "kvreviver::paged_attention");
}

void paged_attention_cuda(torch::Tensor out, const torch::Tensor& query,
                          const torch::Tensor& kv_cache, const torch::Tensor& block_table,
                          const torch::Tensor& seq_lens,
                          const torch::Tensor& query_start_loc, double scale,
                          int64_t score_window) {
  const c10::cuda::CUDAGuard guard(query.device());
  launch_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc, scale,
                   score_window, cuda::QuantizedStoreArgs{});
}

void paged_attention_quantized_cuda(
    torch::Tensor out, const torch::Tensor& query, const torch::Tensor& kv_cache,
    const torch::Tensor& block_table, const torch::Tensor& exact_start,
    const torch::Tensor& seq_lens, const torch::Tensor& vague_tokens,
    const torch::Tensor& query_start_loc, double scale, int64_t score_window,
    int64_t bits, int64_t group, int64_t value_bits) {
  check_store_layout(query.size(2), bits, group, value_bits);
  const c10::cuda::CUDAGuard guard(query.device());
  const auto starts = exact_start.to(query.device(), torch::kInt32).contiguous();
  const auto counts = vague_tokens.to(query.device(), torch::kInt32).contiguous();
  launch_attention(out, query, kv_cache, block_table, seq_lens, query_start_loc, scale,
                   score_window,
                   cuda::QuantizedStoreArgs{starts.data_ptr<int32_t>(),
                                            counts.data_ptr<int32_t>(),
                                            static_cast<int>(bits), static_cast<int>(group),
                                            static_cast<int>(value_bits ? value_bits : bits)});
}

TORCH_LIBRARY_IMPL(kvreviver, CUDA, m) {
  m.impl("paged_attention", static_cast<op::paged_attention*>(&paged_attention_cuda));
  m.impl("paged_attention_quantized",
         static_cast<op::paged_attention_quantized*>(&paged_attention_quantized_cuda));
  m.impl("write_kv", static_cast<op::write_kv*>(&write_kv_cuda));
}

}  // namespace kvreviver
