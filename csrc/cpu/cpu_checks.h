// Checks shared by the CPU kernels: errors name the op and the argument.
#pragma once

#include <ATen/core/Tensor.h>

namespace relaxeq {

inline bool is_reduced_float(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The CPU kernels run float32 and float64. relaxed_linear and relaxed_conv2d (autocast's "lower precision"
// ops) also run bfloat16 and float16 (reduced_ok), with their statistics accumulated in float32; the other
// ops are autocast "fp32" ops and never see a half type from autocast.
inline void check_cpu(const at::Tensor& t, const char* op, const char* name, bool reduced_ok = false) {
  TORCH_CHECK(t.device().is_cpu(), op, " (CPU): ", name, " must be a CPU tensor, got ", t.device());
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || (reduced_ok && is_reduced_float(dt)), op, " (CPU): ",
              name, reduced_ok ? " must be float32, float64, bfloat16 or float16 on CPU, got "
                               : " must be float32 or float64 on CPU, got ",
              dt);
}

}  // namespace relaxeq
