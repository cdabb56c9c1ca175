// CPU vn_leaky_relu: one pass over the rows, each channel's 3-vector handled in registers.
//
// Per (n, c): dot = <x, d>, s = |d|^2 + eps, k = dot / s, b = 1 - negative_slope;
//   dot >= 0:  out = x                       (= a x + b x)
//   dot <  0:  out = x - b k d               (= a x + b (x - k d))
// Backward, with g = grad_out and gd = <g, d>, on the projected branch only (the other is the identity):
//   grad_x = g - (b / s) gd d
//   grad_d = -(b / s) (gd x + dot g - 2 gd k d)     (through dot, and through s = |d|^2 + eps)
// A shared direction d [N, 1, 3] gets the sum of grad_d over the channels of its row.
//
// Inputs are made contiguous in the glue ([N, C, 3] with xyz fastest): the kernels index raw
// pointers, and VN features are contiguous in practice, so a copy is the rare case.
// Rows are independent, so parallel_for over rows needs no reduction across threads (the
// shared-d channel sum stays inside one row).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>

#include "../vn_leaky_relu.h"

namespace relaxeq {
namespace {

// Rows per parallel_for task: ~4K vectors, so small inputs are not split into tiny tasks.
int64_t grain_rows(int64_t channels) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, channels)); }

template <typename T>
void forward_rows(const T* __restrict__ x, const T* __restrict__ d, T* __restrict__ out, int64_t n, int64_t c,
                  int64_t cd, T slope, T eps) {
  const T b = T(1) - slope;
  at::parallel_for(0, n, grain_rows(c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* xv = x + (row * c + ch) * 3;
        const T* dv = d + (row * cd + (cd == 1 ? 0 : ch)) * 3;
        T* ov = out + (row * c + ch) * 3;
        const T dot = xv[0] * dv[0] + xv[1] * dv[1] + xv[2] * dv[2];
        if (dot >= T(0)) {
          ov[0] = xv[0];
          ov[1] = xv[1];
          ov[2] = xv[2];
        } else {
          const T s = dv[0] * dv[0] + dv[1] * dv[1] + dv[2] * dv[2] + eps;
          const T f = b * (dot / s);
          ov[0] = xv[0] - f * dv[0];
          ov[1] = xv[1] - f * dv[1];
          ov[2] = xv[2] - f * dv[2];
        }
      }
    }
  });
}

// gx / gd are nullptr when not wanted. gd is [N, cd, 3]; for cd == 1 it is the channel sum.
template <typename T>
void backward_rows(const T* __restrict__ g, const T* __restrict__ x, const T* __restrict__ d, T* __restrict__ gx,
                   T* __restrict__ gd, int64_t n, int64_t c, int64_t cd, T slope, T eps) {
  const T b = T(1) - slope;
  const bool shared = cd == 1;
  at::parallel_for(0, n, grain_rows(c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      T sum[3] = {T(0), T(0), T(0)};  // shared d: grad_d of this row, summed over channels
      for (int64_t ch = 0; ch < c; ++ch) {
        const int64_t v = (row * c + ch) * 3;
        const int64_t dvi = (row * cd + (shared ? 0 : ch)) * 3;
        const T* xv = x + v;
        const T* gv = g + v;
        const T* dv = d + dvi;
        const T dot = xv[0] * dv[0] + xv[1] * dv[1] + xv[2] * dv[2];
        T r[3] = {T(0), T(0), T(0)};  // this vector's grad_d
        if (dot >= T(0)) {
          if (gx != nullptr) {
            gx[v] = gv[0];
            gx[v + 1] = gv[1];
            gx[v + 2] = gv[2];
          }
        } else {
          const T s = dv[0] * dv[0] + dv[1] * dv[1] + dv[2] * dv[2] + eps;
          const T t = b / s;
          const T k = dot / s;
          const T gdot = gv[0] * dv[0] + gv[1] * dv[1] + gv[2] * dv[2];
          if (gx != nullptr) {
            const T f = t * gdot;
            gx[v] = gv[0] - f * dv[0];
            gx[v + 1] = gv[1] - f * dv[1];
            gx[v + 2] = gv[2] - f * dv[2];
          }
          const T fd = T(2) * gdot * k;
          for (int i = 0; i < 3; ++i) r[i] = -t * (gdot * xv[i] + dot * gv[i] - fd * dv[i]);
        }
        if (gd != nullptr) {
          if (shared) {
            sum[0] += r[0];
            sum[1] += r[1];
            sum[2] += r[2];
          } else {
            gd[dvi] = r[0];
            gd[dvi + 1] = r[1];
            gd[dvi + 2] = r[2];
          }
        }
      }
      if (gd != nullptr && shared) {
        gd[row * 3] = sum[0];
        gd[row * 3 + 1] = sum[1];
        gd[row * 3 + 2] = sum[2];
      }
    }
  });
}

void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, " (CPU): ", name,
              " must be float32 or float64 on CPU, got ", t.scalar_type());
}

at::Tensor vn_leaky_relu_cpu(const at::Tensor& x_in, const at::Tensor& d_in, double negative_slope, double eps) {
  check_vn_leaky_relu_args(x_in, d_in, negative_slope, eps);
  // Autograd is registered above this kernel (relaxeq_fast/_ops/vn_leaky_relu.py); detached contiguous
  // copies-or-views are what the raw-pointer loops index.
  const auto x = x_in.detach().contiguous(), d = d_in.detach().contiguous();
  check_cpu(x, "vn_leaky_relu", "x");
  check_cpu(d, "vn_leaky_relu", "d");
  auto out = at::empty(x.sizes(), x.options());
  const int64_t n = x.size(0), c = x.size(1), cd = d.size(1);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_leaky_relu_cpu", [&] {
    forward_rows<scalar_t>(x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                           c, cd, static_cast<scalar_t>(negative_slope), static_cast<scalar_t>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> vn_leaky_relu_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                              const at::Tensor& d_in, double negative_slope,
                                                              double eps, std::array<bool, 2> output_mask) {
  check_vn_leaky_relu_backward_args(grad_in, x_in, d_in, negative_slope, eps);
  const auto g = grad_in.detach().contiguous(), x = x_in.detach().contiguous(), d = d_in.detach().contiguous();
  check_cpu(g, "vn_leaky_relu_backward", "grad_out");
  check_cpu(x, "vn_leaky_relu_backward", "x");
  check_cpu(d, "vn_leaky_relu_backward", "d");
  const bool need_gx = output_mask[0], need_gd = output_mask[1];
  // grad_d is fully written (every row, also rows whose channels all kept x), so empty is enough.
  auto gx = need_gx ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  auto gd = need_gd ? at::empty(d.sizes(), d.options()) : at::empty({0}, d.options());
  const int64_t n = x.size(0), c = x.size(1), cd = d.size(1);
  if (n == 0 || !(need_gx || need_gd)) return {gx, gd};
  if (c == 0) {  // no channels: a shared d gets an empty sum
    if (need_gd) gd.zero_();
    return {gx, gd};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_leaky_relu_backward_cpu", [&] {
    backward_rows<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), d.const_data_ptr<scalar_t>(),
                            need_gx ? gx.data_ptr<scalar_t>() : nullptr, need_gd ? gd.data_ptr<scalar_t>() : nullptr,
                            n, c, cd, static_cast<scalar_t>(negative_slope), static_cast<scalar_t>(eps));
  });
  return {gx, gd};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("vn_leaky_relu", &vn_leaky_relu_cpu);
  m.impl("vn_leaky_relu_backward", &vn_leaky_relu_backward_cpu);
}

}  // namespace relaxeq
