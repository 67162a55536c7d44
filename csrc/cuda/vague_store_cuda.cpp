// Torch binding of the CUDA vague-store kernels (built only against a CUDA
// torch): validates arguments as the CPU ops do, then launches
// vague_store_kernels.cu on the current stream.

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>
#include <torch/torch.h>

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "../common/quantized_records.h"
#include "vague_store_kernels.cuh"

namespace kvreviver {
namespace {

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace

torch::Tensor quantize_records_cuda(const torch::Tensor& keys, const torch::Tensor& values,
                                    const torch::Tensor& positions, const torch::Tensor& scores,
                                    int64_t bits, int64_t group, int64_t value_bits) {
  check_record_inputs(keys, values, positions, scores, bits, group, value_bits);
  const int64_t n = keys.size(0), d = keys.size(1);
  const c10::cuda::CUDAGuard guard(keys.device());
  const auto k = keys.to(torch::kFloat32).contiguous();
  const auto v = values.to(torch::kFloat32).contiguous();
  const auto pos = positions.to(keys.device(), torch::kInt32).contiguous();
  const auto sc = scores.to(keys.device(), torch::kFloat32).contiguous();
  const RecordLayout layout{bits, group, value_bits};
  auto records = torch::empty({n, layout.record_bytes(d)},
                              keys.options().dtype(torch::kUInt8));
  check(cuda::launch_quantize_records(k.data_ptr<float>(), v.data_ptr<float>(),
                                      pos.data_ptr<int32_t>(), sc.data_ptr<float>(),
                                      records.data_ptr<uint8_t>(), n, static_cast<int>(d),
                                      static_cast<int>(bits), static_cast<int>(layout.val_bits()),
                                      static_cast<int>(group),
                                      c10::cuda::getCurrentCUDAStream()),
        "kvreviver::quantize_records");
  return records;
}

std::tuple<torch::Tensor, torch::Tensor> dequantize_records_cuda(const torch::Tensor& records,
                                                                 int64_t head_size, int64_t bits,
                                                                 int64_t group,
                                                                 int64_t value_bits) {
  check_records(records, head_size, bits, group, value_bits);
  const c10::cuda::CUDAGuard guard(records.device());
  const auto rec = records.contiguous();
  const int64_t n = rec.size(0);
  auto keys = torch::empty({n, head_size}, rec.options().dtype(torch::kFloat32));
  auto values = torch::empty_like(keys);
  check(cuda::launch_dequantize_records(rec.data_ptr<uint8_t>(), keys.data_ptr<float>(),
                                        values.data_ptr<float>(), n,
                                        static_cast<int>(head_size), static_cast<int>(bits),
                                        static_cast<int>(value_bits ? value_bits : bits),
                                        static_cast<int>(group),
                                        c10::cuda::getCurrentCUDAStream()),
        "kvreviver::dequantize_records");
  return {keys, values};
}

void count_sketch_add_cuda(torch::Tensor bucket_keys, torch::Tensor bucket_values,
                           const torch::Tensor& keys, const torch::Tensor& values,
                           const torch::Tensor& positions, const torch::Tensor& coefficients) {
  check_sketch_add(bucket_keys, bucket_values, keys, values);
  const int64_t rows = bucket_keys.size(0), buckets = bucket_keys.size(1);
  const int64_t d = bucket_keys.size(2);
  const c10::cuda::CUDAGuard guard(bucket_keys.device());
  const auto device = bucket_keys.device();
  const auto k = keys.to(device, torch::kFloat32).contiguous();
  const auto v = values.to(device, torch::kFloat32).contiguous();
  const auto pos = sketch_positions(positions, keys.size(0), device);
  const auto coef = sketch_coefficients(coefficients, rows, device);
  check(cuda::launch_count_sketch_add(bucket_keys.data_ptr<float>(), bucket_values.data_ptr<float>(),
                                      k.data_ptr<float>(), v.data_ptr<float>(),
                                      pos.data_ptr<int64_t>(), coef.data_ptr<int64_t>(),
                                      k.size(0), static_cast<int>(rows),
                                      static_cast<int>(buckets), static_cast<int>(d),
                                      c10::cuda::getCurrentCUDAStream()),
        "kvreviver::count_sketch_add");
}

torch::Tensor count_sketch_estimate_cuda(const torch::Tensor& buckets,
                                         const torch::Tensor& positions,
                                         const torch::Tensor& coefficients) {
  const auto sums = buckets.to(torch::kFloat32).contiguous();
  check_buckets(sums, "buckets");
  const c10::cuda::CUDAGuard guard(sums.device());
  const int64_t rows = sums.size(0), nb = sums.size(1), d = sums.size(2);
  const auto pos = sketch_positions(positions, positions.numel(), sums.device());
  const auto coef = sketch_coefficients(coefficients, rows, sums.device());
  auto out = torch::empty({pos.numel(), d}, sums.options());
  check(cuda::launch_count_sketch_estimate(sums.data_ptr<float>(), pos.data_ptr<int64_t>(),
                                           coef.data_ptr<int64_t>(), out.data_ptr<float>(),
                                           pos.numel(), static_cast<int>(rows),
                                           static_cast<int>(nb), static_cast<int>(d),
                                           c10::cuda::getCurrentCUDAStream()),
        "kvreviver::count_sketch_estimate");
  return out;
}

torch::Tensor count_sketch_logits_cuda(const torch::Tensor& query,
                                       const torch::Tensor& bucket_keys,
                                       const torch::Tensor& positions,
                                       const torch::Tensor& coefficients) {
  const auto sums = bucket_keys.to(torch::kFloat32).contiguous();
  check_buckets(sums, "bucket_keys");
  const int64_t rows = sums.size(0), nb = sums.size(1), d = sums.size(2);
  TORCH_CHECK(query.dim() == 2 && query.size(1) == d, "query must be [Q, ", d, "]");
  const c10::cuda::CUDAGuard guard(sums.device());
  const auto q = query.to(sums.device(), torch::kFloat32).contiguous();
  const auto pos = sketch_positions(positions, positions.numel(), sums.device());
  const auto coef = sketch_coefficients(coefficients, rows, sums.device());
  // One dot product per (query, bucket) on cuBLAS, then a signed gather per token.
  const auto per_bucket = torch::matmul(q, sums.view({rows * nb, d}).t()).contiguous();
  auto out = torch::empty({q.size(0), pos.numel()}, sums.options());
  check(cuda::launch_count_sketch_gather(per_bucket.data_ptr<float>(), pos.data_ptr<int64_t>(),
                                         coef.data_ptr<int64_t>(), out.data_ptr<float>(),
                                         q.size(0), pos.numel(), static_cast<int>(rows),
                                         static_cast<int>(nb),
                                         c10::cuda::getCurrentCUDAStream()),
        "kvreviver::count_sketch_logits");
  return out;
}

TORCH_LIBRARY_IMPL(kvreviver, CUDA, m) {
  m.impl("quantize_records", static_cast<op::quantize_records*>(&quantize_records_cuda));
  m.impl("dequantize_records", static_cast<op::dequantize_records*>(&dequantize_records_cuda));
  m.impl("count_sketch_add", static_cast<op::count_sketch_add*>(&count_sketch_add_cuda));
  m.impl("count_sketch_estimate",
         static_cast<op::count_sketch_estimate*>(&count_sketch_estimate_cuda));
  m.impl("count_sketch_logits", static_cast<op::count_sketch_logits*>(&count_sketch_logits_cuda));
}

}  // namespace kvreviver
