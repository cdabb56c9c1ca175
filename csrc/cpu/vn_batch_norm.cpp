// CPU Vector-Neuron batch norm (x [N, C, 3], norm_nc = ||x_nc|| + norm_eps):
//   vn_norm_stats                 per-channel mean and biased variance of the norms over N
//   vn_batch_norm_apply           y_nc = x_nc * nb_nc / norm_nc, nb = (norm - mean) invstd w + b
//   vn_batch_norm_apply_backward  grad_x and the per-channel sums for mean/invstd/weight/bias
// Each is one sweep over x (and grad_y) in row ranges run by at::parallel_for; per-channel
// reductions go into per-thread partials (double) that are combined at the end, so no [N, C]
// temporary is ever written. x is made contiguous here; every kernel indexes (n * C + c) * 3 + d.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../vn_batch_norm.h"
#include "cpu_checks.h"

namespace relaxeq {
namespace {

// Rows per parallel task: ~4096 vectors, so small C still gives tasks worth a thread.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, C)); }

int thread_slots() { return std::max(1, at::get_num_threads()); }
int thread_slot(int slots) { return std::min(at::get_thread_num(), slots - 1); }

template <typename T>
inline double norm3(const T* p) {
  const double a = p[0], b = p[1], c = p[2];
  return std::sqrt(a * a + b * b + c * c);
}

// Welford's running mean / sum of squared deviations; merge is Chan et al.'s pairwise update.
// Norms are positive and can sit far from zero relative to their spread, which is where
// sum / sum-of-squares cancels; this stays accurate in one pass.
struct Welford {
  double count = 0, mean = 0, m2 = 0;
  void add(double v) {
    count += 1;
    const double d = v - mean;
    mean += d / count;
    m2 += d * (v - mean);
  }
  void merge(const Welford& o) {
    if (o.count == 0) return;
    if (count == 0) {
      *this = o;
      return;
    }
    const double n = count + o.count, d = o.mean - mean;
    mean += d * (o.count / n);
    m2 += o.m2 + d * d * (count * o.count / n);
    count = n;
  }
};

template <typename T>
void norm_stats_kernel(const T* x, int64_t N, int64_t C, double norm_eps, T* mean, T* var) {
  const int slots = thread_slots();
  std::vector<Welford> part(static_cast<size_t>(slots) * C);
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<Welford> local(C);
    for (int64_t n = begin; n < end; ++n) {
      const T* row = x + n * C * 3;
      for (int64_t c = 0; c < C; ++c) local[c].add(norm3(row + 3 * c) + norm_eps);
    }
    Welford* mine = part.data() + static_cast<size_t>(thread_slot(slots)) * C;
    for (int64_t c = 0; c < C; ++c) mine[c].merge(local[c]);
  });
  for (int64_t c = 0; c < C; ++c) {
    Welford w;
    for (int t = 0; t < slots; ++t) w.merge(part[static_cast<size_t>(t) * C + c]);
    mean[c] = static_cast<T>(w.mean);
    var[c] = static_cast<T>(w.m2 / w.count);
  }
}

// Per-channel affine of the normalised norm: nb = (norm - mean) * invstd * w + b.
template <typename T>
struct ChannelParams {
  const T* mean;
  const T* invstd;
  const T* weight;  // nullptr: 1
  const T* bias;    // nullptr: 0
  double w(int64_t c) const { return weight ? static_cast<double>(weight[c]) : 1.0; }
  double b(int64_t c) const { return bias ? static_cast<double>(bias[c]) : 0.0; }
};

template <typename T>
void apply_kernel(const T* x, T* y, int64_t N, int64_t C, double norm_eps, const ChannelParams<T>& p) {
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = (n * C + c) * 3;
        const double norm = norm3(x + i) + norm_eps;
        const double nb = (norm - static_cast<double>(p.mean[c])) * static_cast<double>(p.invstd[c]) * p.w(c) + p.b(c);
        const double k = nb / norm;
        for (int d = 0; d < 3; ++d) y[i + d] = static_cast<T>(static_cast<double>(x[i + d]) * k);
      }
    }
  });
}

