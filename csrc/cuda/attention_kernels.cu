// See attention_kernels.cuh. One thread block per (query token, query head);
// each warp walks a strided share of the request's keys with an online softmax,
// then the warps' partial results are merged in shared memory.

#include "attention_kernels.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>

#include "../common/record_layout.h"

namespace kvreviver::cuda {
namespace {

constexpr int kWarps = 4;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// The metadata of a slot starting at `slot`: int32 position, float32 score.
template <typename T>
__device__ __forceinline__ int32_t* slot_position(T* slot, int64_t head_size) {
  return reinterpret_cast<int32_t*>(slot + 2 * head_size);
}
template <typename T>
__device__ __forceinline__ float* slot_score(T* slot, int64_t head_size) {
  return reinterpret_cast<float*>(slot + 2 * head_size) + 1;
}

template <typename T>
__global__ void write_kv_kernel(T* __restrict__ cache, const T* __restrict__ key,
                                const T* __restrict__ value,
                                const int64_t* __restrict__ slots,
                                const int64_t* __restrict__ positions,
                                int64_t num_kv_heads, int64_t head_size,
                                int64_t block_size, int64_t slot_width) {
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0) return;
  const int64_t blk = slot / block_size, off = slot % block_size;
  for (int64_t i = threadIdx.x; i < num_kv_heads * head_size; i += blockDim.x) {
    const int64_t h = i / head_size, d = i % head_size;
    T* dst = cache + ((blk * num_kv_heads + h) * block_size + off) * slot_width;
    dst[d] = key[t * num_kv_heads * head_size + i];
    dst[head_size + d] = value[t * num_kv_heads * head_size + i];
    if (d == 0) {
      *slot_position(dst, head_size) = static_cast<int32_t>(positions[t]);
      *slot_score(dst, head_size) = 0.f;
    }
  }
}

// The byte stream of one request's store for one KV head: its first slots,
// in block-table order. A record may straddle two slots.
struct StoreBytes {
  uint8_t* cache;
  const int32_t* table_row;
  int64_t kv_head, num_kv_heads, block_size, slot_bytes;

  __device__ __forceinline__ uint8_t* at(int64_t offset) const {
    const int64_t s = offset / slot_bytes;
    const int64_t blk = table_row[s / block_size];
    return cache + ((blk * num_kv_heads + kv_head) * block_size + s % block_size) * slot_bytes +
           offset % slot_bytes;
  }
  __device__ __forceinline__ float half_at(int64_t offset) const {
    const uint16_t bits = *at(offset) | (static_cast<uint16_t>(*at(offset + 1)) << 8);
    return __half2float(__ushort_as_half(bits));
  }
};

// Channel c of the record at `rec`: codes at rec + codes, fp16 (scale, min)
// per group at rec + params (scales of all groups, then mins).
__device__ __forceinline__ float dequantize_channel(const StoreBytes& store, int64_t rec,
                                                    int64_t codes, int64_t params,
                                                    int64_t num_groups, int c, int bits,
                                                    int group) {
  const int64_t bit = static_cast<int64_t>(c) * bits;
  uint32_t word = *store.at(rec + codes + (bit >> 3));
  if ((bit & 7) + bits > 8) word |= static_cast<uint32_t>(*store.at(rec + codes + (bit >> 3) + 1)) << 8;
  const float q = static_cast<float>((word >> (bit & 7)) & ((1u << bits) - 1));
  const int g = c / group;
  return q * store.half_at(rec + params + 2 * g) + store.half_at(rec + params + 2 * (num_groups + g));
}

// kPerLane = head_size / 32 elements of q, k, v and the accumulator per lane.
template <typename T, int kPerLane>
__global__ void paged_attention_kernel(
    T* __restrict__ out, const T* __restrict__ query, T* __restrict__ cache,
    const int32_t* __restrict__ block_table, const int32_t* __restrict__ seq_lens,
    const int32_t* __restrict__ qsl, int64_t num_reqs, int64_t num_q_heads,
    int64_t num_kv_heads, int64_t block_size, int64_t slot_width,
    int64_t table_width, int64_t q_token_stride, int64_t q_head_stride,
    int64_t out_token_stride, int64_t out_head_stride, float scale,
    int64_t score_window, QuantizedStoreArgs store) {
  constexpr int kHeadSize = kPerLane * 32;
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;

  // The request owning token t: last r with qsl[r] <= t.
  int64_t lo = 0, hi = num_reqs - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (qsl[mid] <= t) lo = mid; else hi = mid - 1;
  }
  const int64_t r = lo;
  const int64_t num_queries = qsl[r + 1] - qsl[r];
  const int64_t kvh = h / (num_q_heads / num_kv_heads);
  // Keys: [nv revived vague tokens | exact slots first_exact.. (causal)].
  const int64_t first_exact = store.exact_start ? store.exact_start[r] : 0;
  const int64_t nv = store.vague_tokens ? store.vague_tokens[r] : 0;
  const int64_t visible = seq_lens[r] - first_exact - num_queries + (t - qsl[r]) + 1;
  const StoreBytes bytes{reinterpret_cast<uint8_t*>(cache), block_table + r * table_width,
                         kvh, num_kv_heads, block_size,
                         slot_width * static_cast<int64_t>(sizeof(T))};
  float q[kPerLane], acc[kPerLane];
  const T* qp = query + t * q_token_stride + h * q_head_stride + lane * kPerLane;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    q[e] = to_float(qp[e]) * scale;
    acc[e] = 0.f;
  }
  const RecordLayout layout{store.bits, store.group, store.value_bits};
  const int64_t num_groups = store.group ? kHeadSize / store.group : 0;
  const int64_t key_code_bytes = layout.key_code_bytes(kHeadSize);
  const int64_t params = layout.params_offset(kHeadSize);
  const int64_t record_bytes = store.group ? layout.record_bytes(kHeadSize) : 8;  // 8: no store
  auto vague_logit = [&](int64_t j) {
    float logit = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e)
      logit += q[e] * dequantize_channel(bytes, j * record_bytes, 0, params, num_groups,
                                         lane * kPerLane + e, store.bits, store.group);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) logit += __shfl_xor_sync(0xffffffff, logit, o);
    return logit;
  };
  auto exact_slot = [&](int64_t j) {
    const int64_t s = first_exact + j;
    const int64_t blk = block_table[r * table_width + s / block_size];
    return cache + ((blk * num_kv_heads + kvh) * block_size + s % block_size) * slot_width;
  };
  auto exact_logit = [&](const T* slot) {
    float logit = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) logit += q[e] * to_float(slot[lane * kPerLane + e]);
