// CPU kernels of the vague stores: insert (quantize + pack; signed sketch add)
// and reconstruction (dequantize; sketch estimate and bucket-space logits).
// Semantics: kvreviver_vllm/ops/reference.py (quantize_records, dequantize_records,
// count_sketch_add, count_sketch_estimate, count_sketch_logits).

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <vector>

#include "../common/op_checks.h"
#include "../common/ops.h"
#include "../common/quantized_records.h"
#include "../common/sketch_hash.h"

namespace kvreviver {
namespace {

// Bucket and sign of position p in each sketch row (coefficients [rows, 4]).
struct SketchHash {
  const int64_t* coefficients;
  int64_t buckets;

  int64_t bucket(int64_t r, int64_t p) const {
    return sketch_bucket(coefficients + 4 * r, p, buckets);
  }
  float sign(int64_t r, int64_t p) const { return sketch_sign(coefficients + 4 * r, p); }
};

}  // namespace

torch::Tensor quantize_records_cpu(const torch::Tensor& keys, const torch::Tensor& values,
                                   const torch::Tensor& positions, const torch::Tensor& scores,
                                   int64_t bits, int64_t group, int64_t value_bits) {
  check_record_inputs(keys, values, positions, scores, bits, group, value_bits);
  const int64_t n = keys.size(0), d = keys.size(1);
  const RecordLayout layout{bits, group, value_bits};
  const int64_t rb = layout.record_bytes(d);
  auto records = torch::empty({n, rb}, torch::kUInt8);
  const auto k = keys.to(torch::kFloat32).contiguous();
  const auto v = values.to(torch::kFloat32).contiguous();
  const auto pos = positions.to(torch::kInt32).contiguous();
  const auto sc = scores.to(torch::kFloat32).contiguous();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const int32_t* pp = pos.data_ptr<int32_t>();
  const float* sp = sc.data_ptr<float>();
  uint8_t* out = records.data_ptr<uint8_t>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      encode_record(kp + i * d, vp + i * d, pp[i], sp[i], d, layout, out + i * rb);
    }
  });
  return records;
}

std::tuple<torch::Tensor, torch::Tensor> dequantize_records_cpu(const torch::Tensor& records,
                                                                int64_t head_size, int64_t bits,
                                                                int64_t group,
                                                                int64_t value_bits) {
  check_records(records, head_size, bits, group, value_bits);
  const RecordLayout layout{bits, group, value_bits};
  const int64_t rb = layout.record_bytes(head_size);
  const auto rec = records.contiguous();
  const int64_t n = rec.size(0);
  auto keys = torch::empty({n, head_size}, torch::kFloat32);
  auto values = torch::empty({n, head_size}, torch::kFloat32);
  const uint8_t* rp = rec.data_ptr<uint8_t>();
  float* kp = keys.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      decode_record(rp + i * rb, head_size, layout, kp + i * head_size, vp + i * head_size);
    }
  });
  return {keys, values};
}

void count_sketch_add_cpu(torch::Tensor bucket_keys, torch::Tensor bucket_values,
                          const torch::Tensor& keys, const torch::Tensor& values,
                          const torch::Tensor& positions, const torch::Tensor& coefficients) {
  check_sketch_add(bucket_keys, bucket_values, keys, values);
  const int64_t rows = bucket_keys.size(0), buckets = bucket_keys.size(1);
  const int64_t d = bucket_keys.size(2);
  const int64_t n = keys.size(0);
  const auto pos = sketch_positions(positions, n, torch::kCPU);
  const auto coef = sketch_coefficients(coefficients, rows, torch::kCPU);
  const SketchHash hash{coef.data_ptr<int64_t>(), buckets};
  const auto k = keys.to(torch::kFloat32).contiguous();
  const auto v = values.to(torch::kFloat32).contiguous();
  const int64_t* pp = pos.data_ptr<int64_t>();
  // One task per (row, sums): each writes its own buckets, tokens in order.
  at::parallel_for(0, 2 * rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / 2;
      const float* src = (task % 2 ? v : k).data_ptr<float>();
      float* sums = (task % 2 ? bucket_values : bucket_keys).data_ptr<float>() + r * buckets * d;
      for (int64_t i = 0; i < n; ++i) {
        float* b = sums + hash.bucket(r, pp[i]) * d;
        const float s = hash.sign(r, pp[i]);
        for (int64_t j = 0; j < d; ++j) b[j] += s * src[i * d + j];
      }
    }
  });
}

