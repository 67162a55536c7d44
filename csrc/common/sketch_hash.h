// The Count Sketch's hash, one formula for the CPU kernels and the CUDA ones.
// No torch headers: nvcc compiles the .cu files on raw pointers without them.
// Reference: kvreviver_vllm/ops/reference.py (positions and coefficients lie in
// [0, kSketchPrime), checked by op_checks.h).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace kvreviver {

constexpr int64_t kSketchPrime = 2147483647;  // 2**31 - 1: sketch hash modulus

// Bucket of position p in the sketch row of coefficients c[4]. The first
// modulus (a constant) leaves < 2**31, so the second, by a runtime value, can
// be a 32-bit division: a few times cheaper.
inline KVR_HOST_DEVICE int64_t sketch_bucket(const int64_t* c, int64_t p, int64_t buckets) {
  return static_cast<uint32_t>((c[0] * p + c[1]) % kSketchPrime) %
         static_cast<uint32_t>(buckets);
}

// Sign (+1 or -1) of position p in the sketch row of coefficients c[4].
inline KVR_HOST_DEVICE float sketch_sign(const int64_t* c, int64_t p) {
  return 1.f - 2.f * static_cast<float>((c[2] * p + c[3]) % kSketchPrime % 2);
}

}  // namespace kvreviver
