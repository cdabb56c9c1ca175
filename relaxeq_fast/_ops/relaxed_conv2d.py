"""relaxed_conv2d: x [B, C_in, H, W], M [C_out, C_in, k, k], c [C_out] or None,
D [C_d, C_in, k, k] or None (the defect kernel), zero padding on every side

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from ..reference import stats_dtype
from .autocast import AUTOCAST_LOWER
from .registration import dispatcher_op, register_op_formulas
from .checks import check_matches_x

__all__ = ["check_relaxed_conv2d_args", "conv2d_out_shape", "check_relaxed_conv2d_backward_args",
           "make_relaxed_conv2d_backward", "register_relaxed_conv2d_op"]


def check_relaxed_conv2d_args(x, M, c, D, padding, op="relaxed_conv2d"):
    """Argument checks shared by the functional layer, the Triton op and the fake kernels
    (mirrors csrc/relaxed_conv2d.h, which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("M", M)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, C_in, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    if M.dim() != 4:
        raise ValueError(f"{op}: M must be 4-D [C_out, C_in, k, k], got {M.dim()}-D with shape {list(M.shape)}")
    if M.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: M must have shape [C_out, C_in, k, k] with C_in = x.shape[1] = {x.shape[1]}, "
                         f"got {list(M.shape)}")
    if M.shape[2] != M.shape[3]:
        raise ValueError(f"{op}: M must have a square k x k kernel, got {list(M.shape)}")
    check_matches_x(M, "M", x, op)
    if c is not None:
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != M.shape[0]:
            raise ValueError(f"{op}: c must have shape [C_out] with C_out = M.shape[0] = {M.shape[0]}, got "
                             f"{list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        check_matches_x(c, "c", x, op)
    if D is not None:
        if not isinstance(D, torch.Tensor) or D.dim() != 4 or D.shape[1:] != M.shape[1:]:
            raise ValueError(f"{op}: D must have shape [C_d, C_in, k, k] = [C_d, {M.shape[1]}, {M.shape[2]}, "
                             f"{M.shape[3]}] (the C_in and k of M), got "
                             f"{list(D.shape) if isinstance(D, torch.Tensor) else type(D).__name__}")
        check_matches_x(D, "D", x, op)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op}: padding must be an int >= 0, got {padding!r}")
    k = M.shape[2]
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        raise ValueError(f"{op}: the {k}x{k} kernel does not fit x {list(x.shape)} with padding {padding}")


def conv2d_out_shape(x, M, padding):
    k = M.shape[2]
    return (x.shape[0], M.shape[0], x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1)


def check_relaxed_conv2d_backward_args(dy, x, M, padding, op="relaxed_conv2d_backward"):
    check_relaxed_conv2d_args(x, M, None, None, padding, op=op)
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{op}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if tuple(dy.shape) != conv2d_out_shape(x, M, padding):
        raise ValueError(f"{op}: dy must have shape [B, C_out, H', W'] = {list(conv2d_out_shape(x, M, padding))}, "
                         f"got {list(dy.shape)}")
    check_matches_x(dy, "dy", x, op)


def _relaxed_conv2d_fake(x, M, c, D, padding, need_S):
    check_relaxed_conv2d_args(x, M, c, D, padding)
    sdt = stats_dtype(x.dtype)
    y = x.new_empty(conv2d_out_shape(x, M, padding))
    r = x.new_empty(() if D is not None else (0,), dtype=sdt)
    S = x.new_empty(D.shape if D is not None and need_S else (0,), dtype=sdt)
    return y, r, S


def _relaxed_conv2d_backward_fake(dy, x, M, padding, output_mask):
    check_relaxed_conv2d_backward_args(dy, x, M, padding)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(M.shape if output_mask[1] else (0,)),
            x.new_empty((M.shape[0],) if output_mask[2] else (0,)))


def _relaxed_conv2d_setup_context(ctx, inputs, output):
    x, M, c, D, padding, need_S = inputs
    _y, r, S = output
    # S is internal to autograd (the weight gradient of z): no gradient flows into it.
    ctx.mark_non_differentiable(S)
    if D is None:
        ctx.mark_non_differentiable(r)  # the empty placeholder
    # r = <D, S> is quadratic in D, so dr/dD = 2 S exactly: S is saved instead of recomputing z.
    has_S = D is not None and need_S
    ctx.save_for_backward(x, M, S if has_S else None)
    ctx.has_c, ctx.has_D, ctx.has_S, ctx.padding = c is not None, D is not None, has_S, padding
    ctx.D_dtype = D.dtype if D is not None else None


def make_relaxed_conv2d_backward(backward_op):
    """Autograd formula: dy reaches x, M, c (through ``backward_op``); dr reaches D only, as
    dD = 2 dr S (r is a function of x̂ and D, quadratic in D)."""
    def backward(ctx, dy, dr, _dS):
        x, M, S = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], ctx.has_c and needs[2]]
        need_dD = ctx.has_D and needs[3]
        grads = [None, None, None]
        if any(mask):
            if dy is None:
                dy = x.new_zeros(conv2d_out_shape(x, M, ctx.padding))
            out = backward_op(dy.contiguous(), x, M, ctx.padding, mask)
            grads = [g if m else None for g, m in zip(out, mask)]
        dD = None
        if need_dD:
            if not ctx.has_S:
                raise RuntimeError("relaxed_conv2d: a gradient for D was requested, but the forward ran with "
                                   "need_S=False and did not compute S (dD = 2 dr S); call it with need_S=True "
                                   "when D requires grad")
            dD = (S * (2 * dr) if dr is not None else torch.zeros_like(S)).to(ctx.D_dtype)
        return (*grads, dD, None, None)
    return backward


def register_relaxed_conv2d_op(qualname: str, backward_qualname: str):
    register_op_formulas(qualname, fake=_relaxed_conv2d_fake,
                         backward=make_relaxed_conv2d_backward(dispatcher_op(backward_qualname)),
                         setup_context=_relaxed_conv2d_setup_context, autocast=AUTOCAST_LOWER,
                         backward_qualname=backward_qualname, backward_fake=_relaxed_conv2d_backward_fake)
