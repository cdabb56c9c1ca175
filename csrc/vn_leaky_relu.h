// Shared ATen glue for vn_leaky_relu: argument checks used by every backend, so a
// bad call fails with the same message whichever kernel it would reach (the Python
// twin, relaxeq_fast/_ops/vn_leaky_relu.py::check_vn_leaky_relu_args, guards the Triton op and the
// fake kernels).
#pragma once

#include <ATen/core/Tensor.h>

namespace relaxeq {

inline void check_vn_leaky_relu_args(const at::Tensor& x, const at::Tensor& d, double negative_slope, double eps,
                                     const char* op = "vn_leaky_relu") {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == 3, op, ": x must have shape [N, C, 3] (VN features), got ", x.sizes());
  TORCH_CHECK(d.dim() == 3 && d.size(2) == 3 && d.size(0) == x.size(0) && (d.size(1) == 1 || d.size(1) == x.size(1)),
              op, ": d must have shape [N, C, 3] or [N, 1, 3] with N = x.shape[0] = ", x.size(0),
              " and C = x.shape[1] = ", x.size(1), ", got ", d.sizes());
  TORCH_CHECK(d.scalar_type() == x.scalar_type(), op, ": d must have the dtype of x (", x.scalar_type(), "), got ",
              d.scalar_type());
  TORCH_CHECK(d.device() == x.device(), op, ": d must be on the device of x (", x.device(), "), got ", d.device());
  TORCH_CHECK(negative_slope >= 0.0 && negative_slope < 1.0, op, ": negative_slope must be in [0, 1), got ",
              negative_slope);
  TORCH_CHECK(eps > 0.0, op, ": eps must be positive (it keeps d = 0 finite), got ", eps);
}

inline void check_vn_leaky_relu_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& d,
                                              double negative_slope, double eps) {
  const char* op = "vn_leaky_relu_backward";
  check_vn_leaky_relu_args(x, d, negative_slope, eps, op);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), op, ": grad_out must have the dtype of x (",
              x.scalar_type(), "), got ", grad_out.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), op, ": grad_out must be on the device of x (", x.device(), "), got ",
              grad_out.device());
}

}  // namespace relaxeq
