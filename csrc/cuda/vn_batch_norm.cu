// CUDA Vector-Neuron batch norm kernels (see vn_batch_norm_params.h for the layouts). Kept free
// of torch headers so nvcc compiles it quickly; checks, allocation and dtype dispatch live in
// vn_batch_norm_cuda.cpp.
//
//   stats     two stages: norm_stats_partial_kernel gives each (channel block, row block) a
//             Welford state per channel (one pass over x), norm_stats_combine_kernel merges the
//             row blocks per channel (Chan et al.) in double. Deterministic, no atomics.
//   apply     elementwise over the n * c vectors: norm, normalise, rescale; nothing else written.
//   backward  like the stats pass: grad_x per vector, and the two per-channel sums reduced over the
//             block's row lanes in shared memory, then one atomicAdd per channel and block.
//
// Blocks of the reducing kernels are kChan channels (threadIdx.x % kChan, so a warp reads 32
// consecutive vectors = 96 contiguous values of one row) by kRowLanes row lanes; blockIdx.x picks
// the channel block, blockIdx.y the row block.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "acc_types.cuh"
#include "vn_batch_norm_params.h"

namespace relaxeq {
namespace cuda {
namespace {

constexpr int kChan = 32;
constexpr int kRowLanes = 8;
constexpr int kThreads = kChan * kRowLanes;
constexpr int kApplyThreads = 256;
constexpr int64_t kTargetBlocks = 1024;  // enough blocks to fill an H100 several times over
constexpr int64_t kMinRowsPerBlock = 4 * kRowLanes;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxApplyBlocks = 65535 * 8;  // grid-stride beyond this


__device__ __forceinline__ float acc_sqrt(float v) { return sqrtf(v); }
__device__ __forceinline__ double acc_sqrt(double v) { return sqrt(v); }

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows [begin, end) of row block `b` out of `blocks` over n rows (empty for trailing blocks).
__device__ __forceinline__ void row_range(int64_t n, int64_t blocks, int64_t b, int64_t& begin, int64_t& end) {
  const int64_t per = ceil_div(n, blocks);
  begin = b * per < n ? b * per : n;
  end = begin + per < n ? begin + per : n;
}

template <typename T, typename Acc>
__device__ __forceinline__ void load3(const T* __restrict__ p, Acc (&v)[3]) {
#pragma unroll
  for (int d = 0; d < 3; ++d) v[d] = to_acc(p[d]);
}

template <typename Acc>
__device__ __forceinline__ Acc length3(const Acc (&v)[3]) {
  return acc_sqrt(v[0] * v[0] + v[1] * v[1] + v[2] * v[2]);
}

// Chan et al.'s merge of (count_b, mean_b, m2_b) into (count_a, mean_a, m2_a).
template <typename Acc>
__device__ __forceinline__ void welford_merge(Acc& count_a, Acc& mean_a, Acc& m2_a, Acc count_b, Acc mean_b,
                                              Acc m2_b) {
  if (count_b == Acc(0)) return;
  const Acc count = count_a + count_b;
  const Acc delta = mean_b - mean_a;
  mean_a += delta * (count_b / count);
  m2_a += m2_b + delta * delta * (count_a * count_b / count);
  count_a = count;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) norm_stats_partial_kernel(const VnNormStatsParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const int tx = static_cast<int>(threadIdx.x) % kChan, ty = static_cast<int>(threadIdx.x) / kChan;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kChan + tx;
  int64_t r0, r1;
  row_range(p.n, gridDim.y, blockIdx.y, r0, r1);

  // Welford over this lane's rows r0 + ty, r0 + ty + kRowLanes, ... (a thread's count is exact).
  Acc count = Acc(0), mean = Acc(0), m2 = Acc(0);
  if (ch < p.c) {
    const Acc eps = static_cast<Acc>(p.norm_eps);
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      Acc v[3];
      load3(x + (r * p.c + ch) * 3, v);
      const Acc norm = length3(v) + eps;
      count += Acc(1);
      const Acc delta = norm - mean;
      mean += delta / count;
      m2 += delta * (norm - mean);
    }
  }
  __shared__ Acc s_count[kRowLanes][kChan];
  __shared__ Acc s_mean[kRowLanes][kChan];
  __shared__ Acc s_m2[kRowLanes][kChan];
  s_count[ty][tx] = count;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
  if (ty == 0 && ch < p.c) {
    for (int l = 1; l < kRowLanes; ++l) welford_merge(count, mean, m2, s_count[l][tx], s_mean[l][tx], s_m2[l][tx]);
    const int64_t out = static_cast<int64_t>(blockIdx.y) * p.c + ch;
    static_cast<Acc*>(p.part_mean)[out] = mean;
    static_cast<Acc*>(p.part_m2)[out] = m2;
  }
}

// One thread per channel merges the row blocks' states in double (counts up to n exactly).
template <typename T>
__global__ void norm_stats_combine_kernel(const VnNormStatsParams p, int64_t row_blocks) {
  using Acc = typename AccOf<T>::type;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (ch >= p.c) return;
  const Acc* __restrict__ part_mean = static_cast<const Acc*>(p.part_mean);
  const Acc* __restrict__ part_m2 = static_cast<const Acc*>(p.part_m2);
  double count = 0, mean = 0, m2 = 0;
  for (int64_t b = 0; b < row_blocks; ++b) {
    int64_t r0, r1;
    row_range(p.n, row_blocks, b, r0, r1);
    welford_merge<double>(count, mean, m2, static_cast<double>(r1 - r0), static_cast<double>(part_mean[b * p.c + ch]),
                          static_cast<double>(part_m2[b * p.c + ch]));
  }
  static_cast<Acc*>(p.mean)[ch] = static_cast<Acc>(mean);
  static_cast<Acc*>(p.var)[ch] = static_cast<Acc>(m2 / count);
}

template <typename T, typename Acc>
struct Channel {
  Acc mean, invstd, w, b;
};

template <typename T, typename Acc>
__device__ __forceinline__ Channel<T, Acc> load_channel(const VnBatchNormParams& p, int64_t ch) {
  Channel<T, Acc> k;
  k.mean = static_cast<const Acc*>(p.mean)[ch];
  k.invstd = static_cast<const Acc*>(p.invstd)[ch];
  k.w = p.weight != nullptr ? to_acc(static_cast<const T*>(p.weight)[ch]) : Acc(1);
  k.b = p.bias != nullptr ? to_acc(static_cast<const T*>(p.bias)[ch]) : Acc(0);
  return k;
}

template <typename T>
__global__ void __launch_bounds__(kApplyThreads) apply_kernel(const VnBatchNormParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  T* __restrict__ y = static_cast<T*>(p.y);
  const Acc eps = static_cast<Acc>(p.norm_eps);
  const int64_t total = p.n * p.c;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < total; v += stride) {
    const auto k = load_channel<T, Acc>(p, v % p.c);
    Acc a[3];
    load3(x + v * 3, a);
    const Acc norm = length3(a) + eps;
    const Acc scale = ((norm - k.mean) * k.invstd * k.w + k.b) / norm;
#pragma unroll
    for (int d = 0; d < 3; ++d) store_from_acc(y + v * 3 + d, a[d] * scale);
  }
}

// With g = <grad_y, x>, k = nb / norm (y = x k), nb = (norm - mean) invstd w + b:
//   grad_x = grad_y k + (g / norm)(invstd w - k) x / ||x||   (second term 0 at x = 0, like torch)
//   sum0 += g / norm, sum1 += g / norm * (norm - mean)        (per channel)
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(const VnBatchNormParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ gy = static_cast<const T*>(p.grad_y);
  T* __restrict__ gx = static_cast<T*>(p.grad_x);
  const bool sums = p.sum0 != nullptr;
  const int tx = static_cast<int>(threadIdx.x) % kChan, ty = static_cast<int>(threadIdx.x) / kChan;
  const int64_t ch = static_cast<int64_t>(blockIdx.x) * kChan + tx;
  int64_t r0, r1;
  row_range(p.n, gridDim.y, blockIdx.y, r0, r1);

  Acc s0 = Acc(0), s1 = Acc(0);
  if (ch < p.c) {
    const auto k = load_channel<T, Acc>(p, ch);
    const Acc eps = static_cast<Acc>(p.norm_eps);
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      const int64_t i = (r * p.c + ch) * 3;
      Acc a[3], g3[3];
      load3(x + i, a);
      load3(gy + i, g3);
      const Acc len = length3(a), norm = len + eps;
      const Acc centred = norm - k.mean;
      const Acc scale = (centred * k.invstd * k.w + k.b) / norm;
      const Acc g_nb = (g3[0] * a[0] + g3[1] * a[1] + g3[2] * a[2]) / norm;
      if (gx != nullptr) {
        const Acc coef = len > Acc(0) ? g_nb * (k.invstd * k.w - scale) / len : Acc(0);
#pragma unroll
        for (int d = 0; d < 3; ++d) store_from_acc(gx + i + d, g3[d] * scale + a[d] * coef);
      }
      s0 += g_nb;
      s1 += g_nb * centred;
    }
  }
  if (!sums) return;  // block-uniform: the barrier below is reached by all threads or none
  __shared__ Acc s_sum0[kRowLanes][kChan];
  __shared__ Acc s_sum1[kRowLanes][kChan];
  s_sum0[ty][tx] = s0;
  s_sum1[ty][tx] = s1;
  __syncthreads();
  if (ty == 0 && ch < p.c) {
    for (int l = 1; l < kRowLanes; ++l) {
      s0 += s_sum0[l][tx];
      s1 += s_sum1[l][tx];
    }
    atomic_add(static_cast<Acc*>(p.sum0) + ch, s0);
    atomic_add(static_cast<Acc*>(p.sum1) + ch, s1);
  }
}

