// Byte layout of one record of the quantized vague store, for the CPU kernels
// (quantized_records.h) and the CUDA ones; no torch headers (nvcc compiles the
// .cu files without them):
//   [K codes | V codes | K scale, K min, V scale, V min (fp16 per group) |
//    position int32 | score float32],
// key codes at `bits` bits, value codes at `value_bits` (0: `bits`).
#pragma once

#include <cstdint>

#include "host_device.h"

namespace kvreviver {

struct RecordLayout {
  int64_t bits = 0, group = 0, value_bits = 0;  // value_bits 0: the same as bits

  KVR_HOST_DEVICE int64_t key_bits() const { return bits; }
  KVR_HOST_DEVICE int64_t val_bits() const { return value_bits ? value_bits : bits; }
  KVR_HOST_DEVICE int64_t key_code_bytes(int64_t d) const { return d * key_bits() / 8; }
  KVR_HOST_DEVICE int64_t params_offset(int64_t d) const {
    return d * (key_bits() + val_bits()) / 8;
  }
  KVR_HOST_DEVICE int64_t record_bytes(int64_t d) const {
    return params_offset(d) + 8 * (d / group) + 8;
  }
};

}  // namespace kvreviver
