"""Public functions: shapes documented, backend chosen here, autograd through torch.library ops."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _ops
from .backend import resolve_backend, runs_native_composite
from .reference import relaxed_conv_params_ref, relaxed_linear_ref, relaxed_params_ref, stats_dtype

__all__ = ["InputStats", "relaxed_conv2d", "relaxed_conv_params", "relaxed_linear", "relaxed_params", "vn_batch_norm",
           "vn_leaky_relu"]


class InputStats(NamedTuple):
    """Statistics of a layer's (detached) input rows: G = Σ x̂ x̂ᵀ [D, D], s = Σ x̂ [D], n rows."""
    G: torch.Tensor
    s: torch.Tensor
    n: int


def _raw_relaxed_linear(backend: str):
    if backend == "native":
        return torch.ops.relaxeq.relaxed_linear
    if backend == "triton":
        from .triton_kernels import relaxed_linear as triton_relaxed_linear
        return triton_relaxed_linear.op()
    return relaxed_linear_ref


def relaxed_linear(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor] = None, *,
                   stats: bool = False, backend: Optional[str] = None):
    """Fused relaxed linear map over rows: ``y = x Mᵀ + c``, plus input statistics in the same pass.

    Args:
        x: [..., D_in] input rows (any leading batch dims; flattened to N rows).
        M: [D_out, D_in] effective matrix, typically ``W_eq + θ W_r``.
        c: [D_out] effective bias (``b_eq + θ b_r``) or None.
        stats: also return the detached input statistics (G, s, N) the regularisers need.
        backend: "auto" | "native" | "triton" | "reference"; None defers to
            :func:`relaxeq_fast.use_backend` / RELAXEQ_BACKEND.

    Returns:
        y: [..., D_out]; and when ``stats``, an :class:`InputStats` with G: [D_in, D_in] and
        s: [D_in] in float32 (float64 for float64 x) and n = N.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"relaxed_linear: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("relaxed_linear: x must have shape [..., D_in], got a 0-d tensor")
    x, M, c = _ops.autocast_inputs(_ops.AUTOCAST_LOWER, x.device.type, x, M, c)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    _ops.check_relaxed_linear_args(x2, M, c)
    op = _raw_relaxed_linear(resolve_backend(x.device, backend))
    y, G, s = op(x2, M, c, stats)
    y = y.reshape(*lead, M.shape[0])
    if not stats:
        return y
    return y, InputStats(G, s, math.prod(lead))


def relaxed_params(weight: torch.Tensor, weight_relax: torch.Tensor, bias: Optional[torch.Tensor],
                   bias_relax: Optional[torch.Tensor], theta: torch.Tensor, *, backend: Optional[str] = None):
    """A relaxed layer's effective parameters: ``M = weight ⊗ I_d + θ weight_relax``, ``c = bias + θ bias_relax``.

    For layers whose equivariant map is one channel mixing repeated over a d-dimensional representation
    (VN features: d = 3, scalars: d = 1). One op (``relaxeq::relaxed_params``, written once in ATen calls)
    instead of the eye / kron / mul / add chain and its backward, per layer and step. θ gets a gradient when it
    requires one (a learned θ): dθ = ⟨dM, weight_relax⟩ + ⟨dc, bias_relax⟩; a scheduled θ is a buffer.

    Args:
        weight: [C_out, C_in] equivariant channel mixing.
        weight_relax: [C_out d, C_in d] relaxation matrix W_r.
        bias: [C_out d] equivariant bias (zero outside scalar outputs) or None.
        bias_relax: [C_out d] relaxation bias b_r or None.
        theta: 0-d tensor (the layer's θ: a buffer, or a trainable parameter), in weight's dtype and device.
        backend: "native" and "triton" (where the extension has kernels for the device) run the op;
            "reference" runs :func:`relaxeq_fast.reference.relaxed_params_ref`; None: the current default.

    Returns:
        M: [C_out d, C_in d]; c: [C_out d], or None when bias and bias_relax are both None.
    """
    if isinstance(weight, torch.Tensor):
        weight, weight_relax, bias, bias_relax, theta = _ops.autocast_inputs(
            _ops.AUTOCAST_FP32, weight.device.type, weight, weight_relax, bias, bias_relax, theta)
    _ops.check_relaxed_params_args(weight, weight_relax, bias, bias_relax, theta)
    if runs_native_composite(weight.device, backend):
        M, c = torch.ops.relaxeq.relaxed_params(weight, weight_relax, bias, bias_relax, theta)
    else:
        M, c = relaxed_params_ref(weight, weight_relax, bias, bias_relax, theta)
    return M, (None if bias is None and bias_relax is None else c)


def relaxed_conv_params(kernel: torch.Tensor, weight_relax: torch.Tensor, theta: torch.Tensor,
                        defect_out: torch.Tensor, defect_in: torch.Tensor, defect_spatial: torch.Tensor,
                        rotation_step: bool, need_defect: bool = True, *, backend: Optional[str] = None):
    """A relaxed steerable conv's effective kernel ``M = kernel + θ weight_relax`` and the equivariance defect
    ``D(weight_relax)`` of its relaxation kernel, in one op (``relaxeq::relaxed_conv_params``, written once in
    ATen calls) instead of the mul / add / flatten / matmul / einsum chain and its backward, per layer and step.

    Args:
        kernel: [O, I, k, k] the equivariant kernel K_eq (expanded from the steerable basis).
        weight_relax: [O, I, k, k] the free relaxation kernel B.
        theta: 0-d tensor (a buffer, or a trainable parameter: it then gets dθ = ⟨dM, B⟩), in B's dtype and device.
        defect_out, defect_in, defect_spatial: A_out [O, O], A_in [I, I], S [k², k²] from
            :func:`relaxeq_fast.steerable.defect_matrices`, in B's dtype and device.
        rotation_step: True for C_N (D(B) = A_out (S B) A_inᵀ − B, the rotation by 2π/N), False for SO(2)
            (D(B) = A_out B − B A_in + S B, the infinitesimal rotation).
        need_defect: False skips D (evaluation, or a layer that does not track its defect).
        backend: "native" and "triton" (where the extension has kernels for the device) run the op;
            "reference" runs :func:`relaxeq_fast.reference.relaxed_conv_params_ref`; None: the current default.

    Returns:
        M: [O, I, k, k]; D: [O, I, k, k], or None without need_defect.
    """
    if isinstance(weight_relax, torch.Tensor):
        kernel, weight_relax, theta, defect_out, defect_in, defect_spatial = _ops.autocast_inputs(
            _ops.AUTOCAST_FP32, weight_relax.device.type, kernel, weight_relax, theta, defect_out, defect_in,
            defect_spatial)
    _ops.check_relaxed_conv_params_args(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial)
    if runs_native_composite(weight_relax.device, backend):
        M, D = torch.ops.relaxeq.relaxed_conv_params(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                                     bool(rotation_step), bool(need_defect))
    else:
        M, D = relaxed_conv_params_ref(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                       bool(rotation_step), bool(need_defect))
    return M, (D if need_defect else None)


def _check_vn_features(t, name, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() < 2 or t.shape[-1] != 3:
        raise ValueError(f"{op}: {name} must have shape [..., C, 3] (VN features), got {list(t.shape)}")


def _raw_vn_leaky_relu(backend: str):
    if backend == "native":
        return torch.ops.relaxeq.vn_leaky_relu
    if backend == "triton":
        from .triton_kernels import vn_leaky_relu as triton_vn_leaky_relu
        return triton_vn_leaky_relu.op()
    from .reference import vn_leaky_relu_ref
    return vn_leaky_relu_ref


def vn_leaky_relu(x: torch.Tensor, d: torch.Tensor, negative_slope: float = 0.2, eps: float = 1e-6, *,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Vector-Neuron leaky ReLU with direction ``d`` (see :func:`relaxeq_fast.reference.vn_leaky_relu_ref`).

    One fused pass on the native and Triton backends; their backward saves only x and d and
    recomputes ⟨x, d⟩ and ‖d‖² (the eager formula keeps about ten [N, C, 3] temporaries).

    Args:
        x: [..., C, 3] features.
        d: [..., C, 3] per-channel directions, or [..., 1, 3] one shared direction (same leading dims as x).
        negative_slope: α in [0, 1): the share of x kept unchanged.
        eps: > 0, added to ‖d‖² so zero directions give finite outputs.
        backend: "auto" | "native" | "triton" | "reference"; None defers to
            :func:`relaxeq_fast.use_backend` / RELAXEQ_BACKEND.
    Returns:
        [..., C, 3]
    """
    op = "vn_leaky_relu"
    _check_vn_features(x, "x", op)
    _check_vn_features(d, "d", op)
    x, d = _ops.autocast_inputs(_ops.AUTOCAST_FP32, x.device.type, x, d)
    if d.shape[:-2] != x.shape[:-2] or d.shape[-2] not in (1, x.shape[-2]):
        raise ValueError(f"{op}: d must have shape [..., C, 3] or [..., 1, 3] matching x {list(x.shape)}, "
                         f"got {list(d.shape)}")
    if d.dtype != x.dtype or d.device != x.device:
        raise ValueError(f"{op}: d must have the dtype and device of x ({x.dtype}, {x.device}), "
                         f"got {d.dtype}, {d.device}")
    if not 0.0 <= negative_slope < 1.0:
        raise ValueError(f"{op}: negative_slope must be in [0, 1), got {negative_slope}")
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be positive (it keeps d = 0 finite), got {eps}")
    raw = _raw_vn_leaky_relu(resolve_backend(x.device, backend))
    n = math.prod(x.shape[:-2])  # leading dims flattened to N rows (reshape copies only when it must)
    out = raw(x.reshape(n, x.shape[-2], 3), d.reshape(n, d.shape[-2], 3), float(negative_slope), float(eps))
    return out.reshape(x.shape)


def _raw_vn_batch_norm(backend: str):
    """(vn_norm_stats, vn_batch_norm_apply) ops of a compiled backend."""
    if backend == "native":
        return torch.ops.relaxeq.vn_norm_stats, torch.ops.relaxeq.vn_batch_norm_apply
    from .triton_kernels import vn_batch_norm as triton_vn_batch_norm
    return triton_vn_batch_norm.stats_op(), triton_vn_batch_norm.apply_op()


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mean, var, rows, momentum):
    # torch's batch_norm convention: running variance from the unbiased batch variance
    if running_mean is not None:
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (rows / (rows - 1))).to(running_var.dtype), alpha=momentum)


