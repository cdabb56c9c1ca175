"""vn_leaky_relu: x [N, C, 3], d [N, C, 3] or [N, 1, 3] (one direction shared by the channels)

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from .autocast import AUTOCAST_FP32
from .registration import dispatcher_op, register_op_formulas
from .checks import check_matches_x

__all__ = ["check_vn_leaky_relu_args", "check_vn_leaky_relu_backward_args", "make_vn_leaky_relu_backward",
           "register_vn_leaky_relu_op"]


def check_vn_leaky_relu_args(x, d, negative_slope, eps, op="vn_leaky_relu"):
    """Argument checks shared by the Triton op and the fake kernels (mirrors csrc/vn_leaky_relu.h,
    which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("d", d)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3 or x.shape[2] != 3:
        raise ValueError(f"{op}: x must have shape [N, C, 3] (VN features), got {list(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if d.dim() != 3 or d.shape[2] != 3 or d.shape[0] != n or d.shape[1] not in (1, c):
        raise ValueError(f"{op}: d must have shape [N, C, 3] or [N, 1, 3] with N = x.shape[0] = {n} and "
                         f"C = x.shape[1] = {c}, got {list(d.shape)}")
    check_matches_x(d, "d", x, op)
    if not 0.0 <= negative_slope < 1.0:
        raise ValueError(f"{op}: negative_slope must be in [0, 1), got {negative_slope}")
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be positive (it keeps d = 0 finite), got {eps}")


def check_vn_leaky_relu_backward_args(grad_out, x, d, negative_slope, eps, op="vn_leaky_relu_backward"):
    check_vn_leaky_relu_args(x, d, negative_slope, eps, op=op)
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{op}: grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    if grad_out.shape != x.shape:
        raise ValueError(f"{op}: grad_out must have the shape of x {list(x.shape)}, got {list(grad_out.shape)}")
    check_matches_x(grad_out, "grad_out", x, op)


def _vn_leaky_relu_fake(x, d, negative_slope, eps):
    check_vn_leaky_relu_args(x, d, negative_slope, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _vn_leaky_relu_backward_fake(grad_out, x, d, negative_slope, eps, output_mask):
    check_vn_leaky_relu_backward_args(grad_out, x, d, negative_slope, eps)
    grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
    grad_d = x.new_empty(d.shape if output_mask[1] else (0,))
    return grad_x, grad_d


def _vn_leaky_relu_setup_context(ctx, inputs, output):
    # Only x and d are saved: the backward recomputes <x, d> and |d|^2 (the point of fusing).
    x, d, negative_slope, eps = inputs
    ctx.save_for_backward(x, d)
    ctx.negative_slope = negative_slope
    ctx.eps = eps


def make_vn_leaky_relu_backward(backward_op):
    """Autograd formula of vn_leaky_relu in terms of a fused backward op (no double backward)."""
    def backward(ctx, grad_out):
        x, d = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        if not any(mask):
            return None, None, None, None
        grad_x, grad_d = backward_op(grad_out.contiguous(), x, d, ctx.negative_slope, ctx.eps, mask)
        return (grad_x if mask[0] else None, grad_d if mask[1] else None, None, None)
    return backward


def register_vn_leaky_relu_op(qualname: str, backward_qualname: str):
    register_op_formulas(qualname, fake=_vn_leaky_relu_fake,
                         backward=make_vn_leaky_relu_backward(dispatcher_op(backward_qualname)),
                         setup_context=_vn_leaky_relu_setup_context, autocast=AUTOCAST_FP32,
                         backward_qualname=backward_qualname, backward_fake=_vn_leaky_relu_backward_fake)
