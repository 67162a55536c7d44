// (De)quantization of the quantized vague store's records for the CPU kernels
// (kvreviver_vllm/ops/reference.py: quantize_records); their layout (record_layout.h)
// and the per-group quantization arithmetic (quantize_group.h) are shared with
// the CUDA kernels. Codes are packed little-endian, quantized
// asymmetrically per group of channels.
#pragma once

#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "quantize_group.h"
#include "record_layout.h"

namespace kvreviver {

inline float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return static_cast<float>(c10::Half(h, c10::Half::from_bits()));
}

// Unpacks `d` codes of kBits bits (whole codes per byte) and dequantizes them
// with per-group (scale, min) into out[0, d).
template <int kBits>
inline void dequantize_aligned(const uint8_t* codes, const uint8_t* scale, const uint8_t* lo,
                               int64_t d, int64_t group, float* out) {
  constexpr int kPerByte = 8 / kBits;
  constexpr uint32_t kMask = (1u << kBits) - 1;
  for (int64_t g = 0; g < d / group; ++g) {
    const float s = half_to_float(scale + 2 * g), m = half_to_float(lo + 2 * g);
    const uint8_t* bytes = codes + g * group / kPerByte;
    float* o = out + g * group;
    for (int64_t b = 0; b < group / kPerByte; ++b) {
      const uint32_t byte = bytes[b];
      for (int k = 0; k < kPerByte; ++k)
        o[b * kPerByte + k] = static_cast<float>((byte >> (k * kBits)) & kMask) * s + m;
    }
  }
}

#if defined(__AVX2__)
// dequantize_aligned<4> for groups of a multiple of 16 channels, 16 codes (8
// bytes) per step: revival runs this for every vague token of every decode
// step. Same expression as the scalar loop (code * scale + min; the compiler
// may fuse it into an FMA in either).
inline void dequantize_4bit_avx2(const uint8_t* codes, const uint8_t* scale, const uint8_t* lo,
                                 int64_t d, int64_t group, float* out) {
  const __m128i nibble = _mm_set1_epi8(0x0f);
  for (int64_t g = 0; g < d / group; ++g) {
    const __m256 s = _mm256_set1_ps(half_to_float(scale + 2 * g));
    const __m256 m = _mm256_set1_ps(half_to_float(lo + 2 * g));
    for (int64_t i = g * group; i < (g + 1) * group; i += 16) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + i / 2));
      // Channel 2b is byte b's low nibble, channel 2b + 1 its high one.
      const __m128i in_order = _mm_unpacklo_epi8(
          _mm_and_si128(bytes, nibble), _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
      const __m256 c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(in_order));
      const __m256 c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(in_order, 8)));
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_mul_ps(c0, s), m));
      _mm256_storeu_ps(out + i + 8, _mm256_add_ps(_mm256_mul_ps(c1, s), m));
    }
  }
}
#endif

// dequantize for 3-bit codes in groups of a multiple of 8 channels: 8 codes fill
// 3 bytes, read as one 24-bit word, so no code needs a test for straddling.
inline void dequantize_3bit(const uint8_t* codes, const uint8_t* scale, const uint8_t* lo,
                            int64_t d, int64_t group, float* out) {
  for (int64_t g = 0; g < d / group; ++g) {
    const float s = half_to_float(scale + 2 * g), m = half_to_float(lo + 2 * g);
    for (int64_t i = g * group; i < (g + 1) * group; i += 8) {
      const uint8_t* b = codes + i / 8 * 3;
      const uint32_t word = b[0] | static_cast<uint32_t>(b[1]) << 8 |
                            static_cast<uint32_t>(b[2]) << 16;
      for (int k = 0; k < 8; ++k)
        out[i + k] = static_cast<float>((word >> (3 * k)) & 7u) * s + m;
    }
  }
}

// Unpacks `d` codes of `bits` bits from a little-endian bit stream and
// dequantizes them with per-group (scale, min) into out[0, d). Every width
// check_store_layout admits (2, 3, 4, 8; a group of whole code bytes, so 3-bit
// groups are multiples of 8 channels) has a path without per-code straddle tests.
inline void dequantize(const uint8_t* codes, const uint8_t* scale, const uint8_t* lo,
                       int64_t d, int64_t bits, int64_t group, float* out) {
  switch (bits) {
    case 2: return dequantize_aligned<2>(codes, scale, lo, d, group, out);
    case 3: return dequantize_3bit(codes, scale, lo, d, group, out);
    case 4:
#if defined(__AVX2__)
      if (group % 16 == 0) return dequantize_4bit_avx2(codes, scale, lo, d, group, out);
#endif
      return dequantize_aligned<4>(codes, scale, lo, d, group, out);
    case 8: return dequantize_aligned<8>(codes, scale, lo, d, group, out);
    default: break;  // refused by check_store_layout before any kernel runs
  }
}

// Quantizes x[0, d) per group and packs the codes into `codes`, scales and
// mins into `scale` / `lo`. The arithmetic is quantize_group
// (quantize_group.h), the same function the CUDA kernel runs, so the tests of
// these CPU kernels against the reference check the GPU's rounding too. group
// * bits is whole bytes (check_store_layout), so each group's codes start on a
// byte.
inline void quantize(const float* x, int64_t d, int64_t bits, int64_t group, uint8_t* codes,
                     uint8_t* scale, uint8_t* lo) {
  for (int64_t g = 0; g < d / group; ++g) {
    quantize_group(x + g * group, group, static_cast<int>(bits), codes + g * group * bits / 8,
                   scale + 2 * g, lo + 2 * g);
  }
}

// One whole record: keys and values [d] quantized, then position and score.
inline void encode_record(const float* k, const float* v, int32_t position, float score,
                          int64_t d, const RecordLayout& layout, uint8_t* rec) {
  const int64_t cb = layout.key_code_bytes(d), ng = d / layout.group;
  uint8_t* params = rec + layout.params_offset(d);
  quantize(k, d, layout.key_bits(), layout.group, rec, params, params + 2 * ng);
  quantize(v, d, layout.val_bits(), layout.group, rec + cb, params + 4 * ng, params + 6 * ng);
  const int64_t rb = layout.record_bytes(d);
  std::memcpy(rec + rb - 8, &position, 4);
  std::memcpy(rec + rb - 4, &score, 4);
}

// The keys [d] of one record, dequantized.
inline void decode_keys(const uint8_t* rec, int64_t d, const RecordLayout& layout, float* k) {
  const uint8_t* params = rec + layout.params_offset(d);
  dequantize(rec, params, params + 2 * (d / layout.group), d, layout.key_bits(), layout.group, k);
}

// The values [d] of one record, dequantized.
inline void decode_values(const uint8_t* rec, int64_t d, const RecordLayout& layout, float* v) {
  const int64_t ng = d / layout.group;
  const uint8_t* params = rec + layout.params_offset(d);
  dequantize(rec + layout.key_code_bytes(d), params + 4 * ng, params + 6 * ng, d,
             layout.val_bits(), layout.group, v);
}

// Keys and values [d] of one record, dequantized.
inline void decode_record(const uint8_t* rec, int64_t d, const RecordLayout& layout, float* k,
                          float* v) {
  decode_keys(rec, d, layout, k);
  decode_values(rec, d, layout, v);
}

}  // namespace kvreviver
