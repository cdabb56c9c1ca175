// Shared ATen glue for relaxed_linear: argument checks used by every backend,
// so a bad call fails with the same message whichever kernel it would reach.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace relaxeq {

inline void check_relaxed_linear_args(const at::Tensor& x, const at::Tensor& M,
                                      const std::optional<at::Tensor>& c) {
  TORCH_CHECK(x.dim() == 2, "relaxed_linear: x must be 2-D [N, D_in], got ", x.dim(),
              "-D with shape ", x.sizes());
  TORCH_CHECK(M.dim() == 2, "relaxed_linear: M must be 2-D [D_out, D_in], got ", M.dim(),
              "-D with shape ", M.sizes());
  TORCH_CHECK(x.size(1) == M.size(1), "relaxed_linear: x must have shape [N, D_in] with D_in = M.shape[1] = ",
              M.size(1), ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == M.scalar_type(), "relaxed_linear: M must have the dtype of x (",
              x.scalar_type(), "), got ", M.scalar_type());
  TORCH_CHECK(x.device() == M.device(), "relaxed_linear: M must be on the device of x (", x.device(),
              "), got ", M.device());
  if (c.has_value()) {
    TORCH_CHECK(c->dim() == 1 && c->size(0) == M.size(0),
                "relaxed_linear: c must have shape [D_out] with D_out = M.shape[0] = ", M.size(0), ", got ",
                c->sizes());
    TORCH_CHECK(c->scalar_type() == x.scalar_type(), "relaxed_linear: c must have the dtype of x (",
                x.scalar_type(), "), got ", c->scalar_type());
    TORCH_CHECK(c->device() == x.device(), "relaxed_linear: c must be on the device of x (", x.device(),
                "), got ", c->device());
  }
}

inline void check_relaxed_linear_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& M) {
  check_relaxed_linear_args(x, M, std::nullopt);
  TORCH_CHECK(dy.dim() == 2 && dy.size(0) == x.size(0) && dy.size(1) == M.size(0),
              "relaxed_linear_backward: dy must have shape [N, D_out] = [", x.size(0), ", ", M.size(0),
              "], got ", dy.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), "relaxed_linear_backward: dy must have the dtype of x (",
              x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), "relaxed_linear_backward: dy must be on the device of x (",
              x.device(), "), got ", dy.device());
}

// The CUDA route switch (csrc/registration.cpp holds it; torch.ops.relaxeq.cuda_fused_max_dim sets it).
int64_t cuda_fused_max_dim();

// Input statistics G = x^T x and s = sum_n x_n are accumulated in float32 or wider.
inline at::ScalarType stats_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace relaxeq