dim3 reduce_grid(int64_t n, int64_t c) {
  return dim3(static_cast<unsigned int>(ceil_div(c, kChan)), static_cast<unsigned int>(vn_batch_norm_row_blocks(n, c)));
}

template <typename T>
void launch_stats(const VnNormStatsParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.c <= 0) return;
  const int64_t row_blocks = vn_batch_norm_row_blocks(p.n, p.c);
  norm_stats_partial_kernel<T><<<reduce_grid(p.n, p.c), kThreads, 0, stream>>>(p);
  const int combine_threads = 128;
  norm_stats_combine_kernel<T>
      <<<static_cast<unsigned int>(ceil_div(p.c, combine_threads)), combine_threads, 0, stream>>>(p, row_blocks);
}

template <typename T>
void launch_apply(const VnBatchNormParams& p, cudaStream_t stream) {
  const int64_t total = p.n * p.c;
  if (total <= 0) return;
  int64_t blocks = ceil_div(total, kApplyThreads);
  if (blocks > kMaxApplyBlocks) blocks = kMaxApplyBlocks;
  apply_kernel<T><<<static_cast<unsigned int>(blocks), kApplyThreads, 0, stream>>>(p);
}

template <typename T>
void launch_backward(const VnBatchNormParams& p, cudaStream_t stream) {
  if (p.n <= 0 || p.c <= 0 || (p.grad_x == nullptr && p.sum0 == nullptr)) return;
  backward_kernel<T><<<reduce_grid(p.n, p.c), kThreads, 0, stream>>>(p);
}

}  // namespace

