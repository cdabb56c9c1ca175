// relaxation_regularizer: R_LD and R_N of L same-shape relaxed layers in one op (DESIGN §1).
//
//   C_k  = W_r A_k,in − A_k,out W_r
//   R_LD = Σ_k ⟨C_kᵀ C_k, G⟩ − 2 (A_k,out b_r)ᵀ C_k s + N ‖A_k,out b_r‖²
//   R_N  = ⟨W_rᵀ W_r, G⟩ + 2 b_rᵀ W_r s + N ‖b_r‖²
//
// Evaluated without the C_k G products (three D_out·D_in² GEMMs): expanding ‖C_k‖²_G with A skew gives
//
//   Σ_k ⟨C_k G, C_k⟩ = ⟨W H, W⟩ − 2 ⟨W G, V⟩ + ⟨Cas_out W G, W⟩,   H = Σ_k A_k G A_kᵀ,  V = Σ_k A_k,out W A_k,inᵀ
//
// where H and V are formed by structure (O(D²·(2l+1)) per generator) and Cas = Σ_k A_kᵀ A_k is l(l+1) on an
// irrep block of degree l (the Casimir of the standard generators `irrep_generators`, which callers pass).
// The gradient 2 (W H − Σ_k A_k,out (W G) A_k,inᵀ − V G + Cas W G) needs V G as well: its two cross terms
// are adjoints of each other and agree only when G commutes with the generators, so three products
// W·[G | H] and V·G stand where C_k G and W G were four (and R_N reuses W G).
// On VN features (every block l = 1) the sandwiches Σ_k A_k Y A_kᵀ are tr(Y) I − Yᵀ per 3 × 3 block: one pass over
// G and W, where applying the generators block by block costs more than the products (benchmarks/README.md).
//
// or, given the N input rows X themselves (cheaper when N < D_in), the same sums taken over the rows:
// Σ_k ‖C_k Xᵀ − A_k b_r 1ᵀ‖² and ‖W_r Xᵀ + b_r 1ᵀ‖². The generators act by structure: per irrep block
// (mul, l) one small matmul with that degree's [3, 2l+1, 2l+1] generators, never a dense [D, D] A_k.
//
// The algebra is written once here in ATen calls and registered for CPU and (in a CUDA build) CUDA, so
// it lives in csrc/ rather than csrc/cpu + csrc/cuda: it is a few dozen tiny products per layer group,
// whose cost on both devices is the number of dispatches from Python, which this op cuts to one; ATen
// runs each call on its tensors' device and current stream. The pure-PyTorch reference is
// relaxeq_fast.regularizer.relaxation_regularizer_ref.
#include <ATen/ATen.h>
#include <torch/library.h>
#include <c10/util/Optional.h>

#include <array>
#include <tuple>
#include <vector>

