// CUDA vn_leaky_relu: ATen glue around the kernels in vn_leaky_relu.cu. Here the arguments
// are checked, made contiguous, outputs allocated, the device guard and stream set and the
// dtype dispatched; the kernels see raw pointers. Compiled by the host compiler: only
// c10/cuda headers, no ATen/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../vn_leaky_relu.h"
#include "glue_checks.h"
#include "vn_leaky_relu_params.h"

namespace relaxeq {
namespace {

void launch(at::ScalarType dtype, const cuda::VnLeakyReluParams& p, bool forward) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  switch (dtype) {
    case at::kFloat:
      forward ? cuda::vn_leaky_relu_forward_f32(p, stream) : cuda::vn_leaky_relu_backward_f32(p, stream);
      break;
    case at::kDouble:
      forward ? cuda::vn_leaky_relu_forward_f64(p, stream) : cuda::vn_leaky_relu_backward_f64(p, stream);
      break;
    case at::kHalf:
      forward ? cuda::vn_leaky_relu_forward_f16(p, stream) : cuda::vn_leaky_relu_backward_f16(p, stream);
      break;
    case at::kBFloat16:
      forward ? cuda::vn_leaky_relu_forward_bf16(p, stream) : cuda::vn_leaky_relu_backward_bf16(p, stream);
      break;
    default:
      TORCH_CHECK(false, "vn_leaky_relu (CUDA): unsupported dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

cuda::VnLeakyReluParams make_params(const at::Tensor& x, const at::Tensor& d, double negative_slope, double eps) {
  cuda::VnLeakyReluParams p;
  p.n = x.size(0);
  p.c = x.size(1);
  p.cd = d.size(1);
  p.negative_slope = negative_slope;
  p.eps = eps;
  p.x = x.const_data_ptr();
  p.d = d.const_data_ptr();
  return p;
}

at::Tensor vn_leaky_relu_cuda(const at::Tensor& x_in, const at::Tensor& d_in, double negative_slope, double eps) {
  check_vn_leaky_relu_args(x_in, d_in, negative_slope, eps);
  check_cuda(x_in, "vn_leaky_relu", "x", x_in);
  check_cuda(d_in, "vn_leaky_relu", "d", x_in);
  check_dtype(x_in, "vn_leaky_relu");
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Autograd is registered above this kernel (relaxeq_fast/_ops/vn_leaky_relu.py). The kernels index
  // contiguous [N, C, 3] buffers: contiguous() is a no-op for the usual layout.
  const auto x = x_in.detach().contiguous(), d = d_in.detach().contiguous();
  auto out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  auto p = make_params(x, d, negative_slope, eps);
  p.out = out.data_ptr();
  launch(x.scalar_type(), p, /*forward=*/true);
  return out;
}

std::tuple<at::Tensor, at::Tensor> vn_leaky_relu_backward_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                               const at::Tensor& d_in, double negative_slope,
                                                               double eps, std::array<bool, 2> output_mask) {
  check_vn_leaky_relu_backward_args(grad_in, x_in, d_in, negative_slope, eps);
  check_cuda(x_in, "vn_leaky_relu_backward", "x", x_in);
  check_cuda(d_in, "vn_leaky_relu_backward", "d", x_in);
  check_cuda(grad_in, "vn_leaky_relu_backward", "grad_out", x_in);
  check_dtype(x_in, "vn_leaky_relu_backward");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto g = grad_in.detach().contiguous(), x = x_in.detach().contiguous(), d = d_in.detach().contiguous();
  const bool need_gx = output_mask[0], need_gd = output_mask[1];
  // Every entry of grad_x / grad_d is written by the kernels (a shared d's rows included), so empty suffices.
  auto gx = need_gx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto gd = need_gd ? at::empty(d.sizes(), d.options()) : at::empty({0}, d.options());
  if (x.size(0) == 0 || !(need_gx || need_gd)) return {gx, gd};
  auto p = make_params(x, d, negative_slope, eps);
  p.grad_out = g.const_data_ptr();
  if (need_gx) p.grad_x = gx.data_ptr();
  if (need_gd) p.grad_d = gd.data_ptr();
  launch(x.scalar_type(), p, /*forward=*/false);
  return {gx, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("vn_leaky_relu", &vn_leaky_relu_cuda);
  m.impl("vn_leaky_relu_backward", &vn_leaky_relu_backward_cuda);
}

}  // namespace relaxeq