torch::Tensor count_sketch_estimate_cpu(const torch::Tensor& buckets,
                                        const torch::Tensor& positions,
                                        const torch::Tensor& coefficients) {
  const auto sums = buckets.to(torch::kFloat32).contiguous();
  check_buckets(sums, "buckets");
  const int64_t rows = sums.size(0), nb = sums.size(1), d = sums.size(2);
  const int64_t n = positions.numel();
  const auto pos = sketch_positions(positions, n, torch::kCPU);
  const auto coef = sketch_coefficients(coefficients, rows, torch::kCPU);
  const SketchHash hash{coef.data_ptr<int64_t>(), nb};
  auto out = torch::zeros({n, d}, torch::kFloat32);
  const float* sp = sums.data_ptr<float>();
  const int64_t* pp = pos.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float* o = op + i * d;
      for (int64_t r = 0; r < rows; ++r) {
        const float* b = sp + (r * nb + hash.bucket(r, pp[i])) * d;
        const float s = hash.sign(r, pp[i]);
        for (int64_t j = 0; j < d; ++j) o[j] += s * b[j];
      }
      for (int64_t j = 0; j < d; ++j) o[j] /= static_cast<float>(rows);
    }
  });
  return out;
}

torch::Tensor count_sketch_logits_cpu(const torch::Tensor& query,
                                      const torch::Tensor& bucket_keys,
                                      const torch::Tensor& positions,
                                      const torch::Tensor& coefficients) {
  const auto sums = bucket_keys.to(torch::kFloat32).contiguous();
  check_buckets(sums, "bucket_keys");
  const int64_t rows = sums.size(0), nb = sums.size(1), d = sums.size(2);
  TORCH_CHECK(query.dim() == 2 && query.size(1) == d, "query must be [Q, ", d, "]");
  const auto q = query.to(torch::kFloat32).contiguous();
  const int64_t nq = q.size(0), n = positions.numel();
  const auto pos = sketch_positions(positions, n, torch::kCPU);
  const auto coef = sketch_coefficients(coefficients, rows, torch::kCPU);
  const SketchHash hash{coef.data_ptr<int64_t>(), nb};
  // One dot product per (query, bucket), then a signed gather per token.
  // Q and the bucket count are small: plain loops beat a GEMM call's overhead.
  std::vector<float> per_bucket(nq * rows * nb);
  const float* qp = q.data_ptr<float>();
  const float* sp = sums.data_ptr<float>();
  for (int64_t qi = 0; qi < nq; ++qi) {
    const float* x = qp + qi * d;
    for (int64_t b = 0; b < rows * nb; b += 2) {  // two independent dot products at a time
      const float* s0 = sp + b * d;
      const float* s1 = sp + std::min(b + 1, rows * nb - 1) * d;
      float d0 = 0.f, d1 = 0.f;
#pragma omp simd reduction(+ : d0, d1)
      for (int64_t j = 0; j < d; ++j) {
        d0 += x[j] * s0[j];
        d1 += x[j] * s1[j];
      }
      per_bucket[qi * rows * nb + b] = d0;
      if (b + 1 < rows * nb) per_bucket[qi * rows * nb + b + 1] = d1;
    }
  }
  const float* pb = per_bucket.data();
  std::vector<int64_t> index(rows * n);
  std::vector<float> sign(rows * n);
  const int64_t* pp = pos.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) {
      index[r * n + i] = r * nb + hash.bucket(r, pp[i]);
      sign[r * n + i] = hash.sign(r, pp[i]);
    }
  auto out = torch::zeros({nq, n}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  // Serial: a decode step's few query rows are less work than waking threads.
  for (int64_t qi = 0; qi < nq; ++qi) {
    const float* row = pb + qi * rows * nb;
    float* o = op + qi * n;
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) o[i] += sign[r * n + i] * row[index[r * n + i]];
    for (int64_t i = 0; i < n; ++i) o[i] /= static_cast<float>(rows);
  }
  return out;
}

TORCH_LIBRARY_IMPL(kvreviver, CPU, m) {
  m.impl("quantize_records", static_cast<op::quantize_records*>(&quantize_records_cpu));
  m.impl("dequantize_records", static_cast<op::dequantize_records*>(&dequantize_records_cpu));
  m.impl("count_sketch_add", static_cast<op::count_sketch_add*>(&count_sketch_add_cpu));
  m.impl("count_sketch_estimate",
         static_cast<op::count_sketch_estimate*>(&count_sketch_estimate_cpu));
  m.impl("count_sketch_logits", static_cast<op::count_sketch_logits*>(&count_sketch_logits_cpu));
}

}  // namespace kvreviver
