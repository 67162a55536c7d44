// See compaction_kernels.cuh.

#include "compaction_kernels.cuh"

#include "launch.cuh"

namespace kvreviver::cuda {
namespace {

__device__ __forceinline__ uint32_t* slot_word(const SlotSpace& s, int h, int64_t slot, int w) {
  const int64_t block = s.blocks[slot / s.block_size];
  return s.cache + ((block * s.num_kv_heads + h) * s.block_size + slot % s.block_size) *
                       s.slot_words + w;
}

// One thread per (head, slot, word).
__global__ void gather_slots_kernel(SlotSpace space, const int64_t* __restrict__ indices,
                                    int64_t first, int64_t n, uint32_t* __restrict__ out) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= space.num_kv_heads * n * space.slot_words) return;
  const int w = static_cast<int>(item % space.slot_words);
  const int64_t i = item / space.slot_words % n;
  const int h = static_cast<int>(item / (space.slot_words * n));
  const int64_t slot = indices ? indices[h * n + i] : first + i;
  out[item] = *slot_word(space, h, slot, w);
}

__global__ void scatter_slots_kernel(SlotSpace space, int64_t first, int64_t n,
                                     const uint32_t* __restrict__ src, bool reset_scores) {
  const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (item >= space.num_kv_heads * n * space.slot_words) return;
  const int w = static_cast<int>(item % space.slot_words);
  const int64_t i = item / space.slot_words % n;
  const int h = static_cast<int>(item / (space.slot_words * n));
  *slot_word(space, h, first + i, w) = reset_scores && w == space.slot_words - 1 ? 0u : src[item];
}

}  // namespace

cudaError_t launch_gather_slots(SlotSpace space, const int64_t* indices, int64_t first,
                                int64_t n, uint32_t* out, cudaStream_t stream) {
  return launch_per_item(gather_slots_kernel, space.num_kv_heads * n * space.slot_words, stream,
                         space, indices, first, n, out);
}

cudaError_t launch_scatter_slots(SlotSpace space, int64_t first, int64_t n, const uint32_t* src,
                                 bool reset_scores, cudaStream_t stream) {
  return launch_per_item(scatter_slots_kernel, space.num_kv_heads * n * space.slot_words, stream,
                         space, first, n, src, reset_scores);
}

}  // namespace kvreviver::cuda