def vn_batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                  weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                  training: bool = False, momentum: float = 0.1, eps: float = 1e-5, norm_eps: float = 1e-6, *,
                  backend: Optional[str] = None, stats_reducer=None) -> torch.Tensor:
    """Vector-Neuron batch norm over all leading dims (see :func:`relaxeq_fast.reference.vn_batch_norm_ref`).

    norm = ‖x_c‖ + norm_eps per vector; BatchNorm1d of the norms over every leading position,
    exactly as ``torch.nn.functional.batch_norm`` (training: batch mean and biased variance, and
    running stats updated in place with the unbiased variance; eval: running stats); each vector
    is rescaled to its new norm.

    Compiled backends run two ops: ``vn_norm_stats`` (per-channel mean/var of the norms, one pass;
    training only) and ``vn_batch_norm_apply`` (norms, normalisation and rescaling in one pass,
    with a fused backward). The gradient through the batch statistics is the autograd formula
    registered on ``vn_norm_stats``, so training mode is differentiable end to end.

    Args:
        x: [..., C, 3] features; statistics are taken over every leading position (batch and points).
        running_mean, running_var: [C] or None (then batch statistics are always used; eval mode
            needs them, as in torch).
        weight, bias: [C] affine parameters of the norm's batch norm, or None.
        stats_reducer: training only: ``(mean, var, rows) -> (mean, var, rows)`` applied to the batch
            moments before use, e.g. :func:`relaxeq_fast.distributed.all_reduce_moments` for
            global-batch statistics across ranks.
    Returns:
        [..., C, 3]
    """
    op = "vn_batch_norm"
    _check_vn_features(x, "x", op)
    # float32 buffers stay the same objects (the running statistics are updated in place)
    x, running_mean, running_var, weight, bias = _ops.autocast_inputs(
        _ops.AUTOCAST_FP32, x.device.type, x, running_mean, running_var, weight, bias)
    c = x.shape[-2]
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(f"{op}: {name} must have shape [C] = [{c}], got {list(t.shape)}")
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{op}: running_mean and running_var must both be given or both be None")
    rows = math.prod(x.shape[:-2])
    if training and rows < 2:
        raise ValueError(f"{op}: training mode needs more than one value per channel to take batch statistics, "
                         f"got {rows} row(s) of x {list(x.shape)} (use eval mode or a larger batch)")
    if not training and running_mean is None:
        raise ValueError(f"{op}: eval mode needs running_mean and running_var (as torch's batch_norm), got None")
    backend_name = resolve_backend(x.device, backend)
    x3 = x.reshape(-1, c, 3)
    if backend_name == "reference" and stats_reducer is not None and training:
        norm = torch.linalg.vector_norm(x3, dim=-1) + norm_eps
        var, mean = torch.var_mean(norm, dim=0, correction=0)
        mean, var, rows = stats_reducer(mean, var, rows)
        _update_running_stats(running_mean, running_var, mean, var, rows, momentum)
        norm_bn = (norm - mean) * torch.rsqrt(var + eps)
        if weight is not None:
            norm_bn = norm_bn * weight
        if bias is not None:
            norm_bn = norm_bn + bias
        return (x3 * (norm_bn / norm).unsqueeze(-1)).reshape(x.shape)
    if backend_name == "reference":
        from .reference import vn_batch_norm_ref
        out = vn_batch_norm_ref(x3, running_mean, running_var, weight, bias, training, momentum, eps, norm_eps)
        return out.reshape(x.shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    stats_op, apply_op = _raw_vn_batch_norm(backend_name)
    sdt = stats_dtype(x.dtype)
    if training:
        mean, var = stats_op(x3, norm_eps)
        if stats_reducer is not None:
            mean, var, rows = stats_reducer(mean, var, rows)
        _update_running_stats(running_mean, running_var, mean, var, rows, momentum)
        invstd = torch.rsqrt(var + eps)
    else:
        mean = running_mean.to(sdt)
        invstd = torch.rsqrt(running_var.to(sdt) + eps)
    y = apply_op(x3, mean, invstd, weight, bias, norm_eps)
    return y.reshape(x.shape)


def _raw_relaxed_conv2d(backend: str):
    if backend == "native":
        return torch.ops.relaxeq.relaxed_conv2d
    if backend == "triton":
        from .triton_kernels import relaxed_conv2d as triton_relaxed_conv2d
        return triton_relaxed_conv2d.op()
    from .reference import relaxed_conv2d_ref
    # Eager autograd differentiates r itself: the reference need not form S.
    return lambda x, M, c, D, padding, _need_S: relaxed_conv2d_ref(x, M, c, D, padding, False)


def relaxed_conv2d(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor] = None,
                   D: Optional[torch.Tensor] = None, padding: int = 0, *, backend: Optional[str] = None):
    """Relaxed 2D convolution and its data-mode equivariance regulariser in one pass.

    ``y = conv2d(x, M, c, padding)`` with the effective kernel ``M = K_eq + θ B``; when the defect
    kernel ``D = D(B)`` is given, also ``r = Σ conv2d(x̂, D, padding)²`` (x̂ = x detached; gradient
    to D only) — the defect responses are reduced to r, never returned.

    Args:
        x: [B, C_in, H, W]; M: [C_out, C_in, k, k]; c: [C_out] or None; D: [C_d, C_in, k, k] or None
            (same k as M); padding: zero padding on every side (int ≥ 0).
        backend: "auto" | "native" | "triton" | "reference"; None defers to
            :func:`relaxeq_fast.use_backend` / RELAXEQ_BACKEND.
    Returns:
        y: [B, C_out, H + 2 padding − k + 1, W + 2 padding − k + 1]; and r: [] (float32, float64 for
        float64 x) when D is given.
    """
    if isinstance(x, torch.Tensor):
        x, M, c, D = _ops.autocast_inputs(_ops.AUTOCAST_LOWER, x.device.type, x, M, c, D)
    _ops.check_relaxed_conv2d_args(x, M, c, D, padding)
    # The ops also return S (the weight gradient of the defect responses, dr/dD = 2 S): internal to
    # their autograd formula, not part of this API, and computed only when D's gradient can be asked for.
    need_S = torch.is_grad_enabled() and D is not None and D.requires_grad
    y, r, _S = _raw_relaxed_conv2d(resolve_backend(x.device, backend))(x, M, c, D, padding, need_S)
    return y if D is None else (y, r)
