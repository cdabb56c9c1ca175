// CUDA relaxed_linear: one kernel for the forward (y = x M^T + c, G = x^T x, s = sum_n x_n)
// and the backward (dx = dy M, dM = dy^T x, dc = sum_n dy_n). See relaxed_linear_params.h
// for the A / W / B roles. Kept free of torch headers so nvcc compiles it in seconds;
// the checks, allocation and dtype dispatch live in relaxed_linear_cuda.cpp.
//
// Grid: a 1-D grid of (row block) x (tile) blocks, the tiles of one row block adjacent
// so that they run together and read that row block of A from L2, not from memory:
//   tiles [0, out1_tiles)        a rows_per_block x 64 slab of out1 = A W^T (+ bias)
//   the rest                     a 64x64 block (i, j) of out2 += A^T B over this row block's
//                                rows, added with atomicAdd; one tile per column block i of A
//                                also adds the column sums of A to out3. When out2 is not
//                                wanted but out3 is, these are column-sum-only tiles.
// Every tile is a 64x64 output block computed by 256 threads, each owning a 4x4 register
// block (rows ty + 16 i, columns tx + 16 j: a warp reads 16 consecutive shared-memory
// words and writes 16 consecutive outputs), over 16-deep slices staged in shared memory.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include "acc_types.cuh"
#include "relaxed_linear_params.h"

