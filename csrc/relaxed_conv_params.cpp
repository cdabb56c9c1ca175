// relaxed_conv_params: a relaxed steerable convolution's effective kernel and its equivariance defect in one
// op (DESIGN §1, "Steerable 2D convolutions"):
//
//   M = K_eq + θ B
//   D(B) = A_out (S B) A_inᵀ − B          (C_N: the rotation by 2π/N; rotation_step = true)
//   D(B) = A_out B − B A_in + S B          (SO(2): the infinitesimal rotation)
//
// for kernels [O, I, k, k], with A_out [O, O] and A_in [I, I] acting on the channels and S [k², k²] on the
// pixels of every kernel entry. The conv twin of relaxed_params, written once in ATen calls and registered
// for CPU and (in a CUDA build) CUDA: the tensors are kernel-sized, and what the op saves is the chain of
// small ops (flatten, matmul, einsum's permutes and bmms, mul, add, and their backward) dispatched from
// Python per layer and step. The pure-PyTorch reference is relaxeq_fast.reference.relaxed_conv_params_ref.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <tuple>

namespace relaxeq {
namespace conv_params {
namespace {

void check_defect_matrices(const char* op, const at::Tensor& ref, const at::Tensor& defect_out,
                           const at::Tensor& defect_in, const at::Tensor& defect_spatial) {
  const int64_t O = ref.size(0), I = ref.size(1), kk = ref.size(2) * ref.size(3);
  const auto check = [&](const char* name, const at::Tensor& t, int64_t n) {
    TORCH_CHECK(t.dim() == 2 && t.size(0) == n && t.size(1) == n && t.scalar_type() == ref.scalar_type() &&
                    t.device() == ref.device(),
                op, ": ", name, " must be [", n, ", ", n, "] in weight_relax's dtype and device (",
                ref.scalar_type(), ", ", ref.device(), "), got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
  };
  check("defect_out", defect_out, O);
  check("defect_in", defect_in, I);
  check("defect_spatial", defect_spatial, kk);
}

void check_args(const char* op, const at::Tensor& kernel, const at::Tensor& weight_relax, const at::Tensor& theta,
                const at::Tensor& defect_out, const at::Tensor& defect_in, const at::Tensor& defect_spatial) {
  TORCH_CHECK(weight_relax.dim() == 4 && weight_relax.size(2) == weight_relax.size(3), op,
              ": weight_relax must be [O, I, k, k], got ", weight_relax.sizes());
  TORCH_CHECK(kernel.sizes() == weight_relax.sizes() && kernel.scalar_type() == weight_relax.scalar_type() &&
                  kernel.device() == weight_relax.device(),
              op, ": kernel must have weight_relax's shape, dtype and device (", weight_relax.sizes(), ", ",
              weight_relax.scalar_type(), ", ", weight_relax.device(), "), got ", kernel.sizes(), ", ",
              kernel.scalar_type(), ", ", kernel.device());
  TORCH_CHECK(theta.dim() == 0 && theta.scalar_type() == weight_relax.scalar_type() &&
                  theta.device() == weight_relax.device(),
              op, ": theta must be a 0-d tensor in weight_relax's dtype and device, got shape ", theta.sizes(), " ",
              theta.scalar_type(), " on ", theta.device());
  check_defect_matrices(op, weight_relax, defect_out, defect_in, defect_spatial);
}

// D(B), or with adjoint its transpose map Dᵀ(G) (the backward's dB from dD): every factor transposed.
at::Tensor defect(const at::Tensor& B, const at::Tensor& A_out, const at::Tensor& A_in, const at::Tensor& S,
                  bool rotation_step, bool adjoint) {
  const int64_t O = B.size(0), I = B.size(1), kk = B.size(2) * B.size(3);
  const auto Bf = B.reshape({O, I, kk});
  const auto out_map = adjoint ? A_out.t() : A_out;
  const auto pixels = at::matmul(Bf, adjoint ? S : S.t());  // S on each entry's pixels: [O, I, k²]
  at::Tensor D;
  if (rotation_step) {
    // A_out (S B) A_inᵀ: channels on the left, then matmul(A_in, ·) mixes the I index of every [I, k²] slice
    const auto left = at::matmul(out_map, pixels.reshape({O, I * kk})).reshape({O, I, kk});
    D = at::matmul(adjoint ? A_in.t() : A_in, left) - Bf;
  } else {
    // A_out B − B A_in + S B; B A_in mixes the I index by A_inᵀ (its adjoint by A_in)
    D = at::matmul(out_map, Bf.reshape({O, I * kk})).reshape({O, I, kk}) -
        at::matmul(adjoint ? A_in : A_in.t(), Bf) + pixels;
  }
  return D.reshape(B.sizes());
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& kernel, const at::Tensor& weight_relax,
                                           const at::Tensor& theta, const at::Tensor& defect_out,
                                           const at::Tensor& defect_in, const at::Tensor& defect_spatial,
                                           bool rotation_step, bool need_defect) {
  check_args("relaxed_conv_params", kernel, weight_relax, theta, defect_out, defect_in, defect_spatial);
  auto M = at::addcmul(kernel, weight_relax, theta);  // θ stays a tensor: no host read of a CUDA scalar
  auto D = need_defect ? defect(weight_relax, defect_out, defect_in, defect_spatial, rotation_step, false)
                       : at::empty({0}, weight_relax.options());
  return {M, D};
}

// dB = θ dM + Dᵀ(dD) and dθ = ⟨dM, B⟩ (outputs not asked for in output_mask are [0]; grad_D is [0] when D was
// not used). The kernel's gradient is dM itself, passed through by the Python autograd formula.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_M, const at::Tensor& grad_D,
                                            const at::Tensor& weight_relax, const at::Tensor& theta,
                                            const at::Tensor& defect_out, const at::Tensor& defect_in,
                                            const at::Tensor& defect_spatial, bool rotation_step,
                                            std::array<bool, 2> output_mask) {
  const char* op = "relaxed_conv_params_backward";
  TORCH_CHECK(weight_relax.dim() == 4 && weight_relax.size(2) == weight_relax.size(3), op,
              ": weight_relax must be [O, I, k, k], got ", weight_relax.sizes());
  TORCH_CHECK(grad_M.sizes() == weight_relax.sizes(), op, ": grad_M must have weight_relax's shape ",
              weight_relax.sizes(), ", got ", grad_M.sizes());
  TORCH_CHECK(grad_D.numel() == 0 || grad_D.sizes() == weight_relax.sizes(), op,
              ": grad_D must have weight_relax's shape ", weight_relax.sizes(), " (or be [0]: D unused), got ",
              grad_D.sizes());
  TORCH_CHECK(theta.dim() == 0, op, ": theta must be a 0-d tensor, got ", theta.sizes());
  check_defect_matrices(op, weight_relax, defect_out, defect_in, defect_spatial);
  at::Tensor g_b, g_theta;
  if (output_mask[0]) {
    g_b = at::mul(grad_M, theta);
    if (grad_D.numel() > 0) g_b.add_(defect(grad_D, defect_out, defect_in, defect_spatial, rotation_step, true));
  }
  if (output_mask[1]) g_theta = at::sum(at::mul(grad_M, weight_relax));
  for (auto* g : {&g_b, &g_theta})
    if (!g->defined()) *g = at::empty({0}, weight_relax.options());
  return {g_b, g_theta};
}

}  // namespace
}  // namespace conv_params

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxed_conv_params", &conv_params::forward);
  m.impl("relaxed_conv_params_backward", &conv_params::backward);
}

#ifdef RELAXEQ_WITH_CUDA
TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("relaxed_conv_params", &conv_params::forward);
  m.impl("relaxed_conv_params_backward", &conv_params::backward);
}
#endif

}  // namespace relaxeq
