// CUDA vn_leaky_relu forward and backward (formulas at the top of csrc/cpu/vn_leaky_relu.cpp).
// Kept free of torch headers so nvcc compiles it in seconds; checks, allocation and dtype
// dispatch live in vn_leaky_relu_cuda.cpp.
//
// Memory bound, one pass: each vector (n, c) is read once, its 3 components kept in registers.
//   forward, and backward with per-channel d (or grad_d not wanted): one thread per vector,
//     grid-stride loop over the n * c vectors.
//   backward with a shared d [n, 1, 3] and grad_d wanted: one warp per row; the lanes stride over
//     the channels and the row's grad_d is reduced with warp shuffles (deterministic, no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "acc_types.cuh"
#include "vn_leaky_relu_params.h"

namespace relaxeq {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = kThreads / kWarp;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride loops cover the rest


template <typename T, typename Acc>
__device__ __forceinline__ void load3(const T* __restrict__ p, int64_t i, Acc (&v)[3]) {
  v[0] = to_acc(p[i]);
  v[1] = to_acc(p[i + 1]);
  v[2] = to_acc(p[i + 2]);
}

template <typename T, typename Acc>
__device__ __forceinline__ void store3(T* __restrict__ p, int64_t i, const Acc (&v)[3]) {
  store_from_acc(p + i, v[0]);
  store_from_acc(p + i + 1, v[1]);
  store_from_acc(p + i + 2, v[2]);
}

template <typename Acc>
__device__ __forceinline__ Acc dot3(const Acc (&a)[3], const Acc (&b)[3]) {
  return a[0] * b[0] + a[1] * b[1] + a[2] * b[2];
}

// Offset of vector (row, ch)'s direction in d.
__device__ __forceinline__ int64_t d_offset(int64_t row, int64_t ch, int64_t cd) {
  return (row * cd + (cd == 1 ? 0 : ch)) * 3;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const VnLeakyReluParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ d = static_cast<const T*>(p.d);
  T* __restrict__ out = static_cast<T*>(p.out);
  const Acc b = Acc(1) - static_cast<Acc>(p.negative_slope);
  const Acc eps = static_cast<Acc>(p.eps);
  const int64_t total = p.n * p.c;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < total; v += stride) {
    const int64_t row = v / p.c, ch = v % p.c;
    Acc xv[3], dv[3];
    load3(x, v * 3, xv);
    load3(d, d_offset(row, ch, p.cd), dv);
    const Acc dot = dot3(xv, dv);
    if (!(dot >= Acc(0))) {  // projected branch (also for a NaN dot, like the reference)
      const Acc f = b * (dot / (dot3(dv, dv) + eps));
      xv[0] -= f * dv[0];
      xv[1] -= f * dv[1];
      xv[2] -= f * dv[2];
    }
    store3(out, v * 3, xv);
  }
}

// One vector's backward: writes gx (the gradient w.r.t. x) and r (its share of grad_d).
template <typename Acc>
__device__ __forceinline__ void vector_backward(const Acc (&g)[3], const Acc (&xv)[3], const Acc (&dv)[3], Acc b,
                                                Acc eps, Acc (&gx)[3], Acc (&r)[3]) {
  const Acc dot = dot3(xv, dv);
  if (dot >= Acc(0)) {
#pragma unroll
    for (int i = 0; i < 3; ++i) {
      gx[i] = g[i];
      r[i] = Acc(0);
    }
    return;
  }
  const Acc s = dot3(dv, dv) + eps;
  const Acc t = b / s;
  const Acc k = dot / s;
  const Acc gd = dot3(g, dv);
  const Acc fx = t * gd;
  const Acc fd = Acc(2) * gd * k;
#pragma unroll
  for (int i = 0; i < 3; ++i) {
    gx[i] = g[i] - fx * dv[i];
    r[i] = -t * (gd * xv[i] + dot * g[i] - fd * dv[i]);
  }
}

// Thread per vector: grad_x, and grad_d when d is per channel.
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_vector_kernel(const VnLeakyReluParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ d = static_cast<const T*>(p.d);
  const T* __restrict__ go = static_cast<const T*>(p.grad_out);
  T* __restrict__ grad_x = static_cast<T*>(p.grad_x);
  T* __restrict__ grad_d = static_cast<T*>(p.grad_d);  // only used when p.cd == p.c
  const Acc b = Acc(1) - static_cast<Acc>(p.negative_slope);
  const Acc eps = static_cast<Acc>(p.eps);
  const int64_t total = p.n * p.c;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; v < total; v += stride) {
    const int64_t row = v / p.c, ch = v % p.c;
    const int64_t di = d_offset(row, ch, p.cd);
    Acc g[3], xv[3], dv[3], gx[3], r[3];
    load3(go, v * 3, g);
    load3(x, v * 3, xv);
    load3(d, di, dv);
    vector_backward(g, xv, dv, b, eps, gx, r);
    if (grad_x != nullptr) store3(grad_x, v * 3, gx);
    if (grad_d != nullptr) store3(grad_d, di, r);
  }
}