namespace relaxeq {
namespace cuda {
namespace {

constexpr int kTile = static_cast<int>(kRelaxedLinearTile);  // output block edge
constexpr int kDepth = 16;                         // reduction slice staged per step
constexpr int kThreads = 256;                      // 16 x 16 threads
constexpr int kSide = 16;                          // threads along each tile edge
constexpr int kReg = kTile / kSide;                // 4x4 outputs per thread
constexpr int kLoads = kTile * kDepth / kThreads;  // elements each thread stages per slice
constexpr int kPad = 1;  // row padding: staging with the reduction index fastest stays ~conflict-free
constexpr int64_t kMaxRowsPerBlock = 1024;
constexpr int64_t kTargetBlocks = 2048;  // enough blocks to fill an H100 many times over

static_assert(kTile * kDepth == kLoads * kThreads, "staging must cover the slice exactly");
static_assert(kReg * kSide == kTile, "register blocks must cover the tile exactly");


template <typename Acc>
using Stage = Acc[kDepth][kTile + kPad];

// S[k][m] = P[(m0 + m) * m_stride + (k0 + k) * k_stride] for m < kTile, k < kDepth, and 0
// where m0 + m >= m_end or k0 + k >= k_end, so partial tiles need no special case later.
// Consecutive threads take consecutive k when the reduction index is the contiguous
// one (k_stride == 1), consecutive m otherwise, so the usual layouts load coalesced.
template <typename T, typename Acc>
__device__ __forceinline__ void stage_slice(Stage<Acc>& S, const T* __restrict__ P, int64_t m_stride,
                                            int64_t k_stride, int64_t m0, int64_t m_end, int64_t k0,
                                            int64_t k_end) {
  const bool k_fastest = k_stride == 1;
#pragma unroll
  for (int l = 0; l < kLoads; ++l) {
    const int e = static_cast<int>(threadIdx.x) + l * kThreads;
    const int m = k_fastest ? e / kDepth : e % kTile;
    const int k = k_fastest ? e % kDepth : e / kTile;
    const int64_t gm = m0 + m, gk = k0 + k;
    Acc v = Acc(0);
    if (gm < m_end && gk < k_end) v = to_acc(P[gm * m_stride + gk * k_stride]);
    S[k][m] = v;
  }
}

// acc[i][j] += sum_k P[k][ty + 16 i] * Q[k][tx + 16 j]
template <typename Acc>
__device__ __forceinline__ void multiply_slice(Acc (&acc)[kReg][kReg], const Stage<Acc>& P, const Stage<Acc>& Q,
                                               int ty, int tx) {
#pragma unroll
  for (int k = 0; k < kDepth; ++k) {
    Acc a[kReg], b[kReg];
#pragma unroll
    for (int i = 0; i < kReg; ++i) a[i] = P[k][ty + kSide * i];
#pragma unroll
    for (int j = 0; j < kReg; ++j) b[j] = Q[k][tx + kSide * j];
#pragma unroll
    for (int i = 0; i < kReg; ++i) {
#pragma unroll
      for (int j = 0; j < kReg; ++j) acc[i][j] += a[i] * b[j];
    }
  }
}

// How the grid is cut; computed once on the host (make_layout) and passed by value.
struct TileLayout {
  int64_t rows_per_block = kTile;
  int64_t tiles_per_row_block = 0;  // out1_tiles + out2_tiles
  int64_t out1_tiles = 0;           // 64-column slabs of out1
  int64_t a_blocks = 0;             // 64-column blocks of A (rows of out2, out3)
  int64_t b_blocks = 0;             // 64-column blocks of B (columns of out2)
  int64_t out2_tiles = 0;           // out2 blocks, or column-sum-only tiles when sums_only
  bool sums_only = false;
  int64_t grid_blocks = 0;
};

// out1[r, col0 + c] = sum_k A[r, k] W[col0 + c, k] (+ bias) for the rows [row0, row_end).
template <typename T, typename Acc>
__device__ void out1_slab(const RelaxedLinearParams& p, int64_t row0, int64_t row_end, int64_t col0,
                          Stage<Acc>& As, Stage<Acc>& Ws) {
  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ W = static_cast<const T*>(p.w);
  const T* __restrict__ bias = static_cast<const T*>(p.bias);
  T* __restrict__ out = static_cast<T*>(p.out1);
  const int ty = static_cast<int>(threadIdx.x) / kSide, tx = static_cast<int>(threadIdx.x) % kSide;

  Acc bias_j[kReg];
#pragma unroll
  for (int j = 0; j < kReg; ++j) {
    const int64_t col = col0 + tx + kSide * j;
    bias_j[j] = (bias != nullptr && col < p.o) ? to_acc(bias[col * p.bias_stride]) : Acc(0);
  }

  for (int64_t r0 = row0; r0 < row_end; r0 += kTile) {  // block-uniform bounds: syncs are safe
    Acc acc[kReg][kReg] = {};
    for (int64_t k0 = 0; k0 < p.ka; k0 += kDepth) {
      stage_slice<T, Acc>(As, A, p.a_row_stride, p.a_col_stride, r0, row_end, k0, p.ka);
      stage_slice<T, Acc>(Ws, W, p.w_row_stride, p.w_col_stride, col0, p.o, k0, p.ka);
      __syncthreads();
      multiply_slice<Acc>(acc, As, Ws, ty, tx);
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < kReg; ++i) {
      const int64_t row = r0 + ty + kSide * i;
      if (row >= row_end) continue;
#pragma unroll
      for (int j = 0; j < kReg; ++j) {
        const int64_t col = col0 + tx + kSide * j;
        if (col < p.o) store_from_acc(out + row * p.out1_row_stride + col * p.out1_col_stride, acc[i][j] + bias_j[j]);
      }
    }
  }
}

// Over the rows [row0, row_end): out2[a0 + i, b0 + j] += sum_r A[r, a0 + i] B[r, b0 + j] when
// b0 >= 0, and out3[a0 + i] += sum_r A[r, a0 + i] when with_sums.
template <typename T, typename Acc>
__device__ void out2_block(const RelaxedLinearParams& p, int64_t row0, int64_t row_end, int64_t a0, int64_t b0,
                           bool with_sums, Stage<Acc>& As, Stage<Acc>& Bs) {
  const T* __restrict__ A = static_cast<const T*>(p.a);
  const T* __restrict__ B = static_cast<const T*>(p.b);
  const int ty = static_cast<int>(threadIdx.x) / kSide, tx = static_cast<int>(threadIdx.x) % kSide;
  const bool gram = b0 >= 0;
  // A diagonal block of a Gram matrix multiplies a slice by itself: stage it once.
  const bool diagonal = p.symmetric && a0 == b0;
  const bool summer = with_sums && threadIdx.x < kTile;  // one thread per column of the block

  Acc acc[kReg][kReg] = {};
  Acc col_sum = Acc(0);
  for (int64_t r = row0; r < row_end; r += kDepth) {  // block-uniform bounds: syncs are safe
    // Here the output index m is a column of A and the reduction index k is a row.
    stage_slice<T, Acc>(As, A, p.a_col_stride, p.a_row_stride, a0, p.ka, r, row_end);
    if (gram && !diagonal) stage_slice<T, Acc>(Bs, B, p.b_col_stride, p.b_row_stride, b0, p.kb, r, row_end);
    __syncthreads();
    if (gram) multiply_slice<Acc>(acc, As, diagonal ? As : Bs, ty, tx);
    if (summer) {
#pragma unroll
      for (int k = 0; k < kDepth; ++k) col_sum += As[k][threadIdx.x];
    }
    __syncthreads();
  }

  if (gram) {
    Acc* __restrict__ out2 = static_cast<Acc*>(p.out2);
#pragma unroll
    for (int i = 0; i < kReg; ++i) {
      const int64_t a = a0 + ty + kSide * i;
      if (a >= p.ka) continue;
#pragma unroll
      for (int j = 0; j < kReg; ++j) {
        const int64_t b = b0 + tx + kSide * j;
        if (b < p.kb) atomic_add(out2 + a * p.kb + b, acc[i][j]);
      }
    }
  }
  if (summer && a0 + threadIdx.x < p.ka) atomic_add(static_cast<Acc*>(p.out3) + a0 + threadIdx.x, col_sum);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) relaxed_linear_kernel(const RelaxedLinearParams p, const TileLayout L) {
  using Acc = typename AccOf<T>::type;
  __shared__ Stage<Acc> stage_a;
  __shared__ Stage<Acc> stage_b;

  const int64_t block = blockIdx.x;
  const int64_t row_block = block / L.tiles_per_row_block;
  int64_t tile = block % L.tiles_per_row_block;
  const int64_t row0 = row_block * L.rows_per_block;
  const int64_t row_end = row0 + L.rows_per_block < p.n ? row0 + L.rows_per_block : p.n;

  if (tile < L.out1_tiles) {
    out1_slab<T, Acc>(p, row0, row_end, tile * kTile, stage_a, stage_b);
    return;
  }
  tile -= L.out1_tiles;
  if (L.sums_only) {
    out2_block<T, Acc>(p, row0, row_end, tile * kTile, /*b0=*/-1, /*with_sums=*/true, stage_a, stage_b);
    return;
  }
  int64_t i, j;
  if (p.symmetric) {
    // Blocks on and above the diagonal, row by row: block row i holds a_blocks - i of them.
    i = 0;
    while (tile >= L.a_blocks - i) {
      tile -= L.a_blocks - i;
      ++i;
    }
    j = i + tile;
  } else {
    i = tile / L.b_blocks;
    j = tile % L.b_blocks;
  }
  // Exactly one block per block row i adds the column sums: the first one of that row.
  const bool with_sums = p.out3 != nullptr && j == (p.symmetric ? i : 0);
  out2_block<T, Acc>(p, row0, row_end, i * kTile, j * kTile, with_sums, stage_a, stage_b);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

TileLayout make_layout(const RelaxedLinearParams& p) {
  TileLayout L;
  L.out1_tiles = p.out1 != nullptr ? ceil_div(p.o, kTile) : 0;
  L.a_blocks = ceil_div(p.ka, kTile);
  L.b_blocks = ceil_div(p.kb, kTile);
  if (p.out2 != nullptr && L.a_blocks > 0 && L.b_blocks > 0) {
    L.out2_tiles = p.symmetric ? L.a_blocks * (L.a_blocks + 1) / 2 : L.a_blocks * L.b_blocks;
  } else if (p.out3 != nullptr) {
    L.out2_tiles = L.a_blocks;  // column sums wanted without out2 (or out2 has no columns)
    L.sums_only = true;
  }
  L.tiles_per_row_block = L.out1_tiles + L.out2_tiles;
  if (p.n <= 0 || L.tiles_per_row_block == 0) return L;  // grid_blocks = 0: nothing to launch
  // Taller row blocks mean fewer atomicAdds into out2 and out3, shorter ones more blocks
  // to spread over the SMs: grow them while the grid stays comfortably large.
  while (L.rows_per_block < kMaxRowsPerBlock &&
         ceil_div(p.n, 2 * L.rows_per_block) * L.tiles_per_row_block >= kTargetBlocks) {
    L.rows_per_block *= 2;
  }
  while (ceil_div(p.n, L.rows_per_block) * L.tiles_per_row_block > INT_MAX) L.rows_per_block *= 2;
  L.grid_blocks = ceil_div(p.n, L.rows_per_block) * L.tiles_per_row_block;
  return L;
}

template <typename T>
void launch(const RelaxedLinearParams& p, cudaStream_t stream) {
  const TileLayout L = make_layout(p);
  if (L.grid_blocks == 0) return;
  relaxed_linear_kernel<T><<<static_cast<unsigned int>(L.grid_blocks), kThreads, 0, stream>>>(p, L);
}

}  // namespace

void relaxed_linear_launch_f32(const RelaxedLinearParams& p, cudaStream_t stream) { launch<float>(p, stream); }
void relaxed_linear_launch_f64(const RelaxedLinearParams& p, cudaStream_t stream) { launch<double>(p, stream); }
void relaxed_linear_launch_f16(const RelaxedLinearParams& p, cudaStream_t stream) { launch<__half>(p, stream); }
void relaxed_linear_launch_bf16(const RelaxedLinearParams& p, cudaStream_t stream) {
  launch<__nv_bfloat16>(p, stream);
}

}  // namespace cuda
}  // namespace relaxeq
