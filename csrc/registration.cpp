// The one place the relaxeq schemas are defined. Backends add kernels with
// TORCH_LIBRARY_IMPL(relaxeq, <Backend>, m) in their own files; autograd and
// fake (meta) implementations are registered from Python (relaxeq_fast/_ops/<op>.py; the native ops'
// registrations run in relaxeq_fast/_ops/__init__.py).
#include <Python.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <string>

#include "relaxed_linear.h"

#ifndef RELAXEQ_CUDA_ARCHS
#define RELAXEQ_CUDA_ARCHS ""
#endif

namespace relaxeq {

// key=value lines, parsed by relaxeq_fast.build_info().
std::string build_info() {
  std::string info;
#ifdef RELAXEQ_WITH_CUDA
  info += "cuda=1\n";
  info += std::string("cuda_archs=") + RELAXEQ_CUDA_ARCHS + "\n";
#else
  info += "cuda=0\n";
#endif
  info += "cpu=1\n";
#ifdef _OPENMP
  info += "openmp=1\n";
#else
  info += "openmp=0\n";
#endif
  info += std::string("compiler=") + __VERSION__ + "\n";
  return info;
}

namespace {
// Read once, at the first CUDA relaxed_linear call or setter call: no getenv per op call (and none racing
// a thread that writes the environment). A CPU-only build keeps it too, so the setter always exists.
std::atomic<int64_t>& fused_max_dim_setting() {
  static std::atomic<int64_t> value{[] {
    const char* env = std::getenv("RELAXEQ_CUDA_FUSED_MAX_DIM");
    return env != nullptr ? static_cast<int64_t>(std::atoll(env)) : int64_t{128};
  }()};
  return value;
}
}  // namespace

int64_t cuda_fused_max_dim() { return fused_max_dim_setting().load(std::memory_order_relaxed); }

int64_t set_cuda_fused_max_dim(int64_t value) {
  TORCH_CHECK(value >= -1, "cuda_fused_max_dim: value must be >= 0 (or -1 to only read it), got ", value);
  if (value >= 0) return fused_max_dim_setting().exchange(value);
  return cuda_fused_max_dim();
}

}  // namespace relaxeq

