// CPU relaxed_linear: y = x M^T + c and the input statistics G = x^T x, s = sum_n x_n.
//
// Narrow layers are memory bound: one sweep over row chunks small enough to stay in
// cache reads x from memory once for y, G and s. Each thread accumulates its own G/s
// (dM/dc in backward) and the partial sums are added at the end; the GEMMs inside the
// parallel region run single-threaded. Wide layers are compute bound: there whole-matrix
// (multi-threaded) GEMMs beat many small chunk updates of a large G, so they take that
// path, as do inputs small enough to stay in cache. Both compute only the upper block triangle of G when it is wide enough to pay.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../relaxed_linear.h"
#include "cpu_checks.h"

namespace relaxeq {
namespace {

// Rows per chunk: ~256 KiB of x, at least 64 rows so the GEMMs stay efficient.
int64_t rows_per_chunk(int64_t n_cols, int64_t elem_size) {
  const int64_t target_bytes = 256 * 1024;
  return std::max<int64_t>(64, target_bytes / std::max<int64_t>(1, n_cols * elem_size));
}

// The whole-matrix path (see the top of the file) from this width on, or when x is
// small enough to stay in the last-level cache anyway: chunking then only adds calls.
constexpr int64_t kWideColumns = 256;
constexpr int64_t kCacheResidentBytes = 8 << 20;

// Half types always: one GEMM accumulates in float32 inside, where chunk partials would round to the half
// type once per chunk.
bool use_whole_matrix_path(const at::Tensor& x, int64_t d_out) {
  return is_reduced_float(x.scalar_type()) || std::max(x.size(1), d_out) >= kWideColumns ||
         x.numel() * x.element_size() <= kCacheResidentBytes;
}

// Width of the column blocks of the upper-triangular Gram update; below two
// blocks the full product is cheaper than the bookkeeping.
constexpr int64_t kGramBlock = 128;

// acc += a^T b, where acc is symmetric when a is b: then only the blocks on and
// above the diagonal are accumulated (about half the work for wide inputs) and
// the caller mirrors the upper triangle at the end.
void accumulate_gram(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b, bool symmetric) {
  const int64_t d = a.size(1);
  if (!symmetric || d < 2 * kGramBlock) {
    acc.addmm_(a.t(), b);
    return;
  }
  for (int64_t i0 = 0; i0 < d; i0 += kGramBlock) {
    const int64_t i1 = std::min(d, i0 + kGramBlock);
    auto acc_rows = acc.slice(0, i0, i1).slice(1, i0, d);
    acc_rows.addmm_(a.slice(1, i0, i1).t(), b.slice(1, i0, d));
  }
}

// Always mirrored, also after a full product: GEMM blocking can leave G off
// symmetric in the last bit, and the regulariser algebra assumes G = G^T.
at::Tensor mirror_upper(const at::Tensor& g) { return at::triu(g) + at::triu(g, 1).t(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_linear_cpu(const at::Tensor& x_in, const at::Tensor& M_in,
                                                                  const std::optional<at::Tensor>& c_in,
                                                                  bool stats) {
  check_relaxed_linear_args(x_in, M_in, c_in);
  // Autograd is handled above this kernel; detached views keep the worker threads'
  // ATen calls (which do not inherit this thread's dispatch state) out of it.
  const auto x = x_in.detach(), M = M_in.detach();
  const std::optional<at::Tensor> c = c_in.has_value() ? std::optional<at::Tensor>(c_in->detach()) : std::nullopt;
  check_cpu(x, "relaxed_linear", "x", /*reduced_ok=*/true);
  check_cpu(M, "relaxed_linear", "M", /*reduced_ok=*/true);
  const int64_t n = x.size(0), d_in = x.size(1), d_out = M.size(0);
  const auto sdt = stats_dtype(x.scalar_type());
  auto y = at::empty({n, d_out}, x.options());
  at::Tensor G = stats ? at::zeros({d_in, d_in}, x.options().dtype(sdt)) : at::empty({0, 0}, x.options().dtype(sdt));
  at::Tensor s = stats ? at::zeros({d_in}, x.options().dtype(sdt)) : at::empty({0}, x.options().dtype(sdt));
  if (n == 0) {
    if (c.has_value()) y.copy_(c->expand({0, d_out}));
    return {y, G, s};
  }
  const auto Mt = M.t();
  const bool cast_stats = stats && sdt != x.scalar_type();
  if (use_whole_matrix_path(x, d_out)) {
    if (c.has_value()) {
      at::addmm_out(y, *c, x, Mt);
    } else {
      at::mm_out(y, x, Mt);
    }
    if (stats) {
      const auto xs = cast_stats ? x.to(sdt) : x;
      accumulate_gram(G, xs, xs, /*symmetric=*/true);
      at::sum_out(s, xs, {0});
      G = mirror_upper(G);
    }
    return {y, G, s};
  }
  const int64_t chunk = rows_per_chunk(d_in, x.element_size());
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n_chunks)));
  std::vector<at::Tensor> G_part, s_part;
  if (stats) {
    for (int t = 0; t < nthreads; ++t) {
      G_part.push_back(t == 0 ? G : at::zeros_like(G));
      s_part.push_back(t == 0 ? s : at::zeros_like(s));
    }
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * chunk, r1 = std::min(n, r0 + chunk);
      const auto xc = x.slice(0, r0, r1);
      auto yc = y.slice(0, r0, r1);
      if (c.has_value()) {
        at::addmm_out(yc, *c, xc, Mt);
      } else {
        at::mm_out(yc, xc, Mt);
      }
      if (stats) {
        const auto xs = cast_stats ? xc.to(sdt) : xc;
        accumulate_gram(G_part[tid], xs, xs, /*symmetric=*/true);
        s_part[tid].add_(xs.sum(0));
      }
    }
  });
  if (stats) {
    for (int t = 1; t < nthreads; ++t) {
      G.add_(G_part[t]);
      s.add_(s_part[t]);
    }
    G = mirror_upper(G);
  }
  return {y, G, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_linear_backward_cpu(const at::Tensor& dy_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& M_in,
                                                                           std::array<bool, 3> output_mask) {
  check_relaxed_linear_backward_args(dy_in, x_in, M_in);
  const auto dy = dy_in.detach(), x = x_in.detach(), M = M_in.detach();
  check_cpu(dy, "relaxed_linear_backward", "dy", /*reduced_ok=*/true);
  check_cpu(x, "relaxed_linear_backward", "x", /*reduced_ok=*/true);
  check_cpu(M, "relaxed_linear_backward", "M", /*reduced_ok=*/true);
  const bool need_dx = output_mask[0], need_dM = output_mask[1], need_dc = output_mask[2];
  const int64_t n = x.size(0), d_in = x.size(1), d_out = M.size(0);
  auto dx = need_dx ? at::empty({n, d_in}, x.options()) : at::empty({0}, x.options());
  auto dM = need_dM ? at::zeros({d_out, d_in}, x.options()) : at::empty({0}, x.options());
  auto dc = need_dc ? at::zeros({d_out}, x.options()) : at::empty({0}, x.options());
  if (n == 0 || !(need_dx || need_dM || need_dc)) return {dx, dM, dc};
  if (use_whole_matrix_path(x, d_out)) {
    if (need_dx) at::mm_out(dx, dy, M);
    if (need_dM) at::mm_out(dM, dy.t(), x);
    if (need_dc) at::sum_out(dc, dy, {0});
    return {dx, dM, dc};
  }
  const int64_t chunk = rows_per_chunk(std::max(d_in, d_out), x.element_size());
  const int64_t n_chunks = (n + chunk - 1) / chunk;
  const int nthreads = std::max(1, std::min<int>(at::get_num_threads(), static_cast<int>(n_chunks)));
  std::vector<at::Tensor> dM_part, dc_part;
  for (int t = 0; t < nthreads; ++t) {
    if (need_dM) dM_part.push_back(t == 0 ? dM : at::zeros_like(dM));
    if (need_dc) dc_part.push_back(t == 0 ? dc : at::zeros_like(dc));
  }
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    const int tid = std::min(at::get_thread_num(), nthreads - 1);
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * chunk, r1 = std::min(n, r0 + chunk);
      const auto dyc = dy.slice(0, r0, r1);
      if (need_dx) {
        auto dxc = dx.slice(0, r0, r1);
        at::mm_out(dxc, dyc, M);
      }
      if (need_dM) accumulate_gram(dM_part[tid], dyc, x.slice(0, r0, r1), /*symmetric=*/false);
      if (need_dc) dc_part[tid].add_(dyc.sum(0));
    }
  });
  for (int t = 1; t < nthreads; ++t) {
    if (need_dM) dM.add_(dM_part[t]);
    if (need_dc) dc.add_(dc_part[t]);
  }
  return {dx, dM, dc};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxed_linear", &relaxed_linear_cpu);
  m.impl("relaxed_linear_backward", &relaxed_linear_backward_cpu);
}

}  // namespace relaxeq
