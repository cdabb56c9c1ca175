"""Closed-form relaxation regularisers from input statistics (DESIGN §1).

For a relaxed affine layer f(x) = W_eq x + θ (W_r x + b_r) with generators A_k on input and output,

    C_k  = W_r A_k,in − A_k,out W_r
    R_LD = Σ_k ⟨C_kᵀ C_k, G⟩ − 2 (A_k,out b_r)ᵀ C_k s + N ‖A_k,out b_r‖²   = Σ_k Σ_n ‖C_k x̂_n − A_k,out b_r‖²
    R_N  = ⟨W_rᵀ W_r, G⟩ + 2 b_rᵀ W_r s + N ‖b_r‖²                         = Σ_n ‖W_r x̂_n + b_r‖²

with G = Σ x̂ x̂ᵀ, s = Σ x̂ over the batch rows. These are exact; gradients w.r.t. W_r, b_r flow through
these O(D³) expressions. The data-free variant takes G = I, s = 0 and weight 1 on the bias terms.
This module is the one place this algebra lives: every backend feeds it the same (G, s, N).
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch

from . import _ops
from .backend import resolve_backend
from .functional import InputStats
from .reps import Irreps, irrep_generators

__all__ = ["RegularizerTerms", "lie_derivative_matrices", "relaxation_regularizers", "relaxation_regularizer_ref",
           "grouped_relaxation_regularizers", "combine_regularizers", "REDUCTIONS"]

REDUCTIONS = ("paper", "sum", "mean", "layer_mean")


class RegularizerTerms(NamedTuple):
    """R_LD and R_N of one layer (0-d tensors) and the number of rows they sum over."""
    lie_derivative: torch.Tensor
    projection: torch.Tensor
    n: int


def lie_derivative_matrices(W_r: torch.Tensor, irreps_in: Irreps, irreps_out: Irreps) -> torch.Tensor:
    """C_k = W_r A_k,in − A_k,out W_r for k = 1..3: [3, ..., D_out, D_in] for W_r [..., D_out, D_in],
    without dense generators.

    A_k is skew, so W_r A_k,in = −(A_k,in applied to the rows of W_r), and A_k,out W_r is A_k,out
    applied to the columns of W_r.
    """
    return -irreps_in.apply_generators(W_r) - irreps_out.apply_generators(W_r.transpose(-1, -2)).transpose(-1, -2)


def relaxation_regularizers(W_r: torch.Tensor, b_r: Optional[torch.Tensor], irreps_in: Irreps,
                            irreps_out: Irreps, stats: Optional[InputStats],
                            rows: Optional[torch.Tensor] = None, *, backend: Optional[str] = None) -> RegularizerTerms:
    """(R_LD, R_N) of one relaxed layer from its input statistics, or data-free when ``stats`` is None.

    W_r: [D_out, D_in]; b_r: [D_out] or None; stats.G: [D_in, D_in], stats.s: [D_in].
    Computed in the statistics' dtype (float32 or wider). With statistics, a stack of L layers that share
    irreps and N is evaluated at once: W_r [L, D_out, D_in], b_r [L, D_out], G [L, D_in, D_in], s [L, D_in]
    give R_LD, R_N of shape [L].

    rows: the N input rows x̂ [..., N, D_in] themselves, optional. With them the same sums are taken over the
    rows directly, Σ_n ‖C_k x̂_n − A_k b_r‖² and Σ_n ‖W_r x̂_n + b_r‖², in O(N D_in D_out) instead of the closed
    form's O(D_in² D_out): cheaper when N < D_in (pooled features entering wide layers).

    backend: as for the layers ("auto" | "native" | "triton" | "reference"; None: the current default).
    The native op ``relaxeq::relaxation_regularizer`` (one dispatch instead of dozens of small ops) runs
    for "native", its Triton twin ``relaxeq::relaxation_regularizer_triton`` for "triton", and
    "reference" runs :func:`relaxation_regularizer_ref`.
    """
    if W_r.shape[-2:] != (irreps_out.dim, irreps_in.dim) or (stats is None and W_r.dim() != 2):
        raise ValueError(f"W_r must have shape [D_out, D_in] = [{irreps_out.dim}, {irreps_in.dim}], "
                         f"got {list(W_r.shape)}")
    if stats is None:
        dtype = torch.promote_types(W_r.dtype, torch.float32)
        W = W_r.to(dtype)
        C = lie_derivative_matrices(W, irreps_in, irreps_out)
        r_ld, r_n = (C * C).sum(), (W * W).sum()
        if b_r is not None:
            b = b_r.to(dtype)
            Ab = irreps_out.apply_generators(b)
            r_ld, r_n = r_ld + (Ab * Ab).sum(), r_n + (b * b).sum()
        return RegularizerTerms(r_ld, r_n, 1)
    G, s, n = stats
    W_r, b_r, G, s, rows = _ops.autocast_inputs(_ops.AUTOCAST_FP32, G.device.type, W_r, b_r, G, s, rows)
    lead = W_r.shape[:-2]
    if G.shape != (*lead, irreps_in.dim, irreps_in.dim) or s.shape != (*lead, irreps_in.dim):
        raise ValueError(f"stats must hold G: [{irreps_in.dim}, {irreps_in.dim}] and s: [{irreps_in.dim}], "
                         f"got G: {list(G.shape)}, s: {list(s.shape)} (were stats collected for this layer?)")
    if rows is not None and rows.shape != (*lead, n, irreps_in.dim):
        raise ValueError(f"rows must have shape {[*lead, n, irreps_in.dim]} (the N = {n} rows of the "
                         f"statistics), got {list(rows.shape)}")
    op = _regularizer_op(G.device, backend) if len(lead) <= 1 else None
    if op is not None:
        stack = (lambda t: t[None]) if not lead else (lambda t: t)
        r_ld, r_n, *_unit_grads = op(
            stack(W_r), None if b_r is None else stack(b_r), stack(G.detach()), stack(s.detach()),
            None if rows is None else stack(rows.detach()), n, _flat_irreps(irreps_in), _flat_irreps(irreps_out),
            _generator_list(irreps_in, irreps_out, G.dtype, G.device))
        return RegularizerTerms(r_ld if lead else r_ld[0], r_n if lead else r_n[0], n)
    r_ld, r_n = relaxation_regularizer_ref(W_r, b_r, G, s, rows, n, irreps_in, irreps_out)
    return RegularizerTerms(r_ld, r_n, n)


def relaxation_regularizer_ref(W_r: torch.Tensor, b_r: Optional[torch.Tensor], G: torch.Tensor, s: torch.Tensor,
                               rows: Optional[torch.Tensor], n: int, irreps_in: Irreps,
                               irreps_out: Irreps) -> tuple[torch.Tensor, torch.Tensor]:
    """(R_LD, R_N) in pure PyTorch: the reference of ``relaxeq::relaxation_regularizer``.

    W_r [..., D_out, D_in], b_r [..., D_out] or None, G [..., D_in, D_in], s [..., D_in] (n rows), rows
    [..., n, D_in] or None: R_LD, R_N of shape [...] in G's dtype; gradients reach W_r and b_r only.
    """
    W = W_r.to(G.dtype)
    C = lie_derivative_matrices(W, irreps_in, irreps_out)
    if rows is not None:
        Xt = rows.detach().to(G.dtype).transpose(-1, -2)  # [..., D_in, N]
        lie, out = C @ Xt, W @ Xt  # [3, ..., D_out, N], [..., D_out, N]
        if b_r is not None:
            b = b_r.to(G.dtype)
            lie = lie - irreps_out.apply_generators(b)[..., None]  # d/dt of the bias term: −A_k b_r
            out = out + b[..., None]
        return (lie * lie).sum((0, -2, -1)), (out * out).sum((-2, -1))
    # ⟨XᵀX, G⟩ = Σ (X G) ∘ X for X = C_1..C_3 and for W_r.
    G, s = G.detach(), s.detach()
    r_ld = _QuadraticForms.apply(C, G)[0].sum(0)
    r_n = _QuadraticForms.apply(W[None], G)[0][0]
    if b_r is not None:
        b = b_r.to(G.dtype)
        Ab = irreps_out.apply_generators(b)  # [3, ..., D_out]
        Cs = (C @ s[..., None]).squeeze(-1)  # [3, ..., D_out]
        r_ld = r_ld - 2 * (Ab * Cs).sum((0, -1)) + n * (Ab * Ab).sum((0, -1))
        r_n = r_n + 2 * (b * (W @ s[..., None]).squeeze(-1)).sum(-1) + n * (b * b).sum(-1)
    return r_ld, r_n


def _regularizer_op(device: torch.device, backend: Optional[str]):
    """The relaxation_regularizer op for the resolved backend, or None for the reference."""
    name = resolve_backend(device, backend)
    if name == "triton":
        from .triton_kernels import relaxation_regularizer as triton_regularizer
        return triton_regularizer.op()
    if name == "native":
        return torch.ops.relaxeq.relaxation_regularizer
    return None


def _flat_irreps(irreps: Irreps) -> list[int]:
    return [v for block in irreps.blocks for v in block]


def _generator_list(irreps_in: Irreps, irreps_out: Irreps, dtype, device) -> list[torch.Tensor]:
    max_l = max(l for _, l in irreps_in.blocks + irreps_out.blocks)
    return [irrep_generators(l, dtype=dtype, device=device) for l in range(max_l + 1)]


def grouped_relaxation_regularizers(W_rs: list, b_rs: list, irreps_in: Irreps, irreps_out: Irreps,
                                    stats: list, rows: Optional[list] = None, *,
                                    backend: Optional[str] = None) -> RegularizerTerms:
    """Σ over L layers of their (R_LD, R_N), for layers that share irreps, dtype and N, in one batched
    evaluation: the regulariser is dozens of tiny ops per layer, whose count (not size) sets its cost.

    W_rs: L tensors [D_out, D_in]; b_rs: L tensors [D_out] (or all None); stats: L InputStats, same n;
    rows: L input-row tensors [n, D_in] or None (see :func:`relaxation_regularizers`).
    """
    n = stats[0].n
    if any(st.n != n for st in stats):
        raise ValueError(f"grouped layers must share the row count N, got {[st.n for st in stats]}")
    b = None if b_rs[0] is None else torch.stack(b_rs)
    terms = relaxation_regularizers(torch.stack(W_rs), b, irreps_in, irreps_out,
                                    InputStats(torch.stack([st.G for st in stats]),
                                               torch.stack([st.s for st in stats]), n),
                                    rows=None if rows is None else torch.stack(rows), backend=backend)
    return RegularizerTerms(terms.lie_derivative.sum(), terms.projection.sum(), n)


class _QuadraticForms(torch.autograd.Function):
    """q = ⟨X G, X⟩ over the last two dims for a stack X [..., m, D] and constant symmetric G [..., D, D]
    (broadcast against X's leading dims).

    dq_b/dX_b = 2 X_b G: the backward reuses the forward's X G instead of autograd's second
    GEMM through G, which halves the D³ work of the regulariser on wide layers.
    """

    @staticmethod
    def forward(X, G):
        XG = X @ G
        return (XG * X).sum((-2, -1)), XG

    @staticmethod
    def setup_context(ctx, inputs, output):
        _q, XG = output
        ctx.mark_non_differentiable(XG)
        ctx.save_for_backward(XG)

    @staticmethod
    def backward(ctx, grad_q, _grad_XG):
        (XG,) = ctx.saved_tensors
        return 2 * grad_q[..., None, None] * XG, None


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite slope at 0, where relaxation weights start; clamp keeps the gradient finite.
    return torch.sqrt(torch.clamp(t, min=torch.finfo(t.dtype).tiny))


def combine_regularizers(terms: Iterable[RegularizerTerms], lambda_ld: float, lambda_n: float,
                         reduction: str = "paper", theta: Optional[torch.Tensor | float] = None) -> torch.Tensor:
    """The regularisation loss over layers ℓ: a 0-d tensor (differentiable w.r.t. the relaxation weights).

    terms: the layers' :class:`RegularizerTerms` (0-d R_LD, R_N each), e.g. ``model_regularizers(model)``.
    lambda_ld, lambda_n: the weights λ_LD of the Lie-derivative term and λ_N of the norm term. Both are
      required (no default): ``relaxeq-train`` uses the model's paper setup, 1e-2 each unless that says
      otherwise (``relaxeq_fast.train.config.PAPER_SETUPS``); pass 0 to drop a term.
    reduction:
      "paper": λ_LD √(Σ_ℓ R_LD,ℓ) + λ_N √(Σ_ℓ R_N,ℓ)   (the paper's form)
      "sum":   λ_LD Σ_ℓ R_LD,ℓ + λ_N Σ_ℓ R_N,ℓ
      "mean":  λ_LD Σ_ℓ R_LD,ℓ / N_ℓ + λ_N Σ_ℓ R_N,ℓ / N_ℓ   (per-row mean)
      "layer_mean": λ_LD √(Σ_ℓ R_LD,ℓ / N_ℓ) + λ_N √(Σ_ℓ R_N,ℓ / N_ℓ)   (the paper's form with each layer's
        terms divided by its own row count N_ℓ: the sums weigh a layer by the rows it sees, so layers after
        pooling (N_ℓ = B rows, against B·P before it) would otherwise be regularised ~P times less)
    theta: when given, the terms are those of the layer f_θ itself (R scaled by θ², i.e. λ scaled by θ
      in the paper form): the regulariser fades with the relaxation.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    terms = list(terms)
    if not terms:
        raise ValueError("terms is empty: no relaxed layer produced regulariser terms")
    if reduction in ("mean", "layer_mean"):
        ld = sum(t.lie_derivative / max(t.n, 1) for t in terms)
        nn_ = sum(t.projection / max(t.n, 1) for t in terms)
    else:
        ld = sum(t.lie_derivative for t in terms)
        nn_ = sum(t.projection for t in terms)
    if theta is not None:
        theta_sq = torch.as_tensor(theta, dtype=ld.dtype, device=ld.device) ** 2
        ld, nn_ = ld * theta_sq, nn_ * theta_sq
    if reduction in ("paper", "layer_mean"):
        ld, nn_ = _safe_sqrt(ld), _safe_sqrt(nn_)
    return lambda_ld * ld + lambda_n * nn_
