"""Pure-PyTorch references: the ground truth for tests and the fallback without the extension.

Each ``<op>_ref`` has the signature of ``torch.ops.relaxeq.<op>`` and works in any dtype
(float64 in tests).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["relaxed_conv2d_ref", "relaxed_conv_defect_ref", "relaxed_conv_params_ref", "relaxed_linear_ref",
           "relaxed_linear_backward_ref", "relaxed_params_ref", "stats_dtype",
           "vn_batch_norm_ref", "vn_leaky_relu_ref"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Input statistics are accumulated in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def relaxed_linear_ref(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor], stats: bool):
    """y = x Mᵀ + c and, when ``stats``, G = x̂ᵀx̂, s = Σ_n x̂_n (x̂ = x detached).

    x: [N, D_in], M: [D_out, D_in], c: [D_out] or None
    → y: [N, D_out], G: [D_in, D_in] (or [0, 0]), s: [D_in] (or [0]); G, s in ``stats_dtype``.
    """
    y = x @ M.T
    if c is not None:
        y = y + c
    sdt = stats_dtype(x.dtype)
    if stats:
        xs = x.detach().to(sdt)
        G, s = xs.T @ xs, xs.sum(0)
    else:
        G, s = x.new_empty((0, 0), dtype=sdt), x.new_empty((0,), dtype=sdt)
    return y, G, s


def relaxed_linear_backward_ref(dy: torch.Tensor, x: torch.Tensor, M: torch.Tensor,
                                output_mask: Sequence[bool]):
    """dx = dy M, dM = dyᵀ x, dc = Σ_n dy_n; an output not asked for is an empty [0] tensor."""
    empty = x.new_empty((0,))
    dx = dy @ M if output_mask[0] else empty
    dM = dy.T @ x if output_mask[1] else empty
    dc = dy.sum(0) if output_mask[2] else empty
    return dx, dM, dc


def relaxed_params_ref(weight: torch.Tensor, weight_relax: torch.Tensor, bias: Optional[torch.Tensor],
                       bias_relax: Optional[torch.Tensor], theta: torch.Tensor):
    """M = weight ⊗ I_d + θ weight_relax, c = bias + θ bias_relax (c: an empty [0] tensor when both are None).

    weight: [C_out, C_in], weight_relax: [C_out d, C_in d], bias, bias_relax: [C_out d] or None, θ: 0-d
    → M: [C_out d, C_in d], c: [C_out d] or [0].
    """
    d = weight_relax.shape[1] // weight.shape[1]
    M = torch.kron(weight, torch.eye(d, dtype=weight.dtype, device=weight.device)) + theta * weight_relax
    if bias is None and bias_relax is None:
        return M, weight.new_empty((0,))
    c = 0
    if bias is not None:
        c = c + bias
    if bias_relax is not None:
        c = c + theta * bias_relax
    return M, c


def relaxed_conv_defect_ref(B: torch.Tensor, defect_out: torch.Tensor, defect_in: torch.Tensor,
                            defect_spatial: torch.Tensor, rotation_step: bool) -> torch.Tensor:
    """The equivariance defect D(B) of kernels B [..., O, I, k, k] (same shape), S acting on the k² pixels:
    C_N (rotation_step): A_out (S B) A_inᵀ − B;   SO(2): A_out B − B A_in + S B.
    defect_out: A_out [O, O], defect_in: A_in [I, I], defect_spatial: S [k², k²] (steerable.defect_matrices)."""
    k = B.shape[-1]
    SB = (B.flatten(-2) @ defect_spatial.T).unflatten(-1, (k, k))
    if not rotation_step:
        return (torch.einsum("op,...pihw->...oihw", defect_out, B)
                - torch.einsum("...oqhw,qi->...oihw", B, defect_in) + SB)
    return torch.einsum("op,...pqhw,iq->...oihw", defect_out, SB, defect_in) - B


def relaxed_conv_params_ref(kernel: torch.Tensor, weight_relax: torch.Tensor, theta: torch.Tensor,
                            defect_out: torch.Tensor, defect_in: torch.Tensor, defect_spatial: torch.Tensor,
                            rotation_step: bool, need_defect: bool = True):
    """M = kernel + θ weight_relax and D(weight_relax) (:func:`relaxed_conv_defect_ref`; an empty [0] tensor
    unless need_defect): the reference of ``relaxeq::relaxed_conv_params``.

    kernel, weight_relax: [O, I, k, k]; θ: 0-d → M: [O, I, k, k], D: [O, I, k, k] or [0].
    """
    M = kernel + theta * weight_relax
    if not need_defect:
        return M, weight_relax.new_empty((0,))
    return M, relaxed_conv_defect_ref(weight_relax, defect_out, defect_in, defect_spatial, rotation_step)


def vn_leaky_relu_ref(x: torch.Tensor, d: torch.Tensor, negative_slope: float, eps: float) -> torch.Tensor:
    """Vector-Neuron leaky ReLU (Deng et al. 2021) with a given direction d.

    out = α x + (1 − α) [x if ⟨x, d⟩ ≥ 0 else x − ⟨x, d⟩ / (‖d‖² + ε) d], per channel 3-vector.
    x: [N, C, 3]; d: [N, C, 3] (per-channel directions) or [N, 1, 3] (one shared direction) → [N, C, 3].
    """
    dot = (x * d).sum(-1, keepdim=True)
    d_sq = (d * d).sum(-1, keepdim=True)
    projected = x - (dot / (d_sq + eps)) * d
    return negative_slope * x + (1 - negative_slope) * torch.where(dot >= 0, x, projected)


def vn_batch_norm_ref(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                      weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool,
                      momentum: float, eps: float, norm_eps: float) -> torch.Tensor:
    """Vector-Neuron batch norm: BatchNorm1d on the vector norms, vectors rescaled to the new norms.

    norm = ‖x_nc‖ + norm_eps; y_nc = x_nc · BN(norm)_nc / norm_nc, with BN exactly
    ``torch.nn.functional.batch_norm`` over the N rows per channel (running stats updated in place
    in training mode when given). x: [N, C, 3] → [N, C, 3]; the other tensors [C].
    """
    norm = torch.linalg.vector_norm(x, dim=-1) + norm_eps
    norm_bn = torch.nn.functional.batch_norm(norm, running_mean, running_var, weight, bias, training, momentum, eps)
    return x * (norm_bn / norm).unsqueeze(-1)


def relaxed_conv2d_ref(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor], D: Optional[torch.Tensor],
                       padding: int, need_S: bool = True):
    """y = conv2d(x, M, c, padding) and, when D is given, r = Σ z² with z = conv2d(x̂, D, padding)
    (x̂ = x detached) and S, the weight gradient of z.

    The defect responses z are what a fused kernel computes as extra output channels and reduces to
    the scalar r without storing them. r carries gradient to D only: the regulariser pulls the
    relaxation kernel towards equivariance, it does not move the features. S = Σ_positions z ⊗ patch
    is formed here independently of z, as S = D̃ P with P = Σ patch patchᵀ (the patches of x̂ by
    ``unfold``) and D̃ = D reshaped to [C_d, C_in k²]; then r = ⟨D, S⟩ and ∂r/∂D = 2 S. S is
    detached (the fused ops use it only inside their autograd formula); ``need_S=False`` skips it
    (an empty [0] tensor), for callers that want only y and r. The arguments are those of the op
    ``relaxeq::relaxed_conv2d``, where need_S has no default.

    x: [B, C_in, H, W], M: [C_out, C_in, k, k], c: [C_out] or None, D: [C_d, C_in, k, k] or None
    → y: [B, C_out, H', W'], r: [] and S: [C_d, C_in, k, k], both in ``stats_dtype`` (empty [0]
    tensors when D is None).
    """
    y = torch.nn.functional.conv2d(x, M, c, padding=padding)
    sdt = stats_dtype(x.dtype)
    if D is None:
        return y, x.new_empty((0,), dtype=sdt), x.new_empty((0,), dtype=sdt)
    xs = x.detach().to(sdt)
    z = torch.nn.functional.conv2d(xs, D.to(sdt), padding=padding)
    if not need_S:
        return y, z.square().sum(), x.new_empty((0,), dtype=sdt)
    with torch.no_grad():
        patches = torch.nn.functional.unfold(xs, M.shape[2], padding=padding)  # [B, C_in k², L]
        P = torch.einsum("bil,bjl->ij", patches, patches)
        S = (D.detach().to(sdt).reshape(D.shape[0], -1) @ P).reshape(D.shape)
    return y, z.square().sum(), S
