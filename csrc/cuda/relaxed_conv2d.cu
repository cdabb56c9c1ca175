// CUDA relaxed_conv2d forward: a direct (implicit-GEMM) convolution that computes a tile of y and a
// tile of the defect responses z from the same staged x patches, adds the bias to y and stores it,
// reduces z^2 to one partial sum per block, and accumulates the block's share of
// S = sum over pixels of z (x) patch (the weight gradient of z) into S with atomicAdd; z is never
// written to memory. Without S (need_S = false, p.s == nullptr) a second instantiation drops that
// pass and its shared z tile. See relaxed_conv2d_params.h. Kept free of torch headers so nvcc
// compiles it in seconds; the checks, allocation, dtype dispatch and the final sum of the partials
// live in relaxed_conv2d_cuda.cpp.
//
// Grid (pixel blocks, channel blocks). A block of 256 threads (16 x 16) owns 64 output pixels
// (flattened over B, H', W') and channels [32 c, 32 c + 32) of both y and z; each thread keeps a
// 4 x 2 register block of each (pixels ty + 16 i, channels tx + 16 j). Per 16-deep slice of the
// reduction index (ci, kh, kw) the patch tile is gathered into shared memory once (zero padding by
// bounds checks, no im2col buffer) and multiplied with the staged slices of M and D. After that loop
// the z tile goes to shared memory, the patch slices are gathered a second time, and each thread
// sums z^T patch for two (channel, kk) entries of S over the block's 64 pixels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "acc_types.cuh"
#include "relaxed_conv2d_params.h"

