// CUDA relaxed_linear: ATen glue around the kernel in relaxed_linear.cu. Here the
// arguments are checked, outputs and accumulators allocated, the device guard and
// stream set and the dtype dispatched; the kernel sees raw pointers and strides.
// Compiled by the host compiler: only c10/cuda headers, no ATen/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../relaxed_linear.h"
#include "glue_checks.h"
#include "relaxed_linear_params.h"

namespace relaxeq {
namespace {

void launch(at::ScalarType dtype, const cuda::RelaxedLinearParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (dtype) {
    case at::kFloat:
      cuda::relaxed_linear_launch_f32(p, stream);
      break;
    case at::kDouble:
      cuda::relaxed_linear_launch_f64(p, stream);
      break;
    case at::kHalf:
      cuda::relaxed_linear_launch_f16(p, stream);
      break;
    case at::kBFloat16:
      cuda::relaxed_linear_launch_bf16(p, stream);
      break;
    default:
      TORCH_CHECK(false, "relaxed_linear (CUDA): unsupported dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The kernel accumulates only the square blocks on and above the diagonal of a Gram
// matrix. Diagonal blocks are computed in full, but their (a, b) and (b, a) entries are
// summed over row blocks by atomics in different orders, so they can differ in the last
// bit (seen on an H200): mirror the upper triangle to make G exactly symmetric.
void mirror_upper_(at::Tensor& g) {
  g.triu_();
  g.add_(g.triu(1).t());
}

// The tiled kernel reads x once for y, G and s and launches once, which pays for narrow layers;
// wider ones are math-bound (about D/2 FLOP per byte), where cuBLAS's GEMMs run faster. Measured
// on an H200 (bench_relaxed_linear.py --op-routes, forward + backward): 7200 rows, D = 63:
// 0.046 ms tiled vs 0.122 cuBLAS; D = 126: 0.101 vs 0.118; D = 255: 0.281 vs 0.159; D = 1023:
// 4.81 vs 1.38. torch.ops.relaxeq.cuda_fused_max_dim (RELAXEQ_CUDA_FUSED_MAX_DIM at start) moves the
// switch (0: always cuBLAS). The tiled kernel sums G, s, dM and dc with atomics: under
// torch.use_deterministic_algorithms(True) every layer takes the cuBLAS route, which has no atomics.
bool use_fused_kernel(int64_t d_in, int64_t d_out) {
  if (at::globalContext().deterministicAlgorithms()) return false;
  const int64_t max_dim = cuda_fused_max_dim();
  return d_in <= max_dim && d_out <= max_dim;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_linear_cuda(const at::Tensor& x_in, const at::Tensor& M_in,
                                                                   const std::optional<at::Tensor>& c_in,
                                                                   bool stats) {
  check_relaxed_linear_args(x_in, M_in, c_in);
  // Autograd is registered above this kernel (relaxeq_fast/_ops/relaxed_linear.py).
  const auto x = x_in.detach(), M = M_in.detach();
  const std::optional<at::Tensor> c = c_in.has_value() ? std::optional<at::Tensor>(c_in->detach()) : std::nullopt;
  check_cuda(x, "relaxed_linear", "x", x);
  check_cuda(M, "relaxed_linear", "M", x);
  if (c.has_value()) check_cuda(*c, "relaxed_linear", "c", x);
  check_dtype(x, "relaxed_linear");
  const c10::cuda::CUDAGuard guard(x.device());

  const int64_t n = x.size(0), d_in = x.size(1), d_out = M.size(0);
  const auto sdt = stats_dtype(x.scalar_type());
  auto y = at::empty({n, d_out}, x.options());
  auto G = stats ? at::zeros({d_in, d_in}, x.options().dtype(sdt)) : at::empty({0, 0}, x.options().dtype(sdt));
  auto s = stats ? at::zeros({d_in}, x.options().dtype(sdt)) : at::empty({0}, x.options().dtype(sdt));
  if (n == 0) return {y, G, s};
  if (!use_fused_kernel(d_in, d_out)) {
    if (c.has_value()) {
      at::addmm_out(y, *c, x, M.t());
    } else {
      at::mm_out(y, x, M.t());
    }
    if (stats) {
      const auto xs = x.to(sdt);  // G and s accumulate in float32 (double for double)
      at::mm_out(G, xs.t(), xs);
      mirror_upper_(G);
      at::sum_out(s, xs, {0});
    }
    return {y, G, s};
  }

  cuda::RelaxedLinearParams p;
  p.n = n;
  p.ka = d_in;
  p.o = d_out;
  p.kb = d_in;
  p.a = x.const_data_ptr();
  p.a_row_stride = x.stride(0);
  p.a_col_stride = x.stride(1);
  p.w = M.const_data_ptr();
  p.w_row_stride = M.stride(0);
  p.w_col_stride = M.stride(1);
  if (c.has_value()) {
    p.bias = c->const_data_ptr();
    p.bias_stride = c->stride(0);
  }
  p.b = p.a;
  p.b_row_stride = p.a_row_stride;
  p.b_col_stride = p.a_col_stride;
  p.out1 = y.data_ptr();
  p.out1_row_stride = y.stride(0);
  p.out1_col_stride = y.stride(1);
  if (stats) {
    p.out2 = G.data_ptr();  // fresh zeros: contiguous [d_in, d_in]
    p.out3 = s.data_ptr();
  }
  p.symmetric = true;
  launch(x.scalar_type(), p);
  if (stats) mirror_upper_(G);
  return {y, G, s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_linear_backward_cuda(const at::Tensor& dy_in,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& M_in,
                                                                            std::array<bool, 3> output_mask) {
  check_relaxed_linear_backward_args(dy_in, x_in, M_in);
  const auto dy = dy_in.detach(), x = x_in.detach(), M = M_in.detach();
  check_cuda(x, "relaxed_linear_backward", "x", x);
  check_cuda(dy, "relaxed_linear_backward", "dy", x);
  check_cuda(M, "relaxed_linear_backward", "M", x);
  check_dtype(x, "relaxed_linear_backward");
  const c10::cuda::CUDAGuard guard(x.device());

  const bool need_dx = output_mask[0], need_dM = output_mask[1], need_dc = output_mask[2];
  const int64_t n = x.size(0), d_in = x.size(1), d_out = M.size(0);
  // dM and dc are sums over rows: accumulated in float (double for double), cast at the end.
  const auto acc_options = x.options().dtype(stats_dtype(x.scalar_type()));
  auto dx = need_dx ? at::empty({n, d_in}, x.options()) : at::empty({0}, x.options());
  auto dM_acc = need_dM ? at::zeros({d_out, d_in}, acc_options) : at::empty({0}, acc_options);
  auto dc_acc = need_dc ? at::zeros({d_out}, acc_options) : at::empty({0}, acc_options);

  if (n > 0 && (need_dx || need_dM || need_dc) && !use_fused_kernel(d_in, d_out)) {
    if (need_dx) at::mm_out(dx, dy, M);
    if (need_dM || need_dc) {
      const auto dys = dy.to(acc_options.dtype());
      if (need_dM) at::mm_out(dM_acc, dys.t(), x.to(acc_options.dtype()));
      if (need_dc) at::sum_out(dc_acc, dys, {0});
    }
  } else if (n > 0 && (need_dx || need_dM || need_dc)) {
    cuda::RelaxedLinearParams p;
    p.n = n;
    p.ka = d_out;
    p.o = d_in;
    p.kb = d_in;
    p.a = dy.const_data_ptr();
    p.a_row_stride = dy.stride(0);
    p.a_col_stride = dy.stride(1);
    // W = M^T [d_in, d_out]: M read through swapped strides, no copy.
    p.w = M.const_data_ptr();
    p.w_row_stride = M.stride(1);
    p.w_col_stride = M.stride(0);
    p.b = x.const_data_ptr();
    p.b_row_stride = x.stride(0);
    p.b_col_stride = x.stride(1);
    if (need_dx) {
      p.out1 = dx.data_ptr();
      p.out1_row_stride = dx.stride(0);
      p.out1_col_stride = dx.stride(1);
    }
    if (need_dM) p.out2 = dM_acc.data_ptr();  // fresh zeros: contiguous [d_out, d_in]
    if (need_dc) p.out3 = dc_acc.data_ptr();
    p.symmetric = false;
    launch(x.scalar_type(), p);
  }
  return {dx, dM_acc.to(x.scalar_type()), dc_acc.to(x.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("relaxed_linear", &relaxed_linear_cuda);
  m.impl("relaxed_linear_backward", &relaxed_linear_backward_cuda);
}

}  // namespace relaxeq