#pragma unroll
    for (int o = 16; o > 0; o /= 2) logit += __shfl_xor_sync(0xffffffff, logit, o);
    return logit;
  };

  float m = -FLT_MAX, s = 0.f;
  // Online softmax step for one key; value(e) gives this lane's channels.
  auto update = [&](float logit, auto value) {
    const float m_new = fmaxf(m, logit);
    const float correction = __expf(m - m_new);
    const float p = __expf(logit - m_new);
    s = s * correction + p;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] = acc[e] * correction + p * value(e);
    m = m_new;
  };
  for (int64_t j = warp; j < nv; j += kWarps) {
    update(vague_logit(j), [&](int e) {
      return dequantize_channel(bytes, j * record_bytes, key_code_bytes,
                                params + 4 * num_groups, num_groups,
                                lane * kPerLane + e, store.value_bits, store.group);
    });
  }
  for (int64_t j = warp; j < visible; j += kWarps) {
    const T* slot = exact_slot(j);
    update(exact_logit(slot), [&](int e) { return to_float(slot[kHeadSize + lane * kPerLane + e]); });
  }

  __shared__ float warp_m[kWarps], warp_s[kWarps];
  __shared__ float warp_acc[kWarps][kHeadSize];
  if (lane == 0) {
    warp_m[warp] = m;
    warp_s[warp] = s;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) warp_acc[warp][lane * kPerLane + e] = acc[e];
  __syncthreads();

  float m_all = -FLT_MAX;
  for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, warp_m[w]);
  float s_all = 0.f;
  for (int w = 0; w < kWarps; ++w)
    if (warp_s[w] > 0.f) s_all += warp_s[w] * __expf(warp_m[w] - m_all);
  T* op = out + t * out_token_stride + h * out_head_stride;
  for (int d = threadIdx.x; d < kHeadSize; d += blockDim.x) {
    float v = 0.f;
    for (int w = 0; w < kWarps; ++w)
      if (warp_s[w] > 0.f) v += warp_acc[w][d] * __expf(warp_m[w] - m_all);
    op[d] = from_float<T>(v / s_all);
  }

  // Only the last score_window query rows of the request's step score keys.
  if (t - qsl[r] < num_queries - score_window) return;
  // Second pass: now that the softmax normaliser is known, add each key's
  // probability to its record's or slot's score (shared by the GQA group).
  for (int64_t j = warp; j < nv; j += kWarps) {
    const float logit = vague_logit(j);
    // The score field is 4-byte aligned, so it never straddles two slots.
    if (lane == 0)
      atomicAdd(reinterpret_cast<float*>(bytes.at(j * record_bytes + record_bytes - 4)),
                __expf(logit - m_all) / s_all);
  }
  for (int64_t j = warp; j < visible; j += kWarps) {
    T* slot = exact_slot(j);
    const float logit = exact_logit(slot);
    if (lane == 0) atomicAdd(slot_score(slot, kHeadSize), __expf(logit - m_all) / s_all);
  }
}

