// The launch of every one-thread-per-item kernel in this folder.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

namespace kvreviver::cuda {

constexpr int kThreads = 256;

// `kernel` over `items` items, kThreads to a block, on `stream`; nothing for 0 items.
template <typename... Params, typename... Args>
cudaError_t launch_per_item(void (*kernel)(Params...), int64_t items, cudaStream_t stream,
                            Args&&... args) {
  if (items == 0) return cudaSuccess;
  const auto blocks = static_cast<unsigned>((items + kThreads - 1) / kThreads);
  kernel<<<blocks, kThreads, 0, stream>>>(std::forward<Args>(args)...);
  return cudaGetLastError();
}

}  // namespace kvreviver::cuda
