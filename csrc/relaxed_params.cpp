// relaxed_params: a relaxed layer's effective parameters in one op (DESIGN §1),
//
//   M = W_eq + θ W_r,  W_eq = weight ⊗ I_d      c = bias + θ b_r
//
// for layers whose equivariant map is one channel mixing repeated over a d-dimensional representation
// (VN features: d = 3; scalars: d = 1). Written once in ATen calls and registered for CPU and (in a CUDA
// build) CUDA, as relaxation_regularizer is: the tensors are parameter-sized, and what the op saves is the
// chain of small ops (eye, kron, mul, add and their backward) dispatched from Python per layer and step.
// The pure-PyTorch reference is relaxeq_fast.reference.relaxed_params_ref.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace relaxeq {
namespace params {
namespace {

int64_t check_args(const char* op, const at::Tensor& weight, const at::Tensor& weight_relax,
                   const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& bias_relax,
                   const at::Tensor& theta) {
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0, op,
              ": weight must be [C_out, C_in] with C_out, C_in > 0, got ", weight.sizes());
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  TORCH_CHECK(weight_relax.dim() == 2 && weight_relax.size(1) % c_in == 0 &&
                  weight_relax.size(0) == c_out * (weight_relax.size(1) / c_in) && weight_relax.size(1) >= c_in,
              op, ": weight_relax must be [C_out d, C_in d] = [", c_out, " d, ", c_in, " d] for weight ",
              weight.sizes(), ", got ", weight_relax.sizes());
  const int64_t d = weight_relax.size(1) / c_in;
  TORCH_CHECK(weight_relax.scalar_type() == weight.scalar_type() && weight_relax.device() == weight.device(), op,
              ": weight_relax must have weight's dtype and device (", weight.scalar_type(), ", ", weight.device(),
              "), got ", weight_relax.scalar_type(), ", ", weight_relax.device());
  TORCH_CHECK(theta.dim() == 0 && theta.scalar_type() == weight.scalar_type() && theta.device() == weight.device(),
              op, ": theta must be a 0-d tensor in weight's dtype and device, got shape ", theta.sizes(), " ",
              theta.scalar_type(), " on ", theta.device());
  const auto check_bias = [&](const char* name, const std::optional<at::Tensor>& b) {
    if (b.has_value())
      TORCH_CHECK(b->dim() == 1 && b->size(0) == c_out * d && b->scalar_type() == weight.scalar_type() &&
                      b->device() == weight.device(),
                  op, ": ", name, " must be [C_out d] = [", c_out * d, "] in weight's dtype and device, got ",
                  b->sizes(), " ", b->scalar_type(), " on ", b->device());
  };
  check_bias("bias", bias);
  check_bias("bias_relax", bias_relax);
  return d;
}

// The d × d diagonal blocks' diagonals of a [C_out d, C_in d] matrix, as a [C_out, C_in, d] view.
at::Tensor block_diagonals(const at::Tensor& M, int64_t c_out, int64_t c_in, int64_t d) {
  return M.view({c_out, d, c_in, d}).diagonal(0, 1, 3);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& weight, const at::Tensor& weight_relax,
                                           const std::optional<at::Tensor>& bias,
                                           const std::optional<at::Tensor>& bias_relax, const at::Tensor& theta) {
  const int64_t d = check_args("relaxed_params", weight, weight_relax, bias, bias_relax, theta);
  auto M = at::mul(weight_relax, theta);  // a fresh contiguous tensor: the diagonal view below is writable
  block_diagonals(M, weight.size(0), weight.size(1), d).add_(weight.unsqueeze(-1));
  at::Tensor c;
  if (bias_relax.has_value()) {
    c = at::mul(*bias_relax, theta);
    if (bias.has_value()) c.add_(*bias);
  } else if (bias.has_value()) {
    c = bias->clone();
  } else {
    c = at::empty({0}, weight.options());  // no bias: an empty c, which the Python wrapper turns into None
  }
  return {M, c};
}

// Gradients of weight, weight_relax, bias, bias_relax and θ (outputs not asked for in output_mask are [0]):
// dθ = ⟨dM, weight_relax⟩ + ⟨dc, bias_relax⟩, a 0-d tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_M, const at::Tensor& grad_c, const at::Tensor& weight, const at::Tensor& weight_relax,
    const std::optional<at::Tensor>& bias_relax, const at::Tensor& theta, std::array<bool, 5> output_mask) {
  const char* op = "relaxed_params_backward";
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be [C_out, C_in], got ", weight.sizes());
  const int64_t c_out = weight.size(0), c_in = weight.size(1);
  TORCH_CHECK(grad_M.dim() == 2 && grad_M.size(1) % c_in == 0 && grad_M.size(1) >= c_in &&
                  grad_M.size(0) == c_out * (grad_M.size(1) / c_in),
              op, ": grad_M must be [C_out d, C_in d] for weight ", weight.sizes(), ", got ", grad_M.sizes());
  const int64_t d = grad_M.size(1) / c_in;
  TORCH_CHECK(grad_c.dim() == 1 && (grad_c.size(0) == c_out * d || grad_c.size(0) == 0), op,
              ": grad_c must be [C_out d] = [", c_out * d, "] (or [0]: c unused), got ", grad_c.sizes());
  TORCH_CHECK(theta.dim() == 0, op, ": theta must be a 0-d tensor, got ", theta.sizes());
  TORCH_CHECK(weight_relax.sizes() == grad_M.sizes(), op, ": weight_relax must have grad_M's shape ",
              grad_M.sizes(), ", got ", weight_relax.sizes());
  TORCH_CHECK(!bias_relax.has_value() || (bias_relax->dim() == 1 && bias_relax->size(0) == c_out * d), op,
              ": bias_relax must be [C_out d] = [", c_out * d, "] or None, got ",
              bias_relax.has_value() ? bias_relax->sizes() : at::IntArrayRef{});
  const bool has_grad_c = grad_c.size(0) > 0;
  at::Tensor g_w, g_wr, g_b, g_br, g_theta;
  if (output_mask[0]) g_w = block_diagonals(grad_M.contiguous(), c_out, c_in, d).sum(-1);
  if (output_mask[1]) g_wr = at::mul(grad_M, theta);
  if (output_mask[2]) g_b = has_grad_c ? grad_c.clone() : at::zeros({c_out * d}, weight.options());
  if (output_mask[3]) g_br = has_grad_c ? at::mul(grad_c, theta) : at::zeros({c_out * d}, weight.options());
  if (output_mask[4]) {
    g_theta = at::sum(at::mul(grad_M, weight_relax));
    if (has_grad_c && bias_relax.has_value()) g_theta.add_(at::sum(at::mul(grad_c, *bias_relax)));
  }
  for (auto* g : {&g_w, &g_wr, &g_b, &g_br, &g_theta})
    if (!g->defined()) *g = at::empty({0}, weight.options());
  return {g_w, g_wr, g_b, g_br, g_theta};
}

}  // namespace
}  // namespace params

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxed_params", &params::forward);
  m.impl("relaxed_params_backward", &params::backward);
}

#ifdef RELAXEQ_WITH_CUDA
TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("relaxed_params", &params::forward);
  m.impl("relaxed_params_backward", &params::backward);
}
#endif

}  // namespace relaxeq
