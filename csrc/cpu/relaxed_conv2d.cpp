// CPU relaxed_conv2d: y = conv2d(x, M) + c and r = sum conv2d(x^, D)^2 in one convolution.
//
// The forward is one at::convolution over the stacked kernel [M; D] (the input is read once), then one
// parallel epilogue over the output planes that copies the y planes out with the bias added and
// square-sums the defect planes into r (the stacked output is freed on return). On a quiet 2-thread
// run (B = 64, 28x28, k = 5, float32) this is no faster than two separate oneDNN convolutions, and
// im2col + GEMM per image was slower than both; benchmarks/README.md has the measured step ratios.
//
// Backward: dx = conv_transpose(dy, M) from dy and M only (r does not depend on x); dM = weight
// gradient of dy; dD = weight gradient of 2 dr z, with z = conv2d(x^, D) recomputed here rather
// than saved by the forward; dc = sum dy.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../relaxed_conv2d.h"
#include "cpu_checks.h"

namespace relaxeq {
namespace {

std::optional<at::Tensor> detached(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach()) : std::nullopt;
}

at::Tensor conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias, int64_t padding) {
  return at::convolution(x, w, bias, /*stride=*/{1, 1}, /*padding=*/{padding, padding}, /*dilation=*/{1, 1},
                         /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
}

// From the stacked output [B, C_out + C_d, H', W']: y planes (+ c) into `y`, and the sum of squares
// of the defect planes. Partial sums are kept per plane (in double) and added in a fixed order, so
// r does not depend on the thread count.
template <typename T>
double split_epilogue(const at::Tensor& out, at::Tensor& y, const std::optional<at::Tensor>& c, int64_t c_out) {
  const int64_t batch = out.size(0), c_all = out.size(1), plane = out.size(2) * out.size(3);
  const int64_t c_d = c_all - c_out;
  const T* src = out.const_data_ptr<T>();
  T* dst = y.data_ptr<T>();
  const at::Tensor cc = c.has_value() ? c->contiguous() : at::Tensor();
  const T* bias = c.has_value() ? cc.const_data_ptr<T>() : nullptr;
  std::vector<double> partial(static_cast<size_t>(batch * c_d), 0.0);
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, plane));
  at::parallel_for(0, batch * c_all, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t b = p / c_all, ch = p % c_all;
      const T* s = src + p * plane;
      if (ch < c_out) {
        T* d = dst + (b * c_out + ch) * plane;
        const T add = bias != nullptr ? bias[ch] : T(0);
        for (int64_t i = 0; i < plane; ++i) d[i] = s[i] + add;
      } else {
        // T accumulators vectorise; one plane is short enough (H' W' terms) for T = float.
        T acc = T(0);
        for (int64_t i = 0; i < plane; ++i) acc += s[i] * s[i];
        partial[static_cast<size_t>(b * c_d + (ch - c_out))] = static_cast<double>(acc);
      }
    }
  });
  double r = 0.0;
  for (const double v : partial) r += v;
  return r;
}

std::tuple<at::Tensor, at::Tensor> relaxed_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& M_in,
                                                      const std::optional<at::Tensor>& c_in,
                                                      const std::optional<at::Tensor>& D_in, int64_t padding) {
  const char* op = "relaxed_conv2d";
  check_relaxed_conv2d_args(x_in, M_in, c_in, D_in, padding);
  // Autograd is registered above this kernel (relaxeq_fast/_ops.py); detached views keep the
  // worker threads' ATen calls out of it.
  const auto x = x_in.detach(), M = M_in.detach();
  const auto c = detached(c_in), D = detached(D_in);
  check_cpu(x, op, "x");
  const auto sdt = stats_dtype(x.scalar_type());
  if (!D.has_value()) {
    return {conv(x, M, c, padding).contiguous(), at::empty({0}, x.options().dtype(sdt))};
  }
  const int64_t c_out = M.size(0);
  const auto out = conv(x, at::cat({M, *D}, 0), std::nullopt, padding).contiguous();
  auto y = at::empty({out.size(0), c_out, out.size(2), out.size(3)}, x.options());
  double r = 0.0;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "relaxed_conv2d_cpu",
                             [&] { r = split_epilogue<scalar_t>(out, y, c, c_out); });
  return {y, at::scalar_tensor(r, x.options().dtype(sdt))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_backward_cpu(
    const at::Tensor& dy_in, const at::Tensor& dr_in, const at::Tensor& x_in, const at::Tensor& M_in,
    const std::optional<at::Tensor>& D_in, int64_t padding, std::array<bool, 4> output_mask) {
  const char* op = "relaxed_conv2d_backward";
  check_relaxed_conv2d_backward_args(dy_in, dr_in, x_in, M_in, D_in, padding);
  const auto dy = dy_in.detach(), x = x_in.detach(), M = M_in.detach();
  const auto D = detached(D_in);
  check_cpu(x, op, "x");
  const bool need_dx = output_mask[0], need_dM = output_mask[1], need_dc = output_mask[2];
  const bool need_dD = output_mask[3] && D.has_value();
  // Outputs not asked for are distinct empty [0] tensors (outputs must not alias).
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = empty(), dM = empty(), dc = empty(), dD = empty();
  const std::vector<int64_t> stride{1, 1}, pad{padding, padding}, dilation{1, 1}, out_pad{0, 0};

  if (need_dx) {
    dx = std::get<0>(at::convolution_backward(dy, x, M, std::nullopt, stride, pad, dilation, false, out_pad, 1,
                                              {true, false, false}));
  }
  // Weight gradients in two calls: one over [dy; 2 dr z] with the stacked kernel measured slower
  // than the two separate ones (oneDNN picks a worse weight-gradient path for it).
  const auto weight_grad = [&](const at::Tensor& grad_out, const at::Tensor& weight) {
    return std::get<1>(at::convolution_backward(grad_out, x, weight, std::nullopt, stride, pad, dilation, false,
                                                out_pad, 1, {false, true, false}));
  };
  if (need_dM) dM = weight_grad(dy, M);
  if (need_dD) {
    // z recomputed (the forward never stored it); its cotangent 2 dr z overwrites it in place.
    auto gz = conv(x, *D, std::nullopt, padding);
    gz.mul_(dr_in.detach().to(x.scalar_type()).reshape({}) * 2);
    dD = weight_grad(gz, *D);
  }
  if (need_dc) dc = dy.sum({0, 2, 3});
  return {dx, dM, dc, dD};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxed_conv2d", &relaxed_conv2d_cpu);
  m.impl("relaxed_conv2d_backward", &relaxed_conv2d_backward_cpu);
}

}  // namespace relaxeq
