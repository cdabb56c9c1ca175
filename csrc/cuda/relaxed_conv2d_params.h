// What the relaxed_conv2d CUDA kernel needs to know, shared by the kernel file (relaxed_conv2d.cu,
// compiled by nvcc without torch headers) and the ATen glue (relaxed_conv2d_cuda.cpp). Plain data only.
//
//   y[b, o, i, j] = sum_{ci, kh, kw} x[b, ci, i + kh - pad, j + kw - pad] M[o, ci, kh, kw] (+ bias[o])
//   z[b, d, i, j] = the same with D;   partial[block] = sum over the block's z of z^2
//   s[d, kk] += sum over the block's pixels of z[pix, d] patch[pix, kk]   (kk = (ci, kh, kw))
// z is never written: each thread block squares and sums its own tile of z and adds its share of S.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace relaxeq {
namespace cuda {

// Tile edges of the kernel (the glue sizes the grid and the partial-sum buffer with them).
constexpr int64_t kRelaxedConv2dPixels = 64;    // output pixels (over B, H', W') per block
constexpr int64_t kRelaxedConv2dChannels = 32;  // channels of y and of z per block

struct RelaxedConv2dParams {
  int64_t batch = 0, c_in = 0, h = 0, w = 0;
  int64_t ho = 0, wo = 0, c_out = 0, c_d = 0, k = 0, pad = 0;

  // Inputs, dtype T, strides in elements (views need no copy).
  const void* x = nullptr;
  int64_t x_stride[4] = {0, 0, 0, 0};
  const void* m = nullptr;
  int64_t m_stride[4] = {0, 0, 0, 0};
  const void* bias = nullptr;  // [c_out] or nullptr
  int64_t bias_stride = 0;
  const void* d = nullptr;  // [c_d, c_in, k, k] or nullptr (then no z and no partial sums)
  int64_t d_stride[4] = {0, 0, 0, 0};

  void* y = nullptr;  // [batch, c_out, ho, wo], dtype T
  int64_t y_stride[4] = {0, 0, 0, 0};
  void* partial = nullptr;  // [grid.y * grid.x] accumulator dtype (float, double for T = double)
  void* s = nullptr;        // [c_d, c_in * k * k] accumulator dtype, zero-filled (atomicAdd target);
                            // nullptr: S is not wanted (need_S = false) and the S pass is compiled out
};

// Launch on `stream`; nothing is launched when there are no output pixels. Launch errors are left
// for the caller's cudaGetLastError.
void relaxed_conv2d_launch_f32(const RelaxedConv2dParams& p, cudaStream_t stream);
void relaxed_conv2d_launch_f64(const RelaxedConv2dParams& p, cudaStream_t stream);
void relaxed_conv2d_launch_f16(const RelaxedConv2dParams& p, cudaStream_t stream);
void relaxed_conv2d_launch_bf16(const RelaxedConv2dParams& p, cudaStream_t stream);

// Blocks the launch uses (grid.x * grid.y): the length of the partial-sum buffer.
int64_t relaxed_conv2d_num_blocks(const RelaxedConv2dParams& p);

}  // namespace cuda
}  // namespace relaxeq