TORCH_LIBRARY(relaxeq, m) {
  m.def(
      "relaxed_linear(Tensor x, Tensor M, Tensor? c, bool stats) -> (Tensor y, Tensor G, Tensor s)");
  m.def(
      "relaxed_linear_backward(Tensor dy, Tensor x, Tensor M, bool[3] output_mask)"
      " -> (Tensor dx, Tensor dM, Tensor dc)");
  // VN leaky ReLU with a given direction d ([N, C, 3] per channel or [N, 1, 3] shared); the
  // backward recomputes <x, d> and |d|^2 from x and d, so nothing but x and d is saved.
  m.def("vn_leaky_relu(Tensor x, Tensor d, float negative_slope, float eps) -> Tensor");
  m.def(
      "vn_leaky_relu_backward(Tensor grad_out, Tensor x, Tensor d, float negative_slope, float eps,"
      " bool[2] output_mask) -> (Tensor grad_x, Tensor grad_d)");
  // Vector-Neuron batch norm: the norm statistics over N per channel, then one fused pass that
  // normalises the norms and rescales the vectors (and its backward with the per-channel sums).
  m.def("vn_norm_stats(Tensor x, float norm_eps) -> (Tensor mean, Tensor var)");
  m.def(
      "vn_batch_norm_apply(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, float norm_eps)"
      " -> Tensor y");
  m.def(
      "vn_batch_norm_apply_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor? weight,"
      " Tensor? bias, float norm_eps, bool[5] output_mask)"
      " -> (Tensor grad_x, Tensor grad_mean, Tensor grad_invstd, Tensor grad_weight, Tensor grad_bias)");
  // Relaxed 2D convolution y = conv2d(x, M) + c and, when the defect kernel D is given, the
  // data-mode regulariser r = sum z^2 with z = conv2d(x^, D) (x^ = x detached) and S, the weight
  // gradient of z (sum over output positions of z (x) patch, shape of D). r is quadratic in D, so
  // r = <D, S> and dr/dD = 2 S exactly: the backward needs neither z nor a recompute. r and S are in
  // float32 (float64 for float64 x); both are empty [0] tensors without D. z is never returned.
  // need_S = false skips S (returned empty [0]): the caller wants no gradient for D.
  m.def(
      "relaxed_conv2d(Tensor x, Tensor M, Tensor? c, Tensor? D, int padding, bool need_S)"
      " -> (Tensor y, Tensor r, Tensor S)");
  // The gradients of y only (dD = 2 dr S is formed by the autograd formula from the saved S).
  m.def(
      "relaxed_conv2d_backward(Tensor dy, Tensor x, Tensor M, int padding, bool[3] output_mask)"
      " -> (Tensor dx, Tensor dM, Tensor dc)");
  // A relaxed layer's effective parameters (csrc/relaxed_params.cpp): M = weight ⊗ I_d + θ weight_relax,
  // c = bias + θ bias_relax (c is [0] when both are None); the backward also gives θ its gradient
  // dθ = ⟨dM, weight_relax⟩ + ⟨dc, bias_relax⟩ when asked (a learned θ; a scheduled θ is a buffer and asks none).
  m.def("relaxed_params(Tensor weight, Tensor weight_relax, Tensor? bias, Tensor? bias_relax, Tensor theta)"
        " -> (Tensor M, Tensor c)");
  m.def(
      "relaxed_params_backward(Tensor grad_M, Tensor grad_c, Tensor weight, Tensor weight_relax, "
      "Tensor? bias_relax, Tensor theta, bool[5] output_mask)"
      " -> (Tensor grad_weight, Tensor grad_weight_relax, Tensor grad_bias, Tensor grad_bias_relax, "
      "Tensor grad_theta)");
  // R_LD and R_N of L same-shape relaxed layers (csrc/relaxation_regularizer.cpp) from their stacked
  // relaxation weights W_r [L, D_out, D_in], biases b_r [L, D_out] and detached input statistics
  // G [L, D_in, D_in], s [L, D_in] over n rows, or over the rows [L, n, D_in] themselves when given.
  // irreps_* are flat (mul, l) pairs; generators[l] is [3, 2l+1, 2l+1]. r_ld, r_n: [L] in G's dtype.
  m.def(
      "relaxation_regularizer(Tensor W_r, Tensor? b_r, Tensor G, Tensor s, Tensor? rows, int n, int[] irreps_in,"
      " int[] irreps_out, Tensor[] generators) -> (Tensor r_ld, Tensor r_n, Tensor grad_W_ld, Tensor grad_W_n,"
      " Tensor grad_b_ld, Tensor grad_b_n)");
  // Gradients w.r.t. W_r and b_r for the upstream [L] gradients of r_ld and r_n: the forward's per-layer
  // unit gradients (grad_*: products the values needed anyway) scaled and summed; the statistics carry none.
  m.def(
      "relaxation_regularizer_backward(Tensor grad_ld, Tensor grad_n, Tensor W_r, Tensor grad_W_ld,"
      " Tensor grad_W_n, Tensor grad_b_ld, Tensor grad_b_n, bool[2] output_mask) -> (Tensor dW_r, Tensor db_r)");
  // A relaxed steerable conv's effective kernel and defect (csrc/relaxed_conv_params.cpp): M = kernel + θ weight_relax
  // and D(weight_relax) from the defect matrices A_out [O, O], A_in [I, I], S [k², k²] (rotation_step: C_N's
  // A_out (S B) A_inᵀ − B; else SO(2)'s A_out B − B A_in + S B); D is [0] unless need_defect.
  m.def(
      "relaxed_conv_params(Tensor kernel, Tensor weight_relax, Tensor theta, Tensor defect_out, Tensor defect_in,"
      " Tensor defect_spatial, bool rotation_step, bool need_defect) -> (Tensor M, Tensor D)");
  // dB = θ dM + Dᵀ(dD), dθ = ⟨dM, weight_relax⟩ (grad_D [0]: D unused); the kernel's gradient is dM itself.
  m.def(
      "relaxed_conv_params_backward(Tensor grad_M, Tensor grad_D, Tensor weight_relax, Tensor theta,"
      " Tensor defect_out, Tensor defect_in, Tensor defect_spatial, bool rotation_step, bool[2] output_mask)"
      " -> (Tensor grad_weight_relax, Tensor grad_theta)");
  m.def("build_info() -> str", &relaxeq::build_info);
  // The widest layer the CUDA relaxed_linear sends to its tiled kernel (wider: cuBLAS). value >= 0 sets it and
  // returns the previous one; -1 reads it. Starts from RELAXEQ_CUDA_FUSED_MAX_DIM (default 128).
  m.def("cuda_fused_max_dim(int value=-1) -> int", &relaxeq::set_cuda_fused_max_dim);
}

// Importing relaxeq_fast._C loads this library and runs the registrars above;
// the module itself exposes nothing (all entry points are torch.ops.relaxeq.*).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
