// Shared ATen glue for the Vector-Neuron batch norm ops (vn_norm_stats, vn_batch_norm_apply and
// its backward): argument checks used by every backend, so a bad call fails with the same
// message whichever kernel it would reach. Mirrors relaxeq_fast/_ops/vn_batch_norm.py::check_vn_* .
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "relaxed_linear.h"  // stats_dtype: statistics in float32, or float64 for float64 inputs

namespace relaxeq {

inline void check_vn_features(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == 3, op, ": x must have shape [N, C, 3] (VN features), got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be a floating-point tensor, got ",
              x.scalar_type());
}

// A per-channel tensor [C] with a given dtype, on the device of x.
inline void check_vn_channel_arg(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType dtype,
                                 const char* op) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), op, ": ", name, " must have shape [C] with C = x.shape[1] = ",
              x.size(1), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
}

inline void check_vn_norm_stats_args(const at::Tensor& x) { check_vn_features(x, "vn_norm_stats"); }

// mean and invstd are statistics (stats_dtype of x); weight and bias are parameters (dtype of x).
inline void check_vn_batch_norm_apply_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                                           const std::optional<at::Tensor>& weight,
                                           const std::optional<at::Tensor>& bias, const char* op) {
  check_vn_features(x, op);
  const auto sdt = stats_dtype(x.scalar_type());
  check_vn_channel_arg(mean, "mean", x, sdt, op);
  check_vn_channel_arg(invstd, "invstd", x, sdt, op);
  if (weight.has_value()) check_vn_channel_arg(*weight, "weight", x, x.scalar_type(), op);
  if (bias.has_value()) check_vn_channel_arg(*bias, "bias", x, x.scalar_type(), op);
}

inline void check_vn_batch_norm_apply_backward_args(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& mean, const at::Tensor& invstd,
                                                    const std::optional<at::Tensor>& weight,
                                                    const std::optional<at::Tensor>& bias) {
  const char* op = "vn_batch_norm_apply_backward";
  check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op);
  TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y must have the shape of x ", x.sizes(), ", got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == x.scalar_type(), op, ": grad_y must have the dtype of x (", x.scalar_type(),
              "), got ", grad_y.scalar_type());
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y must be on the device of x (", x.device(), "), got ",
              grad_y.device());
}

}  // namespace relaxeq