namespace relaxeq {
namespace regularizer {
namespace {

// irreps as the flat list (mul_0, l_0, mul_1, l_1, ...); generators[l] is [3, 2l+1, 2l+1].
int64_t irreps_dim(at::IntArrayRef irreps) {
  int64_t d = 0;
  for (size_t i = 0; i + 1 < irreps.size(); i += 2) d += irreps[i] * (2 * irreps[i + 1] + 1);
  return d;
}

// Entry k of the result is A_k applied to the rows of x: x [..., D] -> [3, ..., D]. With per_k, x is
// already [3, ..., D] and entry k is A_k applied to x[k] (the adjoint steps of the backward).
at::Tensor apply_generators(const at::Tensor& x, at::IntArrayRef irreps, at::TensorList generators,
                                   bool per_k) {
  const auto lead = per_k ? x.sizes().slice(1, x.dim() - 2) : x.sizes().slice(0, x.dim() - 1);
  std::vector<int64_t> out_shape{3};
  out_shape.insert(out_shape.end(), lead.begin(), lead.end());
  std::vector<at::Tensor> parts;
  int64_t start = 0;
  for (size_t i = 0; i + 1 < irreps.size(); i += 2) {
    const int64_t mul = irreps[i], l = irreps[i + 1], d = 2 * l + 1, width = mul * d;
    auto block_shape = out_shape;
    block_shape.push_back(width);
    if (l == 0) {
      parts.push_back(at::zeros(block_shape, x.options()));
    } else if (per_k) {
      // x[k]'s blocks [3, ..., mul, d] against A_kᵀ broadcast over the rest: batches of [mul, d] × [d, d]
      std::vector<int64_t> rows_shape{3};
      rows_shape.insert(rows_shape.end(), lead.begin(), lead.end());
      rows_shape.push_back(mul);
      rows_shape.push_back(d);
      std::vector<int64_t> gen_shape(rows_shape.size(), 1);
      gen_shape[0] = 3;
      gen_shape[gen_shape.size() - 2] = d;
      gen_shape.back() = d;
      const auto At = generators[l].transpose(1, 2).reshape(gen_shape);  // [3, 1, ..., d, d]
      parts.push_back(at::matmul(x.narrow(-1, start, width).reshape(rows_shape), At).reshape(block_shape));
    } else {
      // one GEMM of the rows [rows, d] with [A_1ᵀ | A_2ᵀ | A_3ᵀ] [d, 3d], then k moved to the front: a broadcast
      // matmul against the [3, d, d] stack would first copy x three times and run thousands of d × d products
      const auto rows = x.narrow(-1, start, width).reshape({-1, d});
      const auto stacked = generators[l].permute({2, 0, 1}).reshape({d, 3 * d});  // [a, (k, b)] = A_k[b, a]
      parts.push_back(at::mm(rows, stacked).view({-1, mul, 3, d}).permute({2, 0, 1, 3}).reshape(block_shape));
    }
    start += width;
  }
  return parts.size() == 1 ? parts[0] : at::cat(parts, -1);
}

// C_k = W A_k,in − A_k,out W for W [..., D_out, D_in] -> [3, ..., D_out, D_in] (A skew: W A = −(A wᵢ)ᵢ).
// per_k: W is [3, ..., D_out, D_in] and entry k uses only W[k].
at::Tensor lie_derivative(const at::Tensor& W, at::IntArrayRef irreps_in, at::IntArrayRef irreps_out,
                                 at::TensorList generators, bool per_k) {
  return -apply_generators(W, irreps_in, generators, per_k) -
         apply_generators(W.transpose(-1, -2), irreps_out, generators, per_k).transpose(-1, -2);
}

bool only_vectors(at::IntArrayRef irreps) {
  for (size_t i = 0; i + 1 < irreps.size(); i += 2)
    if (irreps[i + 1] != 1) return false;
  return true;
}

// Σ_k A_k,left X A_k,rightᵀ for X [..., P, Q]: A_left acts on the P index, A_right on the Q index.
at::Tensor generator_sandwich(const at::Tensor& X, at::IntArrayRef irreps_left, at::IntArrayRef irreps_right,
                              at::TensorList generators) {
  if (only_vectors(irreps_left) && only_vectors(irreps_right)) {
    // l = 1 on both sides (VN features): Σ_k A_k Y A_kᵀ = tr(Y) I − Yᵀ on every 3 × 3 block Y (the standard
    // generators), one pass instead of the generic route's three-fold intermediates
    const int64_t P = X.size(-2), Q = X.size(-1);
    std::vector<int64_t> blocks(X.sizes().begin(), X.sizes().end() - 2);
    const std::vector<int64_t> lead = blocks;
    blocks.insert(blocks.end(), {P / 3, 3, Q / 3, 3});
    const auto Xb = X.reshape(blocks);
    const int64_t r = Xb.dim();
    auto out = Xb.transpose(r - 3, r - 1).neg();  // −Yᵀ per block, a fresh tensor
    out.diagonal(0, r - 3, r - 1).add_(Xb.diagonal(0, r - 3, r - 1).sum(-1, true));  // + tr(Y) I
    auto out_shape = lead;
    out_shape.insert(out_shape.end(), {P, Q});
    return out.reshape(out_shape);
  }
  const auto right = apply_generators(X, irreps_right, generators, false);  // entry k: X A_k,rightᵀ
  // entry k: A_k,right Xᵀ A_k,leftᵀ, the transpose of the wanted A_k,left X A_k,rightᵀ
  return apply_generators(right.transpose(-1, -2), irreps_left, generators, true).sum(0).transpose(-1, -2);
}

// Cas x with Cas = Σ_k A_kᵀ A_k = l(l+1) on a degree-l block, acting along dim of x (a scale per block:
// no host-to-device copy of a table, so the op stays free of syncs on CUDA).
at::Tensor casimir_times(const at::Tensor& x, at::IntArrayRef irreps, int64_t dim) {
  std::vector<at::Tensor> parts;
  int64_t start = 0;
  bool one_degree = true;
  for (size_t i = 0; i + 1 < irreps.size(); i += 2) one_degree = one_degree && irreps[i + 1] == irreps[1];
  if (one_degree) return x * static_cast<double>(irreps[1] * (irreps[1] + 1));
  for (size_t i = 0; i + 1 < irreps.size(); i += 2) {
    const int64_t l = irreps[i + 1], width = irreps[i] * (2 * l + 1);
    parts.push_back(x.narrow(dim, start, width) * static_cast<double>(l * (l + 1)));
    start += width;
  }
  return at::cat(parts, dim);
}

void check_args(const char* op, const at::Tensor& W, const std::optional<at::Tensor>& b,
                       const at::Tensor& G, const at::Tensor& s, const std::optional<at::Tensor>& rows,
                       int64_t n, at::IntArrayRef irreps_in, at::IntArrayRef irreps_out,
                       at::TensorList generators) {
  TORCH_CHECK(G.scalar_type() == at::kFloat || G.scalar_type() == at::kDouble, op,
              ": G must be float32 or float64, got ", G.scalar_type());
  TORCH_CHECK(irreps_in.size() % 2 == 0 && irreps_out.size() % 2 == 0, op,
              ": irreps_in and irreps_out must be flat (mul, l) pairs");
  int64_t max_l = -1;
  for (auto irreps : {irreps_in, irreps_out})
    for (size_t i = 0; i + 1 < irreps.size(); i += 2) {
      TORCH_CHECK(irreps[i] > 0 && irreps[i + 1] >= 0, op, ": irreps blocks must be (mul > 0, l >= 0), got (",
                  irreps[i], ", ", irreps[i + 1], ")");
      max_l = std::max(max_l, irreps[i + 1]);
    }
  TORCH_CHECK(static_cast<int64_t>(generators.size()) > max_l, op, ": generators must hold the [3, 2l+1, 2l+1] "
              "generators of every degree l up to ", max_l, ", got ", generators.size());
  for (int64_t l = 0; l <= max_l; ++l)
    TORCH_CHECK(generators[l].dim() == 3 && generators[l].size(0) == 3 && generators[l].size(1) == 2 * l + 1 &&
                    generators[l].size(2) == 2 * l + 1 && generators[l].scalar_type() == G.scalar_type() &&
                    generators[l].device() == G.device(),
                op, ": generators[", l, "] must be [3, ", 2 * l + 1, ", ", 2 * l + 1, "] in G's dtype and device, got ",
                generators[l].sizes(), " ", generators[l].scalar_type());
  const int64_t d_in = irreps_dim(irreps_in), d_out = irreps_dim(irreps_out);
  TORCH_CHECK(W.dim() == 3 && W.size(1) == d_out && W.size(2) == d_in, op,
              ": W_r must be [L, D_out, D_in] = [L, ", d_out, ", ", d_in, "], got ", W.sizes());
  const int64_t L = W.size(0);
  TORCH_CHECK(G.dim() == 3 && G.size(0) == L && G.size(1) == d_in && G.size(2) == d_in, op,
              ": G must be [L, D_in, D_in] = [", L, ", ", d_in, ", ", d_in, "], got ", G.sizes());
  TORCH_CHECK(s.dim() == 2 && s.size(0) == L && s.size(1) == d_in && s.scalar_type() == G.scalar_type(), op,
              ": s must be [L, D_in] = [", L, ", ", d_in, "] in G's dtype, got ", s.sizes(), " ", s.scalar_type());
  TORCH_CHECK(n >= 0, op, ": n must be >= 0, got ", n);
  for (const auto& t : {W, s}) TORCH_CHECK(t.device() == G.device(), op, ": W_r and s must be on G's device");
  if (b.has_value())
    TORCH_CHECK(b->dim() == 2 && b->size(0) == L && b->size(1) == d_out && b->scalar_type() == W.scalar_type() &&
                    b->device() == G.device(),
                op, ": b_r must be [L, D_out] = [", L, ", ", d_out, "] in W_r's dtype, got ", b->sizes());
  if (rows.has_value())
    TORCH_CHECK(rows->dim() == 3 && rows->size(0) == L && rows->size(1) == n && rows->size(2) == d_in &&
                    rows->device() == G.device(),
                op, ": rows must be [L, n, D_in] = [", L, ", ", n, ", ", d_in, "], got ", rows->sizes());
}

// R_LD, R_N and their gradients w.r.t. W_r and b_r for unit upstream gradients, per layer. The gradients
// come from the products the values need anyway (W·[G | H] and V·G, or Z_k = C_k Xᵀ − A_k b 1ᵀ over rows), so
// the forward returns them and the backward only scales them by the upstream [L] gradients (recomputing
// them there cost as much as the forward again: D_out·D_in² per product):
//   dR_LD/dW = 2 (U − Σ_k (A_k b)(A_k s)ᵀ + (Cas b) sᵀ), U as below   (rows: Σ_k (P_k A_k,inᵀ − A_k,outᵀ P_k), P_k = 2 Z_k X)
//   dR_N/dW  = 2 (W G + b sᵀ)                                         (rows: 2 (W Xᵀ + b 1ᵀ) X)
//   dR_LD/db = 2 (Cas W s + n Cas b − V s),  dR_N/db = 2 (W s + n b)  (rows: the row sums of Z)
// grad_b_* are [0] without b_r.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& W_r, const std::optional<at::Tensor>& b_r, const at::Tensor& G, const at::Tensor& s,
    const std::optional<at::Tensor>& rows, int64_t n, at::IntArrayRef irreps_in, at::IntArrayRef irreps_out,
    at::TensorList generators) {
  check_args("relaxation_regularizer", W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators);
  const auto dt = G.scalar_type();
  const auto W = W_r.to(dt);
  std::optional<at::Tensor> b, Ab;
  if (b_r.has_value()) {
    b = b_r->to(dt);
    Ab = apply_generators(*b, irreps_out, generators, false);  // [3, L, D_out]
  }
  at::Tensor r_ld, r_n, grad_W_ld, grad_W_n, grad_b_ld, grad_b_n;
  if (rows.has_value()) {
    const auto C = lie_derivative(W, irreps_in, irreps_out, generators, false);  // [3, L, D_out, D_in]
    const auto X = rows->to(dt);
    const auto Xt = X.transpose(-1, -2);  // [L, D_in, n]
    auto Z = at::matmul(C, Xt), Zn = at::matmul(W, Xt);  // [3, L, D_out, n], [L, D_out, n]
    if (b.has_value()) {
      Z = Z - Ab->unsqueeze(-1);
      Zn = Zn + b->unsqueeze(-1);
    }
    r_ld = Z.square().sum({0, 2, 3});
    r_n = Zn.square().sum({1, 2});
    const auto P = at::matmul(Z, X), Pn = at::matmul(Zn, X);  // halves of dR/dC, dR/dW
    // dC = dW A_in − A_out dW, so dW = Σ_k P_k A_inᵀ − A_outᵀ P_k = −Σ_k (P_k A_in − A_out P_k) (A skew)
    grad_W_ld = -2 * lie_derivative(P, irreps_in, irreps_out, generators, true).sum(0);
    grad_W_n = 2 * Pn;
    if (b.has_value()) {
      grad_b_ld = 2 * apply_generators(Z.sum(-1), irreps_out, generators, true).sum(0);
      grad_b_n = 2 * Zn.sum(-1);
    }
  } else {
    // the two-product form of the file comment; s rides along as one more column of the products
    const int64_t d_in = G.size(-1);
    const auto V = generator_sandwich(W, irreps_out, irreps_in, generators);  // [L, D_out, D_in]
    const auto H = generator_sandwich(G, irreps_in, irreps_in, generators);  // [L, D_in, D_in]
    const auto s_col = s.unsqueeze(-1);
    const auto WGH = at::matmul(W, b.has_value() ? at::cat({G, H, s_col}, -1) : at::cat({G, H}, -1));
    const auto VG = at::matmul(V, b.has_value() ? at::cat({G, s_col}, -1) : G);
    const auto WG = WGH.narrow(-1, 0, d_in), WH = WGH.narrow(-1, d_in, d_in);
    // U = W H − Σ_k A_k,out (W G) A_k,inᵀ − V G + Cas W G = ½ dR_LD/dW without the bias, and R_LD = ⟨U, W⟩
    auto U = WH - VG.narrow(-1, 0, d_in) - generator_sandwich(WG, irreps_out, irreps_in, generators) +
             casimir_times(WG, irreps_out, -2);
    r_ld = (U * W).sum({1, 2});
    r_n = (WG * W).sum({1, 2});
    auto Un = WG;
    if (b.has_value()) {
      const auto Ws = WGH.select(-1, 2 * d_in), Vs = VG.select(-1, d_in);  // [L, D_out]
      const auto cas_b = casimir_times(*b, irreps_out, -1);
      const auto As = apply_generators(s, irreps_in, generators, false);  // [3, L, D_in]
      const double nd = static_cast<double>(n);
      // −2 Σ_k (A_k b)ᵀ C_k s = −2 bᵀ V s + 2 (Cas b)ᵀ W s, and N Σ_k ‖A_k b‖² = N bᵀ Cas b
      r_ld = r_ld + (*b * (-2 * Vs + nd * cas_b)).sum(-1) + 2 * (cas_b * Ws).sum(-1);
      r_n = r_n + 2 * (*b * Ws).sum(-1) + nd * b->square().sum(-1);
      U = U - at::matmul(Ab->unsqueeze(-1), As.unsqueeze(-2)).sum(0) + cas_b.unsqueeze(-1) * s.unsqueeze(-2);
      Un = Un + b->unsqueeze(-1) * s.unsqueeze(-2);
      grad_b_ld = 2 * (casimir_times(Ws, irreps_out, -1) + nd * cas_b - Vs);
      grad_b_n = 2 * (Ws + nd * *b);
    }
    grad_W_ld = 2 * U;
    grad_W_n = 2 * Un;
  }
  if (!b.has_value()) {
    grad_b_ld = at::empty({0}, G.options());
    grad_b_n = at::empty({0}, G.options());
  }
  return {r_ld, r_n, grad_W_ld, grad_W_n, grad_b_ld, grad_b_n};
}

// dW_r, db_r for the upstream [L] gradients: the forward's unit gradients, scaled and summed.
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_ld, const at::Tensor& grad_n, const at::Tensor& W_r,
                                            const at::Tensor& grad_W_ld, const at::Tensor& grad_W_n,
                                            const at::Tensor& grad_b_ld, const at::Tensor& grad_b_n,
                                            std::array<bool, 2> output_mask) {
  const char* op = "relaxation_regularizer_backward";
  TORCH_CHECK(W_r.dim() == 3, op, ": W_r must be [L, D_out, D_in], got ", W_r.sizes());
  const int64_t L = W_r.size(0);
  for (const auto& g : {grad_ld, grad_n})
    TORCH_CHECK(g.dim() == 1 && g.size(0) == L && g.device() == W_r.device(), op,
                ": grad_ld and grad_n must be [L] = [", L, "] on W_r's device, got ", g.sizes());
  for (const auto& g : {grad_W_ld, grad_W_n})
    TORCH_CHECK(g.sizes() == W_r.sizes() && g.device() == W_r.device(), op,
                ": grad_W_ld and grad_W_n must have W_r's shape ", W_r.sizes(), ", got ", g.sizes());
  const bool has_b = grad_b_ld.numel() > 0;
  if (has_b)
    for (const auto& g : {grad_b_ld, grad_b_n})
      TORCH_CHECK(g.dim() == 2 && g.size(0) == L && g.size(1) == W_r.size(1) && g.device() == W_r.device(), op,
                  ": grad_b_ld and grad_b_n must be [L, D_out] = [", L, ", ", W_r.size(1), "] (or [0]), got ",
                  g.sizes());
  const auto dt = grad_W_ld.scalar_type();
  const auto gl = grad_ld.to(dt), gn = grad_n.to(dt);
  at::Tensor dW, db;
  if (output_mask[0]) dW = (grad_W_ld * gl.view({L, 1, 1}) + grad_W_n * gn.view({L, 1, 1})).to(W_r.scalar_type());
  if (output_mask[1] && has_b) db = (grad_b_ld * gl.view({L, 1}) + grad_b_n * gn.view({L, 1})).to(W_r.scalar_type());
  if (!dW.defined()) dW = at::empty({0}, W_r.options());
  if (!db.defined()) db = at::empty({0}, W_r.options());
  return {dW, db};
}

}  // namespace
}  // namespace regularizer

TORCH_LIBRARY_IMPL(relaxeq, CPU, m) {
  m.impl("relaxation_regularizer", &regularizer::forward);
  m.impl("relaxation_regularizer_backward", &regularizer::backward);
}

#ifdef RELAXEQ_WITH_CUDA
TORCH_LIBRARY_IMPL(relaxeq, CUDA, m) {
  m.impl("relaxation_regularizer", &regularizer::forward);
  m.impl("relaxation_regularizer_backward", &regularizer::backward);
}
#endif

}  // namespace relaxeq