template <typename T>
cudaError_t dispatch_attention(void* out, const void* query, void* cache,
                               const int32_t* block_table, const int32_t* seq_lens,
                               const int32_t* qsl, int64_t num_tokens,
                               int64_t num_reqs, int64_t num_q_heads,
                               int64_t num_kv_heads, int64_t head_size,
                               int64_t block_size, int64_t slot_width,
                               int64_t table_width, int64_t q_ts, int64_t q_hs,
                               int64_t o_ts, int64_t o_hs, float scale,
                               int64_t score_window, QuantizedStoreArgs store,
                               cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  const dim3 grid(num_tokens, num_q_heads), block(kWarps * 32);
#define KVR_LAUNCH(PER_LANE)                                                    \
  paged_attention_kernel<T, PER_LANE><<<grid, block, 0, stream>>>(              \
      static_cast<T*>(out), static_cast<const T*>(query),                       \
      static_cast<T*>(cache), block_table, seq_lens, qsl, num_reqs,             \
      num_q_heads, num_kv_heads, block_size, slot_width, table_width, q_ts,     \
      q_hs, o_ts, o_hs, scale, score_window, store)
  switch (head_size) {
    case 32: KVR_LAUNCH(1); break;
    case 64: KVR_LAUNCH(2); break;
    case 96: KVR_LAUNCH(3); break;
    case 128: KVR_LAUNCH(4); break;
    case 160: KVR_LAUNCH(5); break;
    case 192: KVR_LAUNCH(6); break;
    case 256: KVR_LAUNCH(8); break;
    default: return cudaErrorInvalidValue;
  }
#undef KVR_LAUNCH
  return cudaGetLastError();
}

}  // namespace

// Calls launch(T{}) with T the element type named by dtype.
template <typename Launch>
cudaError_t with_element_type(DType dtype, Launch&& launch) {
  switch (dtype) {
    case DType::kFloat32: return launch(float{});
    case DType::kFloat16: return launch(__half{});
    case DType::kBFloat16: return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_write_kv(DType dtype, void* kv_cache, const void* key,
                            const void* value, const int64_t* slot_mapping,
                            const int64_t* positions, int64_t num_tokens,
                            int64_t num_kv_heads, int64_t head_size,
                            int64_t block_size, int64_t slot_width,
                            cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    write_kv_kernel<<<num_tokens, 256, 0, stream>>>(
        static_cast<T*>(kv_cache), static_cast<const T*>(key),
        static_cast<const T*>(value), slot_mapping, positions, num_kv_heads,
        head_size, block_size, slot_width);
    return cudaGetLastError();
  });
}

cudaError_t launch_paged_attention(
    DType dtype, void* out, const void* query, void* kv_cache,
    const int32_t* block_table, const int32_t* seq_lens,
    const int32_t* query_start_loc, int64_t num_tokens, int64_t num_reqs,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t head_size,
    int64_t block_size, int64_t slot_width, int64_t table_width,
    int64_t q_token_stride, int64_t q_head_stride, int64_t out_token_stride,
    int64_t out_head_stride, float scale, int64_t score_window,
    QuantizedStoreArgs store, cudaStream_t stream) {
  return with_element_type(dtype, [&](auto element) {
    return dispatch_attention<decltype(element)>(
        out, query, kv_cache, block_table, seq_lens, query_start_loc, num_tokens,
        num_reqs, num_q_heads, num_kv_heads, head_size, block_size, slot_width,
        table_width, q_token_stride, q_head_stride, out_token_stride,
        out_head_stride, scale, score_window, store, stream);
  });
}

}  // namespace kvreviver::cuda
