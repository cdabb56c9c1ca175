// CUDA Vector-Neuron batch norm: ATen glue around the kernels in vn_batch_norm.cu. Here the
// arguments are checked, inputs made contiguous, outputs/workspaces allocated, the device guard
// and stream set and the dtype dispatched; the kernels see raw pointers.
// Compiled by the host compiler: only c10/cuda headers, no ATen/cuda.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../vn_batch_norm.h"
#include "glue_checks.h"
#include "vn_batch_norm_params.h"

namespace relaxeq {
namespace {

std::optional<at::Tensor> detached_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach().contiguous()) : std::nullopt;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

template <typename Params>
void dispatch(at::ScalarType dtype, const Params& p, void (*f32)(const Params&, cudaStream_t),
              void (*f64)(const Params&, cudaStream_t), void (*f16)(const Params&, cudaStream_t),
              void (*bf16)(const Params&, cudaStream_t), const char* op) {
  const cudaStream_t stream = current_stream();
  switch (dtype) {
    case at::kFloat:
      f32(p, stream);
      break;
    case at::kDouble:
      f64(p, stream);
      break;
    case at::kHalf:
      f16(p, stream);
      break;
    case at::kBFloat16:
      bf16(p, stream);
      break;
    default:
      TORCH_CHECK(false, op, " (CUDA): unsupported dtype ", dtype);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> vn_norm_stats_cuda(const at::Tensor& x_in, double norm_eps) {
  const char* op = "vn_norm_stats";
  check_vn_norm_stats_args(x_in);
  check_cuda(x_in, op, "x", x_in);
  check_dtype(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  // Autograd is registered above this kernel (relaxeq_fast/_ops/vn_batch_norm.py).
  const auto x = x_in.detach().contiguous();
  const int64_t n = x.size(0), c = x.size(1);
  const auto sopt = x.options().dtype(stats_dtype(x.scalar_type()));
  auto mean = at::empty({c}, sopt), var = at::empty({c}, sopt);
  if (n == 0) {  // the mean of no values, like torch.mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  if (c == 0) return {mean, var};
  const int64_t row_blocks = cuda::vn_batch_norm_row_blocks(n, c);
  auto part_mean = at::empty({row_blocks, c}, sopt), part_m2 = at::empty({row_blocks, c}, sopt);
  cuda::VnNormStatsParams p;
  p.n = n;
  p.c = c;
  p.norm_eps = norm_eps;
  p.x = x.const_data_ptr();
  p.part_mean = part_mean.data_ptr();
  p.part_m2 = part_m2.data_ptr();
  p.mean = mean.data_ptr();
  p.var = var.data_ptr();
  dispatch(x.scalar_type(), p, &cuda::vn_norm_stats_launch_f32, &cuda::vn_norm_stats_launch_f64,
           &cuda::vn_norm_stats_launch_f16, &cuda::vn_norm_stats_launch_bf16, op);
  return {mean, var};
}

cuda::VnBatchNormParams channel_params(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                       const std::optional<at::Tensor>& weight,
                                       const std::optional<at::Tensor>& bias, double norm_eps) {
  cuda::VnBatchNormParams p;
  p.n = x.size(0);
  p.c = x.size(1);
  p.norm_eps = norm_eps;
  p.x = x.const_data_ptr();
  p.mean = mean.const_data_ptr();
  p.invstd = invstd.const_data_ptr();
  p.weight = weight.has_value() ? weight->const_data_ptr() : nullptr;
  p.bias = bias.has_value() ? bias->const_data_ptr() : nullptr;
  return p;
}

at::Tensor vn_batch_norm_apply_cuda(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                    const std::optional<at::Tensor>& weight_in,
                                    const std::optional<at::Tensor>& bias_in, double norm_eps) {
  const char* op = "vn_batch_norm_apply";
  check_vn_batch_norm_apply_args(x_in, mean_in, invstd_in, weight_in, bias_in, op);
  check_cuda(x_in, op, "x", x_in);
  check_dtype(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto x = x_in.detach().contiguous(), mean = mean_in.detach().contiguous(),
             invstd = invstd_in.detach().contiguous();
  const auto weight = detached_contiguous(weight_in), bias = detached_contiguous(bias_in);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  auto p = channel_params(x, mean, invstd, weight, bias, norm_eps);
  p.y = y.data_ptr();
  dispatch(x.scalar_type(), p, &cuda::vn_batch_norm_apply_launch_f32, &cuda::vn_batch_norm_apply_launch_f64,
           &cuda::vn_batch_norm_apply_launch_f16, &cuda::vn_batch_norm_apply_launch_bf16, op);
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_batch_norm_apply_backward_cuda(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, double norm_eps,
    std::array<bool, 5> output_mask) {
  const char* op = "vn_batch_norm_apply_backward";
  check_vn_batch_norm_apply_backward_args(gy_in, x_in, mean_in, invstd_in, weight_in, bias_in);
  check_cuda(x_in, op, "x", x_in);
  check_dtype(x_in, op);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto gy = gy_in.detach().contiguous(), x = x_in.detach().contiguous(),
             mean = mean_in.detach().contiguous(), invstd = invstd_in.detach().contiguous();
  const auto weight = detached_contiguous(weight_in), bias = detached_contiguous(bias_in);
  const int64_t c = x.size(1);
  const bool need_gx = output_mask[0];
  const bool need_sums = output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];
  const auto sopt = x.options().dtype(stats_dtype(x.scalar_type()));
  auto gx = need_gx ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  auto s0 = at::zeros({need_sums ? c : 0}, sopt), s1 = at::zeros({need_sums ? c : 0}, sopt);
  if (x.numel() > 0 && (need_gx || need_sums)) {
    if (need_sums)
      at::globalContext().alertNotDeterministic(
          "relaxeq::vn_batch_norm_apply_backward (CUDA) (per-channel sums with atomics)");
    auto p = channel_params(x, mean, invstd, weight, bias, norm_eps);
    p.grad_y = gy.const_data_ptr();
    p.grad_x = need_gx ? gx.data_ptr() : nullptr;
    p.sum0 = need_sums ? s0.data_ptr() : nullptr;
    p.sum1 = need_sums ? s1.data_ptr() : nullptr;
    dispatch(x.scalar_type(), p, &cuda::vn_batch_norm_backward_launch_f32, &cuda::vn_batch_norm_backward_launch_f64,
             &cuda::vn_batch_norm_backward_launch_f16, &cuda::vn_batch_norm_backward_launch_bf16, op);
  }
  // Per-channel gradients from the two sums ([C] vectors, in the stats dtype); see the kernel.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto w = weight.has_value() ? weight->to(sopt.dtype()) : at::ones({c}, sopt);
  auto grad_mean = output_mask[1] ? -invstd * w * s0 : empty();
  auto grad_invstd = output_mask[2] ? w * s1 : empty();
  auto grad_weight = output_mask[3] ? (invstd * s1).to(x.scalar_type()) : empty();
  auto grad_bias = output_mask[4] ? s0.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true) : empty();
  return {gx, grad_mean, grad_invstd, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("vn_norm_stats", &vn_norm_stats_cuda);
  m.impl("vn_batch_norm_apply", &vn_batch_norm_apply_cuda);
  m.impl("vn_batch_norm_apply_backward", &vn_batch_norm_apply_backward_cuda);
}

}  // namespace relaxeq