namespace relaxeq {
namespace cuda {
namespace {

constexpr int kPix = static_cast<int>(kRelaxedConv2dPixels);
constexpr int kCh = static_cast<int>(kRelaxedConv2dChannels);
constexpr int kDepth = 16;
constexpr int kThreads = 256;
constexpr int kSide = 16;
constexpr int kRegP = kPix / kSide;  // 4 pixels per thread
constexpr int kRegC = kCh / kSide;   // 2 channels per thread
static_assert(kPix * kDepth % kThreads == 0 && kCh * kDepth % kThreads == 0, "staging must tile evenly");

template <typename T, typename Acc>
__device__ __forceinline__ Acc load_weight(const T* __restrict__ w, const int64_t (&s)[4], int64_t n_rows, int64_t row,
                                           int64_t kk, int64_t kk_total, int64_t k) {
  if (row >= n_rows || kk >= kk_total) return Acc(0);
  const int64_t ci = kk / (k * k), kh = (kk / k) % k, kw = kk % k;
  return to_acc(w[row * s[0] + ci * s[1] + kh * s[2] + kw * s[3]]);
}

template <typename Acc>
__device__ __forceinline__ Acc block_sum(Acc v, Acc* scratch) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Acc total = Acc(0);
  if (threadIdx.x == 0) {
    for (int i = 0; i < kThreads / 32; ++i) total += scratch[i];  // fixed order: deterministic
  }
  return total;
}

// Patch tile xs[kq][mi] = x at pixel pix0 + mi, reduction index k0 + kq (zero outside the image and
// the problem). Consecutive threads take consecutive pixels (coalesced along W').
template <typename T, typename Acc>
__device__ __forceinline__ void load_patch_tile(const T* __restrict__ x, const RelaxedConv2dParams& p,
                                                Acc (&xs)[kDepth][kPix + 1], int tid, int64_t pix0, int64_t k0,
                                                int64_t n_pix, int64_t hw, int64_t kk_total) {
#pragma unroll
  for (int l = 0; l < kPix * kDepth / kThreads; ++l) {
    const int e = tid + l * kThreads, mi = e % kPix, kq = e / kPix;
    const int64_t gp = pix0 + mi, gk = k0 + kq;
    Acc v = Acc(0);
    if (gp < n_pix && gk < kk_total) {
      const int64_t b = gp / hw, rem = gp % hw, oh = rem / p.wo, ow = rem % p.wo;
      const int64_t ci = gk / (p.k * p.k), kh = (gk / p.k) % p.k, kw = gk % p.k;
      const int64_t ih = oh + kh - p.pad, iw = ow + kw - p.pad;
      if (ih >= 0 && ih < p.h && iw >= 0 && iw < p.w) {
        v = to_acc(x[b * p.x_stride[0] + ci * p.x_stride[1] + ih * p.x_stride[2] + iw * p.x_stride[3]]);
      }
    }
    xs[kq][mi] = v;
  }
}

template <typename T, bool kNeedS>
__global__ void __launch_bounds__(kThreads) relaxed_conv2d_kernel(const RelaxedConv2dParams p) {
  using Acc = typename AccOf<T>::type;
  __shared__ Acc xs[kDepth][kPix + 1];
  __shared__ Acc ms[kDepth][kCh + 1];
  __shared__ Acc ds[kDepth][kCh + 1];
  __shared__ Acc scratch[kThreads / 32];

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const T* __restrict__ m = static_cast<const T*>(p.m);
  const T* __restrict__ d = static_cast<const T*>(p.d);
  const bool has_d = d != nullptr;
  const int tid = static_cast<int>(threadIdx.x), ty = tid / kSide, tx = tid % kSide;
  const int64_t hw = p.ho * p.wo, n_pix = p.batch * hw, kk_total = p.c_in * p.k * p.k;
  const int64_t pix0 = static_cast<int64_t>(blockIdx.x) * kPix, ch0 = static_cast<int64_t>(blockIdx.y) * kCh;

  Acc ay[kRegP][kRegC] = {}, az[kRegP][kRegC] = {};
  for (int64_t k0 = 0; k0 < kk_total; k0 += kDepth) {  // block-uniform bounds: syncs are safe
    load_patch_tile<T, Acc>(x, p, xs, tid, pix0, k0, n_pix, hw, kk_total);
#pragma unroll
    for (int l = 0; l < kCh * kDepth / kThreads; ++l) {
      const int e = tid + l * kThreads, kq = e % kDepth, ci = e / kDepth;
      ms[kq][ci] = load_weight<T, Acc>(m, p.m_stride, p.c_out, ch0 + ci, k0 + kq, kk_total, p.k);
      if (has_d) ds[kq][ci] = load_weight<T, Acc>(d, p.d_stride, p.c_d, ch0 + ci, k0 + kq, kk_total, p.k);
    }
    __syncthreads();
#pragma unroll
    for (int kq = 0; kq < kDepth; ++kq) {
      Acc a[kRegP], bm[kRegC], bd[kRegC];
#pragma unroll
      for (int i = 0; i < kRegP; ++i) a[i] = xs[kq][ty + kSide * i];
#pragma unroll
      for (int j = 0; j < kRegC; ++j) {
        bm[j] = ms[kq][tx + kSide * j];
        bd[j] = has_d ? ds[kq][tx + kSide * j] : Acc(0);
      }
#pragma unroll
      for (int i = 0; i < kRegP; ++i) {
#pragma unroll
        for (int j = 0; j < kRegC; ++j) {
          ay[i][j] += a[i] * bm[j];
          az[i][j] += a[i] * bd[j];
        }
      }
    }
    __syncthreads();
  }

  T* __restrict__ y = static_cast<T*>(p.y);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int i = 0; i < kRegP; ++i) {
    const int64_t gp = pix0 + ty + kSide * i;
    if (gp >= n_pix) continue;
    const int64_t b = gp / hw, rem = gp % hw, oh = rem / p.wo, ow = rem % p.wo;
#pragma unroll
    for (int j = 0; j < kRegC; ++j) {
      const int64_t gc = ch0 + tx + kSide * j;
      if (gc >= p.c_out) continue;
      const Acc add = bias != nullptr ? to_acc(bias[gc * p.bias_stride]) : Acc(0);
      store_from_acc(y + b * p.y_stride[0] + gc * p.y_stride[1] + oh * p.y_stride[2] + ow * p.y_stride[3],
                     ay[i][j] + add);
    }
  }
  if (has_d) {  // block-uniform
    // Pixels and channels outside the problem hold exact zeros (zero patches / zero weights).
    Acc sq = Acc(0);
#pragma unroll
    for (int i = 0; i < kRegP; ++i) {
#pragma unroll
      for (int j = 0; j < kRegC; ++j) sq += az[i][j] * az[i][j];
    }
    const Acc total = block_sum(sq, scratch);
    if (threadIdx.x == 0) {
      static_cast<Acc*>(p.partial)[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total;
    }
  }
  if constexpr (kNeedS) {
    if (!has_d || ch0 >= p.c_d) return;  // block-uniform: this block holds no z channels
    // S[ch, kk] += sum over the block's pixels of z[pix, ch] patch[pix, kk] (zeros outside the problem).
    __shared__ Acc zs[kPix][kCh + 1];  // the z tile
#pragma unroll
    for (int i = 0; i < kRegP; ++i) {
#pragma unroll
      for (int j = 0; j < kRegC; ++j) zs[ty + kSide * i][tx + kSide * j] = az[i][j];
    }
    Acc* __restrict__ s_acc = static_cast<Acc*>(p.s);
    for (int64_t k0 = 0; k0 < kk_total; k0 += kDepth) {
      __syncthreads();  // zs written / the previous slice of xs consumed
      load_patch_tile<T, Acc>(x, p, xs, tid, pix0, k0, n_pix, hw, kk_total);
      __syncthreads();
#pragma unroll
      for (int l = 0; l < kCh * kDepth / kThreads; ++l) {
        const int e = tid + l * kThreads, kq = e % kDepth, ci = e / kDepth;
        const int64_t gc = ch0 + ci, gk = k0 + kq;
        Acc acc = Acc(0);
#pragma unroll 8
        for (int mi = 0; mi < kPix; ++mi) acc += zs[mi][ci] * xs[kq][mi];
        if (gc < p.c_d && gk < kk_total) atomicAdd(s_acc + gc * kk_total + gk, acc);
      }
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 make_grid(const RelaxedConv2dParams& p) {
  const int64_t n_pix = p.batch * p.ho * p.wo;
  const int64_t ch = p.c_out > p.c_d ? p.c_out : p.c_d;
  return dim3(static_cast<unsigned int>(ceil_div(n_pix, kPix)), static_cast<unsigned int>(ceil_div(ch, kCh)), 1);
}

template <typename T>
void launch(const RelaxedConv2dParams& p, cudaStream_t stream) {
  const dim3 grid = make_grid(p);
  if (grid.x == 0 || grid.y == 0) return;
  if (p.s != nullptr) {
    relaxed_conv2d_kernel<T, true><<<grid, kThreads, 0, stream>>>(p);
  } else {
    relaxed_conv2d_kernel<T, false><<<grid, kThreads, 0, stream>>>(p);
  }
}

}  // namespace

int64_t relaxed_conv2d_num_blocks(const RelaxedConv2dParams& p) {
  const dim3 grid = make_grid(p);
  return static_cast<int64_t>(grid.x) * grid.y;
}

void relaxed_conv2d_launch_f32(const RelaxedConv2dParams& p, cudaStream_t stream) { launch<float>(p, stream); }
void relaxed_conv2d_launch_f64(const RelaxedConv2dParams& p, cudaStream_t stream) { launch<double>(p, stream); }
void relaxed_conv2d_launch_f16(const RelaxedConv2dParams& p, cudaStream_t stream) { launch<__half>(p, stream); }
void relaxed_conv2d_launch_bf16(const RelaxedConv2dParams& p, cudaStream_t stream) {
  launch<__nv_bfloat16>(p, stream);
}

}  // namespace cuda
}  // namespace relaxeq
