// Checks shared by the CPU kernels: errors name the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace relaxeq {

// The CPU kernels run float32 and float64 (half types are GPU-only).
inline void check_cpu(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, " (CPU): ", name,
              " must be float32 or float64 on CPU, got ", t.scalar_type());
}

}  // namespace relaxeq
