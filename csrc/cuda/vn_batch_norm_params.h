// What the vn_batch_norm CUDA kernels need to know, shared by the kernel file (vn_batch_norm.cu,
// compiled by nvcc without torch headers) and the ATen glue (vn_batch_norm_cuda.cpp). Plain data
// only: no torch, no device code.
//
// x, grad_y, y, grad_x are contiguous [n, c, 3] in dtype T (element (i, j, d) at (i * c + j) * 3 + d;
// the glue makes them contiguous). Per-channel statistics (mean, invstd, and every accumulator)
// are float for T = float / half / bfloat16 and double for T = double; weight and bias are T.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace relaxeq {
namespace cuda {

struct VnNormStatsParams {
  int64_t n = 0, c = 0;
  double norm_eps = 0;
  const void* x = nullptr;
  // Workspace of partial Welford states (mean, m2 of the norms), [row_blocks, c] each, stats
  // dtype: written by the first kernel, combined per channel by the second (the count of a row
  // block follows from its row range). row_blocks = vn_batch_norm_row_blocks(n, c).
  void* part_mean = nullptr;
  void* part_m2 = nullptr;
  void* mean = nullptr;  // [c] out
  void* var = nullptr;   // [c] out, biased
};

// Row blocks the stats and backward kernels split n into (the stats workspace's leading size).
int64_t vn_batch_norm_row_blocks(int64_t n, int64_t c);

struct VnBatchNormParams {
  int64_t n = 0, c = 0;
  double norm_eps = 0;
  const void* x = nullptr;
  const void* mean = nullptr;    // [c], stats dtype
  const void* invstd = nullptr;  // [c], stats dtype
  const void* weight = nullptr;  // [c], T, or nullptr (1)
  const void* bias = nullptr;    // [c], T, or nullptr (0)
  // forward
  void* y = nullptr;
  // backward: grad_x = nullptr when not wanted; sum0/sum1 = nullptr when no per-channel gradient
  // is wanted, else zeroed [c] accumulators (stats dtype) for
  //   sum0 = sum_n g / norm, sum1 = sum_n g / norm * (norm - mean), g = <grad_y, x>.
  const void* grad_y = nullptr;
  void* grad_x = nullptr;
  void* sum0 = nullptr;
  void* sum1 = nullptr;
};

// Launch on `stream` (nothing when n * c == 0); launch errors are left for the caller.
void vn_norm_stats_launch_f32(const VnNormStatsParams& p, cudaStream_t stream);
void vn_norm_stats_launch_f64(const VnNormStatsParams& p, cudaStream_t stream);
void vn_norm_stats_launch_f16(const VnNormStatsParams& p, cudaStream_t stream);
void vn_norm_stats_launch_bf16(const VnNormStatsParams& p, cudaStream_t stream);

void vn_batch_norm_apply_launch_f32(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_apply_launch_f64(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_apply_launch_f16(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_apply_launch_bf16(const VnBatchNormParams& p, cudaStream_t stream);

void vn_batch_norm_backward_launch_f32(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_backward_launch_f64(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_backward_launch_f16(const VnBatchNormParams& p, cudaStream_t stream);
void vn_batch_norm_backward_launch_bf16(const VnBatchNormParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace relaxeq
