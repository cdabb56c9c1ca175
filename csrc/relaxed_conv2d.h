// Shared ATen glue for relaxed_conv2d: argument checks used by every backend, so a bad
// call fails with the same message whichever kernel it would reach (mirrors
// relaxeq_fast._ops.check_relaxed_conv2d_args, which guards the Python entry points), and the
// backward, which is ATen's convolution gradients on every backend.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>

#include "relaxed_linear.h"  // stats_dtype

namespace relaxeq {

inline void check_conv2d_matches_x(const at::Tensor& t, const char* name, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have the dtype of x (", x.scalar_type(),
              "), got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on the device of x (", x.device(), "), got ",
              t.device());
}

inline void check_relaxed_conv2d_args(const at::Tensor& x, const at::Tensor& M, const std::optional<at::Tensor>& c,
                                      const std::optional<at::Tensor>& D, int64_t padding,
                                      const char* op = "relaxed_conv2d") {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D [B, C_in, H, W], got ", x.dim(), "-D with shape ", x.sizes());
  TORCH_CHECK(M.dim() == 4, op, ": M must be 4-D [C_out, C_in, k, k], got ", M.dim(), "-D with shape ", M.sizes());
  TORCH_CHECK(M.size(1) == x.size(1), op, ": M must have shape [C_out, C_in, k, k] with C_in = x.shape[1] = ",
              x.size(1), ", got ", M.sizes());
  TORCH_CHECK(M.size(2) == M.size(3), op, ": M must have a square k x k kernel, got ", M.sizes());
  check_conv2d_matches_x(M, "M", x, op);
  if (c.has_value()) {
    TORCH_CHECK(c->dim() == 1 && c->size(0) == M.size(0), op, ": c must have shape [C_out] with C_out = M.shape[0] = ",
                M.size(0), ", got ", c->sizes());
    check_conv2d_matches_x(*c, "c", x, op);
  }
  if (D.has_value()) {
    TORCH_CHECK(D->dim() == 4 && D->size(1) == M.size(1) && D->size(2) == M.size(2) && D->size(3) == M.size(3), op,
                ": D must have shape [C_d, C_in, k, k] = [C_d, ", M.size(1), ", ", M.size(2), ", ", M.size(3),
                "] (the C_in and k of M), got ", D->sizes());
    check_conv2d_matches_x(*D, "D", x, op);
  }
  TORCH_CHECK(padding >= 0, op, ": padding must be >= 0, got ", padding);
  TORCH_CHECK(x.size(2) + 2 * padding >= M.size(2) && x.size(3) + 2 * padding >= M.size(3), op, ": the ", M.size(2),
              "x", M.size(3), " kernel does not fit x ", x.sizes(), " with padding ", padding);
}

inline void check_relaxed_conv2d_backward_args(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& M,
                                               int64_t padding) {
  const char* op = "relaxed_conv2d_backward";
  check_relaxed_conv2d_args(x, M, std::nullopt, std::nullopt, padding, op);
  const int64_t ho = x.size(2) + 2 * padding - M.size(2) + 1, wo = x.size(3) + 2 * padding - M.size(3) + 1;
  TORCH_CHECK(dy.dim() == 4 && dy.size(0) == x.size(0) && dy.size(1) == M.size(0) && dy.size(2) == ho &&
                  dy.size(3) == wo,
              op, ": dy must have shape [B, C_out, H', W'] = [", x.size(0), ", ", M.size(0), ", ", ho, ", ", wo,
              "], got ", dy.sizes());
  check_conv2d_matches_x(dy, "dy", x, op);
}

// The gradients of y = conv2d(x, M) + c only (r carries none to x, M, c): dx and dM from ATen's
// convolution gradients (cuDNN on CUDA), dc = sum dy. Arguments are checked, detached and on the
// backend's device. Outputs not asked for are distinct empty [0] tensors (outputs must not alias).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> relaxed_conv2d_backward_aten(const at::Tensor& dy,
                                                                                   const at::Tensor& x,
                                                                                   const at::Tensor& M,
                                                                                   int64_t padding,
                                                                                   std::array<bool, 3> output_mask) {
  const bool need_dx = output_mask[0], need_dM = output_mask[1], need_dc = output_mask[2];
  const auto empty = [&] { return at::empty({0}, x.options()); };
  at::Tensor dx = empty(), dM = empty(), dc = empty();
  if (need_dx || need_dM) {
    auto g = at::convolution_backward(dy, x, M, std::nullopt, /*stride=*/{1, 1}, /*padding=*/{padding, padding},
                                      /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
                                      /*groups=*/1, {need_dx, need_dM, false});
    if (need_dx) dx = std::get<0>(g);
    if (need_dM) dM = std::get<1>(g);
  }
  if (need_dc) dc = dy.sum({0, 2, 3});
  return {dx, dM, dc};
}

}  // namespace relaxeq
