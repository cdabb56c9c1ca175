// What the relaxed_linear CUDA kernel needs to know, shared by the kernel file
// (relaxed_linear.cu, compiled by nvcc without torch headers) and the ATen glue
// (relaxed_linear_cuda.cpp). Plain data only: no torch, no device code.
//
// One kernel serves forward and backward. Over the same N rows it computes
//   out1  = A W^T (+ bias)        [n, o]   in the input dtype T
//   out2 += A^T B                 [ka, kb] accumulated in float (double for T = double)
//   out3 += sum_rows A            [ka]     accumulated like out2
// forward:  A = x, W = M,   B = x  ->  y, G, s      (symmetric: out2 is the Gram matrix)
// backward: A = dy, W = M^T, B = x ->  dx, dM, dc   (W is M with its strides swapped)
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace relaxeq {
namespace cuda {

// Edge of the square output blocks the kernel works in (the glue needs it to know
// which blocks of a symmetric out2 were skipped).
constexpr int64_t kRelaxedLinearTile = 64;

struct RelaxedLinearParams {
  int64_t n = 0;   // rows of A and B
  int64_t ka = 0;  // columns of A: reduction length of out1, rows of out2, length of out3
  int64_t o = 0;   // rows of W: columns of out1
  int64_t kb = 0;  // columns of B: columns of out2

  // Inputs, dtype T; strides in elements (any non-negative values: views need no copy).
  const void* a = nullptr;  // [n, ka]
  int64_t a_row_stride = 0, a_col_stride = 0;
  const void* w = nullptr;  // [o, ka]
  int64_t w_row_stride = 0, w_col_stride = 0;
  const void* bias = nullptr;  // [o], or nullptr for no bias
  int64_t bias_stride = 0;
  const void* b = nullptr;  // [n, kb]
  int64_t b_row_stride = 0, b_col_stride = 0;

  // Outputs; nullptr = not wanted (its tiles are not launched).
  void* out1 = nullptr;  // [n, o], dtype T, written (not accumulated)
  int64_t out1_row_stride = 0, out1_col_stride = 0;
  void* out2 = nullptr;  // [ka, kb] contiguous accumulator, zeroed by the caller
  void* out3 = nullptr;  // [ka] contiguous accumulator, zeroed by the caller

  // B is A (same data, same strides, ka == kb): of the kRelaxedLinearTile-square blocks of
  // out2 only those on and above the block diagonal are accumulated (diagonal blocks in
  // full); the caller mirrors the upper triangle when there is more than one block.
  bool symmetric = false;
};

// Launch the kernel on `stream` (nothing is launched when there is no work, e.g. n == 0).
// Launch errors are left for the caller's cudaGetLastError. Accumulators: float for
// float / half / bfloat16 inputs, double for double.
void relaxed_linear_launch_f32(const RelaxedLinearParams& p, cudaStream_t stream);
void relaxed_linear_launch_f64(const RelaxedLinearParams& p, cudaStream_t stream);
void relaxed_linear_launch_f16(const RelaxedLinearParams& p, cudaStream_t stream);
void relaxed_linear_launch_bf16(const RelaxedLinearParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace relaxeq
