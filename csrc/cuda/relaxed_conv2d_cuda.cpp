// CUDA relaxed_conv2d: ATen glue around the forward kernel in relaxed_conv2d.cu (checks, allocation,
// device guard and stream, dtype dispatch, the fixed-order sum of the per-block partials of r).
// The kernel also accumulates S = weight gradient of z (atomicAdd into a zero-filled [C_d, C_in k^2]
// buffer) unless need_S is false; the autograd formula forms dD = 2 dr S from it. The backward
// (gradients of y only) is relaxed_conv2d_backward_aten (../relaxed_conv2d.h), shared with the CPU.
// Only c10/cuda headers, no ATen/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../relaxed_conv2d.h"
#include "glue_checks.h"
#include "relaxed_conv2d_params.h"

namespace relaxeq {
namespace {

void launch(at::ScalarType dtype, const cuda::RelaxedConv2dParams& p) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (dtype) {
    case at::kFloat:
      cuda::relaxed_conv2d_launch_f32(p, stream);
      break;
    case at::kDouble:
      cuda::relaxed_conv2d_launch_f64(p, stream);
      break;
    case at::kHalf:
      cuda::relaxed_conv2d_launch_f16(p, stream);
      break;
    case at::kBFloat16:
      cuda::relaxed_conv2d_launch_bf16(p, stream);
      break;
    default:
      TORCH_CHECK(false, "relaxed_conv2d (CUDA): unsupported dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void copy_strides(int64_t (&dst)[4], const at::Tensor& t) {
  for (int i = 0; i < 4; ++i) dst[i] = t.stride(i);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_cuda(const at::Tensor& x_in, const at::Tensor& M_in,
                                                                   const std::optional<at::Tensor>& c_in,
                                                                   const std::optional<at::Tensor>& D_in,
                                                                   int64_t padding, bool need_S) {
  const char* op = "relaxed_conv2d";
  check_relaxed_conv2d_args(x_in, M_in, c_in, D_in, padding);
  const auto x = x_in.detach(), M = M_in.detach();
  check_cuda(x, op, "x", x);
  check_cuda(M, op, "M", x);
  if (c_in.has_value()) check_cuda(*c_in, op, "c", x);
  if (D_in.has_value()) check_cuda(*D_in, op, "D", x);
  check_dtype(x, op);
  const c10::cuda::CUDAGuard guard(x.device());

  cuda::RelaxedConv2dParams p;
  p.batch = x.size(0);
  p.c_in = x.size(1);
  p.h = x.size(2);
  p.w = x.size(3);
  p.k = M.size(2);
  p.pad = padding;
  p.ho = p.h + 2 * padding - p.k + 1;
  p.wo = p.w + 2 * padding - p.k + 1;
  p.c_out = M.size(0);
  p.c_d = D_in.has_value() ? D_in->size(0) : 0;
  const auto sdt = stats_dtype(x.scalar_type());
  auto y = at::empty({p.batch, p.c_out, p.ho, p.wo}, x.options());
  p.x = x.const_data_ptr();
  copy_strides(p.x_stride, x);
  p.m = M.const_data_ptr();
  copy_strides(p.m_stride, M);
  if (c_in.has_value()) {
    p.bias = c_in->const_data_ptr();
    p.bias_stride = c_in->stride(0);
  }
  p.y = y.data_ptr();
  copy_strides(p.y_stride, y);
  at::Tensor partial, S;
  if (D_in.has_value()) {
    p.d = D_in->const_data_ptr();
    copy_strides(p.d_stride, *D_in);
    partial = at::zeros({cuda::relaxed_conv2d_num_blocks(p)}, x.options().dtype(sdt));
    p.partial = partial.data_ptr();
    if (need_S) {
      at::globalContext().alertNotDeterministic("relaxeq::relaxed_conv2d (CUDA) with need_S (S summed with atomics)");
      S = at::zeros({p.c_d, p.c_in, p.k, p.k}, x.options().dtype(sdt));
      p.s = S.data_ptr();
    }
  }
  launch(x.scalar_type(), p);
  const auto empty = [&] { return at::empty({0}, x.options().dtype(sdt)); };
  if (!D_in.has_value()) return {y, empty(), empty()};
  return {y, partial.sum(), need_S ? S : empty()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_backward_cuda(const at::Tensor& dy_in,
                                                                            const at::Tensor& x_in,
                                                                            const at::Tensor& M_in, int64_t padding,
                                                                            std::array<bool, 3> output_mask) {
  const char* op = "relaxed_conv2d_backward";
  check_relaxed_conv2d_backward_args(dy_in, x_in, M_in, padding);
  const auto dy = dy_in.detach(), x = x_in.detach(), M = M_in.detach();
  check_cuda(x, op, "x", x);
  check_cuda(dy, op, "dy", x);
  check_cuda(M, op, "M", x);
  check_dtype(x, op);
  const c10::cuda::CUDAGuard guard(x.device());
  return relaxed_conv2d_backward_aten(dy, x, M, padding, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("relaxed_conv2d", &relaxed_conv2d_cuda);
  m.impl("relaxed_conv2d_backward", &relaxed_conv2d_backward_cuda);
}

}  // namespace relaxeq
