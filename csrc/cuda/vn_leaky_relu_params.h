// What the vn_leaky_relu CUDA kernels need to know, shared by the kernel file
// (vn_leaky_relu.cu, compiled by nvcc without torch headers) and the ATen glue
// (vn_leaky_relu_cuda.cpp). Plain data only: no torch, no device code.
//
// All tensors are contiguous (the glue makes them so): x, out, grad_out, grad_x [n, c, 3];
// d, grad_d [n, cd, 3] with cd == c (one direction per channel) or cd == 1 (one shared per row).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace relaxeq {
namespace cuda {

struct VnLeakyReluParams {
  int64_t n = 0;   // rows
  int64_t c = 0;   // channels of x
  int64_t cd = 0;  // channels of d: c or 1
  double negative_slope = 0.0;  // α; the kernels compute in float (double for double inputs)
  double eps = 0.0;

  const void* x = nullptr;
  const void* d = nullptr;
  const void* grad_out = nullptr;  // backward only
  void* out = nullptr;             // forward only
  void* grad_x = nullptr;          // backward: nullptr = not wanted
  void* grad_d = nullptr;          // backward: nullptr = not wanted; for cd == 1 the sum over channels
};

// Launch on `stream` (nothing is launched when there is no work). Launch errors are left for
// the caller's C10_CUDA_KERNEL_LAUNCH_CHECK. Half types are computed in float.
void vn_leaky_relu_forward_f32(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_forward_f64(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_forward_f16(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_forward_bf16(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_backward_f32(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_backward_f64(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_backward_f16(const VnLeakyReluParams& p, cudaStream_t stream);
void vn_leaky_relu_backward_bf16(const VnLeakyReluParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace relaxeq