int64_t vn_batch_norm_row_blocks(int64_t n, int64_t c) {
  if (n <= 0 || c <= 0) return 0;
  // Enough (channel block, row block) pairs to fill the device, each with a few rows per lane.
  int64_t rb = kTargetBlocks / ceil_div(c, kChan);
  const int64_t by_rows = ceil_div(n, kMinRowsPerBlock);
  if (rb > by_rows) rb = by_rows;
  if (rb > kMaxGridY) rb = kMaxGridY;
  return rb < 1 ? 1 : rb;
}

void vn_norm_stats_launch_f32(const VnNormStatsParams& p, cudaStream_t s) { launch_stats<float>(p, s); }
void vn_norm_stats_launch_f64(const VnNormStatsParams& p, cudaStream_t s) { launch_stats<double>(p, s); }
void vn_norm_stats_launch_f16(const VnNormStatsParams& p, cudaStream_t s) { launch_stats<__half>(p, s); }
void vn_norm_stats_launch_bf16(const VnNormStatsParams& p, cudaStream_t s) { launch_stats<__nv_bfloat16>(p, s); }

void vn_batch_norm_apply_launch_f32(const VnBatchNormParams& p, cudaStream_t s) { launch_apply<float>(p, s); }
void vn_batch_norm_apply_launch_f64(const VnBatchNormParams& p, cudaStream_t s) { launch_apply<double>(p, s); }
void vn_batch_norm_apply_launch_f16(const VnBatchNormParams& p, cudaStream_t s) { launch_apply<__half>(p, s); }
void vn_batch_norm_apply_launch_bf16(const VnBatchNormParams& p, cudaStream_t s) {
  launch_apply<__nv_bfloat16>(p, s);
}

void vn_batch_norm_backward_launch_f32(const VnBatchNormParams& p, cudaStream_t s) { launch_backward<float>(p, s); }
void vn_batch_norm_backward_launch_f64(const VnBatchNormParams& p, cudaStream_t s) { launch_backward<double>(p, s); }
void vn_batch_norm_backward_launch_f16(const VnBatchNormParams& p, cudaStream_t s) { launch_backward<__half>(p, s); }
void vn_batch_norm_backward_launch_bf16(const VnBatchNormParams& p, cudaStream_t s) {
  launch_backward<__nv_bfloat16>(p, s);
}

}  // namespace cuda
}  // namespace relaxeq
