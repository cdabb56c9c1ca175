"""relaxed_linear: argument checks, fake and autograd formulas (shared by the native and Triton ops)."""
from __future__ import annotations

import torch

from ..reference import stats_dtype
from .autocast import AUTOCAST_LOWER
from .registration import dispatcher_op, register_op_formulas
from .checks import check_matches_x

__all__ = ["check_relaxed_linear_args", "check_relaxed_linear_backward_args", "make_backward",
           "register_relaxed_linear_op"]


def check_relaxed_linear_args(x, M, c, op="relaxed_linear"):
    """Argument checks shared by the functional layer, the Triton op and the fake kernels
    (mirrors csrc/relaxed_linear.h, which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("M", M)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, D_in], got {x.dim()}-D with shape {list(x.shape)}")
    if M.dim() != 2:
        raise ValueError(f"{op}: M must be 2-D [D_out, D_in], got {M.dim()}-D with shape {list(M.shape)}")
    if x.shape[1] != M.shape[1]:
        raise ValueError(f"{op}: x must have shape [N, D_in] with D_in = M.shape[1] = {M.shape[1]}, "
                         f"got {list(x.shape)}")
    check_matches_x(M, "M", x, op)
    if c is not None:
        if c.dim() != 1 or c.shape[0] != M.shape[0]:
            raise ValueError(f"{op}: c must have shape [D_out] with D_out = M.shape[0] = {M.shape[0]}, "
                             f"got {list(c.shape)}")
        check_matches_x(c, "c", x, op)


def check_relaxed_linear_backward_args(dy, x, M, op="relaxed_linear_backward"):
    check_relaxed_linear_args(x, M, None, op=op)
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{op}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if dy.dim() != 2 or dy.shape[0] != x.shape[0] or dy.shape[1] != M.shape[0]:
        raise ValueError(f"{op}: dy must have shape [N, D_out] = [{x.shape[0]}, {M.shape[0]}], "
                         f"got {list(dy.shape)}")
    check_matches_x(dy, "dy", x, op)


def _relaxed_linear_fake(x, M, c, stats):
    check_relaxed_linear_args(x, M, c)
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    sdt = stats_dtype(x.dtype)
    y = x.new_empty((n, d_out))
    G = x.new_empty((d_in, d_in) if stats else (0, 0), dtype=sdt)
    s = x.new_empty((d_in,) if stats else (0,), dtype=sdt)
    return y, G, s


def _relaxed_linear_backward_fake(dy, x, M, output_mask):
    check_relaxed_linear_backward_args(dy, x, M)
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    dx = x.new_empty((n, d_in) if output_mask[0] else (0,))
    dM = x.new_empty((d_out, d_in) if output_mask[1] else (0,))
    dc = x.new_empty((d_out,) if output_mask[2] else (0,))
    return dx, dM, dc


def _setup_context(ctx, inputs, output):
    x, M, c, _stats = inputs
    _y, G, s = output
    ctx.mark_non_differentiable(G, s)  # statistics of the detached input x̂
    ctx.save_for_backward(x, M)
    ctx.has_c = c is not None


def make_backward(backward_op):
    """Autograd formula of y = x Mᵀ + c in terms of a fused backward op; G and s carry no gradient."""
    def backward(ctx, dy, _dG, _ds):
        x, M = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_c and ctx.needs_input_grad[2]]
        if not any(mask):
            return None, None, None, None
        dx, dM, dc = backward_op(dy.contiguous(), x, M, mask)
        return (dx if mask[0] else None, dM if mask[1] else None, dc if mask[2] else None, None)
    return backward


def register_relaxed_linear_op(qualname: str, backward_qualname: str):
    register_op_formulas(qualname, fake=_relaxed_linear_fake, backward=make_backward(dispatcher_op(backward_qualname)),
                         setup_context=_setup_context, autocast=AUTOCAST_LOWER,
                         backward_qualname=backward_qualname, backward_fake=_relaxed_linear_backward_fake)
