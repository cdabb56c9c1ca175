"""Vector-Neuron batch norm: vn_norm_stats, vn_batch_norm_apply (+ backward). Mirrors
csrc/vn_batch_norm.h; shared by the functional layer, the Triton ops and the fake kernels.

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from ..reference import stats_dtype
from .autocast import AUTOCAST_FP32
from .registration import dispatcher_op, register_op_formulas
from .checks import check_matches_x

__all__ = ["check_vn_features", "check_vn_batch_norm_apply_args", "check_vn_batch_norm_apply_backward_args",
           "vn_norm_stats_backward_formula", "make_vn_batch_norm_apply_backward", "register_vn_batch_norm_ops"]


def check_vn_features(x, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != 3:
        raise ValueError(f"{op}: x must have shape [N, C, 3] (VN features), got {x.dim()}-D with shape "
                         f"{list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


def _check_vn_channel_arg(t, name, x, dtype, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: {name} must have shape [C] with C = x.shape[1] = {x.shape[1]}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")


def check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op="vn_batch_norm_apply"):
    """mean/invstd: [C] in ``stats_dtype(x.dtype)``; weight/bias: [C] in x's dtype or None."""
    check_vn_features(x, op)
    sdt = stats_dtype(x.dtype)
    _check_vn_channel_arg(mean, "mean", x, sdt, op)
    _check_vn_channel_arg(invstd, "invstd", x, sdt, op)
    if weight is not None:
        _check_vn_channel_arg(weight, "weight", x, x.dtype, op)
    if bias is not None:
        _check_vn_channel_arg(bias, "bias", x, x.dtype, op)


def check_vn_batch_norm_apply_backward_args(grad_y, x, mean, invstd, weight, bias,
                                            op="vn_batch_norm_apply_backward"):
    check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op=op)
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"{op}: grad_y must be a torch.Tensor, got {type(grad_y).__name__}")
    if grad_y.shape != x.shape:
        raise ValueError(f"{op}: grad_y must have the shape of x {list(x.shape)}, got {list(grad_y.shape)}")
    check_matches_x(grad_y, "grad_y", x, op)


def _vn_norm_stats_fake(x, norm_eps):
    check_vn_features(x, "vn_norm_stats")
    sdt = stats_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=sdt), x.new_empty((x.shape[1],), dtype=sdt)


def _vn_batch_norm_apply_fake(x, mean, invstd, weight, bias, norm_eps):
    check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias)
    return x.new_empty(x.shape)


def _vn_batch_norm_apply_backward_fake(grad_y, x, mean, invstd, weight, bias, norm_eps, output_mask):
    check_vn_batch_norm_apply_backward_args(grad_y, x, mean, invstd, weight, bias)
    c = x.shape[1]
    sdt = stats_dtype(x.dtype)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty((c,) if output_mask[1] else (0,), dtype=sdt if output_mask[1] else x.dtype),
            x.new_empty((c,) if output_mask[2] else (0,), dtype=sdt if output_mask[2] else x.dtype),
            x.new_empty((c,) if output_mask[3] else (0,)),
            x.new_empty((c,) if output_mask[4] else (0,)))


def vn_norm_stats_backward_formula(x, mean, norm_eps, grad_mean, grad_var):
    """Gradient of (mean, biased var) of the norms ‖x_n‖ + norm_eps w.r.t. x [N, C, 3].

    d mean / d norm_n = 1/N, d var / d norm_n = 2 (norm_n − mean) / N, d norm / d x = x / ‖x‖
    (0 at x = 0, as torch's vector_norm). Plain torch ops: differentiable again and traceable,
    and the [N, C] temporaries only exist in training's backward.
    """
    n = x.shape[0]
    sdt = mean.dtype
    xs = x.to(sdt)
    # g_norm = a + b·r per channel (r = ‖x‖; norm = r + norm_eps), folded into per-channel a, b so
    # the [N, C] work is one addcmul, one division and one mask.
    a = torch.zeros_like(mean)
    bcoef = torch.zeros_like(mean)
    if grad_mean is not None:
        a = a + grad_mean / n
    if grad_var is not None:
        bcoef = grad_var * (2.0 / n)
        a = a + bcoef * (norm_eps - mean)
    r = torch.linalg.vector_norm(xs, dim=-1)
    coef = torch.addcmul(a, bcoef, r).div_(r).masked_fill_(r == 0, 0)
    return (xs * coef.unsqueeze(-1)).to(x.dtype)


def _vn_norm_stats_setup_context(ctx, inputs, output):
    x, norm_eps = inputs
    mean, _var = output
    ctx.save_for_backward(x, mean)
    ctx.norm_eps = norm_eps


def _vn_norm_stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return vn_norm_stats_backward_formula(x, mean, ctx.norm_eps, grad_mean, grad_var), None


def _vn_apply_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, norm_eps = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias)
    ctx.norm_eps = norm_eps


def make_vn_batch_norm_apply_backward(backward_op):
    """Autograd formula of vn_batch_norm_apply in terms of its fused backward op (one pass over x)."""
    def backward(ctx, grad_y):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], weight is not None and needs[3], bias is not None and needs[4]]
        if not any(mask):
            return None, None, None, None, None, None
        grads = backward_op(grad_y.contiguous(), x, mean, invstd, weight, bias, ctx.norm_eps, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)
    return backward


def register_vn_batch_norm_ops(stats_qualname: str, apply_qualname: str, backward_qualname: str):
    """Fake kernels and autograd for one backend's three vn_batch_norm ops (native or Triton)."""
    # the statistics' backward is a closed formula (no fused op of its own)
    register_op_formulas(stats_qualname, fake=_vn_norm_stats_fake, backward=_vn_norm_stats_backward,
                         setup_context=_vn_norm_stats_setup_context, autocast=AUTOCAST_FP32)
    register_op_formulas(apply_qualname, fake=_vn_batch_norm_apply_fake,
                         backward=make_vn_batch_norm_apply_backward(dispatcher_op(backward_qualname)),
                         setup_context=_vn_apply_setup_context, autocast=AUTOCAST_FP32,
                         backward_qualname=backward_qualname, backward_fake=_vn_batch_norm_apply_backward_fake)
