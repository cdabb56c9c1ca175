// Checks shared by the CUDA ATen glue of every op: errors name the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace relaxeq {

inline void check_cuda(const at::Tensor& t, const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.is_cuda(), op, " (CUDA): ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == x.device(), op, " (CUDA): ", name, " must be on the device of x (", x.device(),
              "), got ", t.device());
}

inline void check_dtype(const at::Tensor& x, const char* op) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
              " (CUDA): x must be float32, float64, float16 or bfloat16, got ", t);
}

}  // namespace relaxeq
