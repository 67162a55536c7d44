// The per-group arithmetic of a quantized record (scale, min and codes of one
// channel group), ONE definition for the CPU kernels (quantized_records.h) and
// the CUDA kernels (vague_store_kernels.cu), so the CPU tests, which compare
// records byte for byte with the PyTorch reference, check the source the GPU
// runs. The rounding rule is the reference's: kvreviver_vllm/ops/reference.py,
// quantize_groups. Every operation here is one IEEE float32 operation rounded
// to nearest even; fp16 conversion rounds to nearest even; no fused
// multiply-add, no reciprocal, no fast-math. On the device that is spelled
// out with the _rn intrinsics (nvcc would otherwise be free to contract, and
// --use_fast_math would turn `/` into an approximate division); on the host
// these are plain operators (the CPU build has no -ffast-math, and no
// expression here has a product that could be contracted).
// No torch headers: nvcc compiles the .cu files without them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "host_device.h"

#ifdef __CUDACC__
#include <cuda_fp16.h>
#endif

namespace kvreviver {

// fp16 bits of x, rounded to nearest, ties to even (Tensor.half(), c10::Half,
// __float2half_rn); NaN becomes a quiet NaN, overflow infinity.
inline KVR_HOST_DEVICE uint16_t float_to_half_bits(float x) {
#ifdef __CUDA_ARCH__
  return __half_as_ushort(__float2half_rn(x));
#else
  // Integer-only, so no FP environment or compiler flag can change it.
  uint32_t w;
  std::memcpy(&w, &x, 4);
  const uint32_t sign = (w >> 16) & 0x8000u, mag = w & 0x7fffffffu;
  if (mag > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);  // NaN
  if (mag >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520: inf
  if (mag >= 0x38800000u) {  // a normal fp16 (>= 2**-14): rebias, round 13 bits off
    const uint32_t m = mag - 0x38000000u;
    return static_cast<uint16_t>(sign | ((m + 0xfffu + ((m >> 13) & 1u)) >> 13));
  }
  if (mag <= 0x33000000u) return static_cast<uint16_t>(sign);  // <= 2**-25: zero (tie to even)
  // A subnormal fp16: units of 2**-24, the float's significand shifted right.
  const uint32_t significand = (mag & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - (mag >> 23);  // 14..24
  const uint32_t q = significand >> shift, rest = significand & ((1u << shift) - 1u);
  const uint32_t half_unit = 1u << (shift - 1u);
  const uint32_t up = rest > half_unit || (rest == half_unit && (q & 1u));
  return static_cast<uint16_t>(sign | (q + up));
#endif
}

// The float value of fp16 bits h (exact).
inline KVR_HOST_DEVICE float half_bits_to_float(uint16_t h) {
#ifdef __CUDA_ARCH__
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, w;
  if (exp == 0x1f) {
    w = sign | 0x7f800000u | (man << 13);  // inf, NaN
  } else if (exp != 0) {
    w = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    w = sign;
  } else {  // subnormal: normalize
    exp = 113u;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    w = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float x;
  std::memcpy(&x, &w, 4);
  return x;
#endif
}

// a - b and a / b, each rounded once to nearest even.
inline KVR_HOST_DEVICE float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fsub_rn(a, b);  // never contracted into an fma
#else
  return a - b;
#endif
}

inline KVR_HOST_DEVICE float div_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(a, b);  // IEEE division even under --use_fast_math / -prec-div=false
#else
  return a / b;
#endif
}

// Round to nearest integer, ties to even (torch.round).
inline KVR_HOST_DEVICE float round_even(float x) {
#ifdef __CUDA_ARCH__
  return rintf(x);
#else
  return std::nearbyint(x);  // the default rounding mode: to nearest even
#endif
}

// Stores fp16 bits little-endian (the records' byte order) at p (no alignment).
inline KVR_HOST_DEVICE void store_half_bits(uint16_t h, uint8_t* p) {
  p[0] = static_cast<uint8_t>(h & 0xffu);
  p[1] = static_cast<uint8_t>(h >> 8);
}

// Smallest and largest of x[0, n), n >= 1 (first occurrence on ties, as std::min_element).
inline KVR_HOST_DEVICE void group_min_max(const float* x, int64_t n, float* mn, float* mx) {
  float lo = x[0], hi = x[0];
  for (int64_t i = 1; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = hi < x[i] ? x[i] : hi;
  }
  *mn = lo;
  *mx = hi;
}

// One group's fp16 min and scale, and the divisor its codes use
// (reference.py quantize_groups: lo = min.half(); scale = ((max - lo) / levels).half();
// safe = max(scale, 1e-8)).
struct GroupParams {
  uint16_t lo_bits, scale_bits;  // what the record stores
  float lo, safe;                // what the codes are computed with
};

inline KVR_HOST_DEVICE GroupParams group_params(float mn, float mx, float levels) {
  GroupParams p;
  p.lo_bits = float_to_half_bits(mn);
  p.lo = half_bits_to_float(p.lo_bits);
  p.scale_bits = float_to_half_bits(div_rn(sub_rn(mx, p.lo), levels));
  const float scale = half_bits_to_float(p.scale_bits);
  p.safe = scale < 1e-8f ? 1e-8f : scale;
  return p;
}

// The code of x: round_even((x - lo) / safe) clamped to [0, levels] (NaN: 0).
inline KVR_HOST_DEVICE uint32_t group_code(float x, const GroupParams& p, float levels) {
  float q = round_even(div_rn(sub_rn(x, p.lo), p.safe));
  q = q > 0.f ? q : 0.f;
  q = q < levels ? q : levels;
  return static_cast<uint32_t>(q);
}

// Quantizes one group x[0, group) at `bits` bits: its codes packed little-endian
// into codes[0, group * bits / 8) (whole bytes: every byte is written, none
// beyond), its fp16 scale and min (little-endian) at scale[0, 2) and lo[0, 2).
inline KVR_HOST_DEVICE void quantize_group(const float* x, int64_t group, int bits,
                                           uint8_t* codes, uint8_t* scale, uint8_t* lo) {
  const float levels = static_cast<float>((1 << bits) - 1);
  float mn, mx;
  group_min_max(x, group, &mn, &mx);
  const GroupParams p = group_params(mn, mx, levels);
  store_half_bits(p.scale_bits, scale);
  store_half_bits(p.lo_bits, lo);
  for (int64_t b = 0; b < group * bits / 8; ++b) codes[b] = 0;
  for (int64_t i = 0; i < group; ++i) {
    const int64_t bit = i * bits;
    const uint32_t code = group_code(x[i], p, levels) << (bit & 7);
    codes[bit >> 3] |= static_cast<uint8_t>(code & 0xffu);
    if (code >> 8) codes[(bit >> 3) + 1] |= static_cast<uint8_t>(code >> 8);
  }
}

}  // namespace kvreviver
