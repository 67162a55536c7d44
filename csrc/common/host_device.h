// KVR_HOST_DEVICE: marks the torch-free helpers of csrc/common/ that the CPU
// kernels and the CUDA kernels (nvcc) both call.
#pragma once

#ifdef __CUDACC__
#define KVR_HOST_DEVICE __host__ __device__
#else
#define KVR_HOST_DEVICE
#endif
