// Accumulator types, conversions and atomics shared by the CUDA kernels: half types load into
// float, compute in float and round once on store; double stays double.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace relaxeq {
namespace cuda {

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

__device__ __forceinline__ void store_from_acc(float* p, float v) { *p = v; }
__device__ __forceinline__ void store_from_acc(double* p, double v) { *p = v; }
__device__ __forceinline__ void store_from_acc(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void store_from_acc(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Partial sums from concurrent blocks.
__device__ __forceinline__ void atomic_add(float* p, float v) { atomicAdd(p, v); }
__device__ __forceinline__ void atomic_add(double* p, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  // No native double atomicAdd before sm_60: compare-and-swap loop.
  auto* addr = reinterpret_cast<unsigned long long*>(p);
  unsigned long long old = *addr, assumed;
  do {
    assumed = old;
    old = atomicCAS(addr, assumed, __double_as_longlong(v + __longlong_as_double(assumed)));
  } while (assumed != old);
#else
  atomicAdd(p, v);
#endif
}

}  // namespace cuda
}  // namespace relaxeq