// With g = <grad_y, x> and k = nb / norm (y = x k):
//   dL/dnb   = g / norm                               (per vector)
//   dL/dnorm = g (invstd w / norm - nb / norm^2) = (g / norm)(invstd w - k)
//   grad_x   = grad_y k + dL/dnorm * x / ||x||          (0 for the second term when x = 0, like torch)
//   sums S0 = sum_n dL/dnb, S1 = sum_n dL/dnb (norm - mean) per channel; the glue turns them into
//   grad_mean = -invstd w S0, grad_invstd = w S1, grad_weight = invstd S1, grad_bias = S0.
template <typename T>
void backward_kernel(const T* gy, const T* x, T* gx, double* s0, double* s1, int64_t N, int64_t C, double norm_eps,
                     const ChannelParams<T>& p, bool need_sums) {
  const int slots = thread_slots();
  std::vector<double> part0(need_sums ? static_cast<size_t>(slots) * C : 0, 0.0);
  std::vector<double> part1(part0.size(), 0.0);
  at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
    std::vector<double> l0(need_sums ? C : 0, 0.0), l1(need_sums ? C : 0, 0.0);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const int64_t i = (n * C + c) * 3;
        const double r = norm3(x + i), norm = r + norm_eps;
        const double centred = norm - static_cast<double>(p.mean[c]);
        const double invstd = static_cast<double>(p.invstd[c]), w = p.w(c);
        const double nb = centred * invstd * w + p.b(c);
        double g = 0;
        for (int d = 0; d < 3; ++d) g += static_cast<double>(gy[i + d]) * static_cast<double>(x[i + d]);
        const double g_nb = g / norm;
        if (gx != nullptr) {
          const double k = nb / norm;
          const double coef = r > 0 ? g_nb * (invstd * w - k) / r : 0.0;
          for (int d = 0; d < 3; ++d) {
            gx[i + d] = static_cast<T>(static_cast<double>(gy[i + d]) * k + static_cast<double>(x[i + d]) * coef);
          }
        }
        if (need_sums) {
          l0[c] += g_nb;
          l1[c] += g_nb * centred;
        }
      }
    }
    if (need_sums) {
      const size_t off = static_cast<size_t>(thread_slot(slots)) * C;
      for (int64_t c = 0; c < C; ++c) {
        part0[off + c] += l0[c];
        part1[off + c] += l1[c];
      }
    }
  });
  if (!need_sums) return;
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int t = 0; t < slots; ++t) {
      a += part0[static_cast<size_t>(t) * C + c];
      b += part1[static_cast<size_t>(t) * C + c];
    }
    s0[c] = a;
    s1[c] = b;
  }
}

std::optional<at::Tensor> detached_contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->detach().contiguous()) : std::nullopt;
}

template <typename T>
ChannelParams<T> channel_params(const at::Tensor& mean, const at::Tensor& invstd,
                                const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias) {
  return {mean.const_data_ptr<T>(), invstd.const_data_ptr<T>(),
          weight.has_value() ? weight->const_data_ptr<T>() : nullptr,
          bias.has_value() ? bias->const_data_ptr<T>() : nullptr};
}

std::tuple<at::Tensor, at::Tensor> vn_norm_stats_cpu(const at::Tensor& x_in, double norm_eps) {
  check_vn_norm_stats_args(x_in);
  check_cpu(x_in, "vn_norm_stats", "x");
  // Autograd is registered above this kernel (relaxeq_fast/_ops/vn_batch_norm.py); detached so the worker
  // threads never see autograd state.
  const auto x = x_in.detach().contiguous();
  const int64_t N = x.size(0), C = x.size(1);
  auto mean = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  if (N == 0) {  // the mean of no values, like torch.mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return {mean, var};
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_norm_stats_cpu", [&] {
    norm_stats_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), N, C, norm_eps, mean.data_ptr<scalar_t>(),
                                var.data_ptr<scalar_t>());
  });
  return {mean, var};
}

