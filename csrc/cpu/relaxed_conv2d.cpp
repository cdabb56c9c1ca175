// CPU relaxed_conv2d: y = conv2d(x, M) + c, r = sum z^2 and S = weight gradient of z, with
// z = conv2d(x^, D), from one convolution.
//
// The forward is one at::convolution over the stacked kernel [M; D] (the input is read once), then one
// parallel epilogue over the output planes that copies the y planes out with the bias added and
// square-sums the defect planes into r, then one weight-gradient call (at::convolution_backward with
// the z planes as grad_output, weight only) that gives S = sum over positions of z (x) patch, while z
// is still live (the stacked output is freed on return). r is quadratic in D: r = <D, S> and
// dr/dD = 2 S, so the autograd formula forms dD = 2 dr S from the saved S and nothing recomputes z.
// need_S = false (no gradient for D wanted) skips the weight-gradient call and returns S empty.
// benchmarks/README.md has the measured step ratios.
//
// Backward (gradients of y only): relaxed_conv2d_backward_aten (../relaxed_conv2d.h), shared with CUDA.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
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
  using acc_t = at::opmath_type<T>;
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
        const acc_t add = bias != nullptr ? static_cast<acc_t>(bias[ch]) : acc_t(0);
        for (int64_t i = 0; i < plane; ++i) d[i] = static_cast<T>(static_cast<acc_t>(s[i]) + add);
      } else {
        // acc_t (float for float and the half types) vectorises; one plane is short enough (H' W' terms).
        acc_t acc = acc_t(0);
        for (int64_t i = 0; i < plane; ++i) acc += static_cast<acc_t>(s[i]) * static_cast<acc_t>(s[i]);
        partial[static_cast<size_t>(b * c_d + (ch - c_out))] = static_cast<double>(acc);
      }
    }
  });
  double r = 0.0;
  for (const double v : partial) r += v;
  return r;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& M_in,
                                                                  const std::optional<at::Tensor>& c_in,
                                                                  const std::optional<at::Tensor>& D_in,
                                                                  int64_t padding, bool need_S) {
  const char* op = "relaxed_conv2d";
  check_relaxed_conv2d_args(x_in, M_in, c_in, D_in, padding);
  // Autograd is registered above this kernel (relaxeq_fast/_ops/relaxed_conv2d.py); detached views keep the
  // worker threads' ATen calls out of it.
  const auto x = x_in.detach(), M = M_in.detach();
  const auto c = detached(c_in), D = detached(D_in);
  check_cpu(x, op, "x", /*reduced_ok=*/true);
  const auto sdt = stats_dtype(x.scalar_type());
  if (!D.has_value()) {
    return {conv(x, M, c, padding).contiguous(), at::empty({0}, x.options().dtype(sdt)),
            at::empty({0}, x.options().dtype(sdt))};
  }
  const int64_t c_out = M.size(0);
  const auto out = conv(x, at::cat({M, *D}, 0), std::nullopt, padding).contiguous();
  auto y = at::empty({out.size(0), c_out, out.size(2), out.size(3)}, x.options());
  double r = 0.0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "relaxed_conv2d_cpu",
                                  [&] { r = split_epilogue<scalar_t>(out, y, c, c_out); });
  const auto r_t = at::scalar_tensor(r, x.options().dtype(sdt));
  if (!need_S) return {y, r_t, at::empty({0}, x.options().dtype(sdt))};
  // S = sum_positions z (x) patch: the weight gradient of z, taken while z (the defect planes of
  // `out`) is live; in the stats dtype (float32 for the half types: a sum over every position).
  const auto z = out.narrow(1, c_out, D->size(0)).to(sdt);
  auto S = std::get<1>(at::convolution_backward(z, x.to(sdt), D->to(sdt), std::nullopt, /*stride=*/{1, 1},
                                                /*padding=*/{padding, padding}, /*dilation=*/{1, 1},
                                                /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1,
                                                {false, true, false}));
  return {y, r_t, S.to(sdt).contiguous()};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_backward_cpu(const at::Tensor& dy_in,
                                                                           const at::Tensor& x_in,
                                                                           const at::Tensor& M_in, int64_t padding,
                                                                           std::array<bool, 3> output_mask) {
  const char* op = "relaxed_conv2d_backward";
  check_relaxed_conv2d_backward_args(dy_in, x_in, M_in, padding);
  const auto dy = dy_in.detach(), x = x_in.detach(), M = M_in.detach();
  check_cpu(x, op, "x", /*reduced_ok=*/true);
  return relaxed_conv2d_backward_aten(dy, x, M, padding, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxed_conv2d", &relaxed_conv2d_cpu);
  m.impl("relaxed_conv2d_backward", &relaxed_conv2d_backward_cpu);
}

}  // namespace relaxeq