// Warp per row, shared d [n, 1, 3]: grad_x per vector, grad_d[row] = sum over the channels.
template <typename T>
__global__ void __launch_bounds__(kThreads) backward_shared_kernel(const VnLeakyReluParams p) {
  using Acc = typename AccOf<T>::type;
  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ d = static_cast<const T*>(p.d);
  const T* __restrict__ go = static_cast<const T*>(p.grad_out);
  T* __restrict__ grad_x = static_cast<T*>(p.grad_x);
  T* __restrict__ grad_d = static_cast<T*>(p.grad_d);
  const Acc b = Acc(1) - static_cast<Acc>(p.negative_slope);
  const Acc eps = static_cast<Acc>(p.eps);
  const int lane = static_cast<int>(threadIdx.x) % kWarp;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarp;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  // The row loop is warp-uniform, so every lane reaches the shuffles.
  for (int64_t row = warp; row < p.n; row += warps) {
    Acc dv[3];
    load3(d, row * 3, dv);
    Acc sum[3] = {Acc(0), Acc(0), Acc(0)};
    for (int64_t ch = lane; ch < p.c; ch += kWarp) {
      const int64_t v = row * p.c + ch;
      Acc g[3], xv[3], gx[3], r[3];
      load3(go, v * 3, g);
      load3(x, v * 3, xv);
      vector_backward(g, xv, dv, b, eps, gx, r);
      if (grad_x != nullptr) store3(grad_x, v * 3, gx);
      sum[0] += r[0];
      sum[1] += r[1];
      sum[2] += r[2];
    }
#pragma unroll
    for (int off = kWarp / 2; off > 0; off /= 2) {
#pragma unroll
      for (int i = 0; i < 3; ++i) sum[i] += __shfl_down_sync(0xffffffffu, sum[i], off);
    }
    if (lane == 0) store3(grad_d, row * 3, sum);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

unsigned int blocks_for(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = ceil_div(work_items, items_per_block);
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

template <typename T>
void launch_forward(const VnLeakyReluParams& p, cudaStream_t stream) {
  const int64_t total = p.n * p.c;
  if (total <= 0) return;
  forward_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
}

template <typename T>
void launch_backward(const VnLeakyReluParams& p, cudaStream_t stream) {
  if (p.n <= 0 || (p.grad_x == nullptr && p.grad_d == nullptr)) return;
  const bool shared_sum = p.grad_d != nullptr && p.cd == 1 && p.c != 1;
  if (shared_sum) {
    // Also for c == 0: then every row's grad_d is the empty sum, 0.
    backward_shared_kernel<T><<<blocks_for(p.n, kWarpsPerBlock), kThreads, 0, stream>>>(p);
    return;
  }
  // cd == c (including c == 1 with a [n, 1, 3] d): grad_d is per vector.
  const int64_t total = p.n * p.c;
  if (total <= 0) return;
  backward_vector_kernel<T><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(p);
}

}  // namespace

void vn_leaky_relu_forward_f32(const VnLeakyReluParams& p, cudaStream_t s) { launch_forward<float>(p, s); }
void vn_leaky_relu_forward_f64(const VnLeakyReluParams& p, cudaStream_t s) { launch_forward<double>(p, s); }
void vn_leaky_relu_forward_f16(const VnLeakyReluParams& p, cudaStream_t s) { launch_forward<__half>(p, s); }
void vn_leaky_relu_forward_bf16(const VnLeakyReluParams& p, cudaStream_t s) {
  launch_forward<__nv_bfloat16>(p, s);
}
void vn_leaky_relu_backward_f32(const VnLeakyReluParams& p, cudaStream_t s) { launch_backward<float>(p, s); }
void vn_leaky_relu_backward_f64(const VnLeakyReluParams& p, cudaStream_t s) { launch_backward<double>(p, s); }
void vn_leaky_relu_backward_f16(const VnLeakyReluParams& p, cudaStream_t s) { launch_backward<__half>(p, s); }
void vn_leaky_relu_backward_bf16(const VnLeakyReluParams& p, cudaStream_t s) {
  launch_backward<__nv_bfloat16>(p, s);
}

}  // namespace cuda
}  // namespace relaxeq