at::Tensor vn_batch_norm_apply_cpu(const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
                                   const std::optional<at::Tensor>& weight_in,
                                   const std::optional<at::Tensor>& bias_in, double norm_eps) {
  const char* op = "vn_batch_norm_apply";
  check_vn_batch_norm_apply_args(x_in, mean_in, invstd_in, weight_in, bias_in, op);
  check_cpu(x_in, op, "x");
  const auto x = x_in.detach().contiguous(), mean = mean_in.detach().contiguous(),
             invstd = invstd_in.detach().contiguous();
  const auto weight = detached_contiguous(weight_in), bias = detached_contiguous(bias_in);
  auto y = at::empty_like(x, at::MemoryFormat::Contiguous);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_batch_norm_apply_cpu", [&] {
    apply_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), x.size(0), x.size(1), norm_eps,
                           channel_params<scalar_t>(mean, invstd, weight, bias));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> vn_batch_norm_apply_backward_cpu(
    const at::Tensor& gy_in, const at::Tensor& x_in, const at::Tensor& mean_in, const at::Tensor& invstd_in,
    const std::optional<at::Tensor>& weight_in, const std::optional<at::Tensor>& bias_in, double norm_eps,
    std::array<bool, 5> output_mask) {
  const char* op = "vn_batch_norm_apply_backward";
  check_vn_batch_norm_apply_backward_args(gy_in, x_in, mean_in, invstd_in, weight_in, bias_in);
  check_cpu(x_in, op, "x");
  const auto gy = gy_in.detach().contiguous(), x = x_in.detach().contiguous(),
             mean = mean_in.detach().contiguous(), invstd = invstd_in.detach().contiguous();
  const auto weight = detached_contiguous(weight_in), bias = detached_contiguous(bias_in);
  const int64_t N = x.size(0), C = x.size(1);
  const bool need_gx = output_mask[0];
  const bool need_sums = output_mask[1] || output_mask[2] || output_mask[3] || output_mask[4];
  auto gx = need_gx ? at::empty_like(x, at::MemoryFormat::Contiguous) : at::empty({0}, x.options());
  const auto dopt = x.options().dtype(at::kDouble);
  auto s0 = at::zeros({need_sums ? C : 0}, dopt), s1 = at::zeros({need_sums ? C : 0}, dopt);
  if (N > 0 && (need_gx || need_sums)) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "vn_batch_norm_apply_backward_cpu", [&] {
      backward_kernel<scalar_t>(gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                need_gx ? gx.data_ptr<scalar_t>() : nullptr,
                                need_sums ? s0.data_ptr<double>() : nullptr,
                                need_sums ? s1.data_ptr<double>() : nullptr, N, C, norm_eps,
                                channel_params<scalar_t>(mean, invstd, weight, bias), need_sums);
    });
  }
  // The per-channel gradients from the two sums: [C] vectors, a handful of ATen ops.
  // Each output not asked for is its own empty tensor: outputs of an op must not alias.
  const auto empty = [&] { return at::empty({0}, x.options()); };
  const auto inv = invstd.to(at::kDouble);
  const auto w = weight.has_value() ? weight->to(at::kDouble) : at::ones({C}, dopt);
  auto grad_mean = output_mask[1] ? (-inv * w * s0).to(mean.scalar_type()) : empty();
  auto grad_invstd = output_mask[2] ? (w * s1).to(invstd.scalar_type()) : empty();
  auto grad_weight = output_mask[3] ? (inv * s1).to(x.scalar_type()) : empty();
  auto grad_bias = output_mask[4] ? s0.to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true) : empty();
  return {gx, grad_mean, grad_invstd, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("vn_norm_stats", &vn_norm_stats_cpu);
  m.impl("vn_batch_norm_apply", &vn_batch_norm_apply_cpu);
  m.impl("vn_batch_norm_apply_backward", &vn_batch_norm_apply_backward_cpu);
}

}  // namespace relaxeq
