// Per-thread scratch buffers kept between op calls.
#pragma once

#include <cstddef>
#include <vector>

namespace kvreviver {

// At least n elements of T, owned by the calling thread and kept between calls
// (Tag tells one op's buffers apart). Decode-time ops run once per layer and
// step: a fresh, zero-filled buffer of a store's size cost as much as the work.
template <typename T, int Tag>
T* scratch(size_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

}  // namespace kvreviver
