"""relaxation_regularizer: W_r [L, D_out, D_in], b_r [L, D_out] or None, G [L, D_in, D_in], s [L, D_in],
rows [L, n, D_in] or None; irreps as flat (mul, l) pairs; generators[l]: [3, 2l+1, 2l+1]

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from .autocast import AUTOCAST_FP32
from .registration import dispatcher_op, register_op_formulas

__all__ = ["check_relaxation_regularizer_args", "make_relaxation_regularizer_backward",
           "register_relaxation_regularizer_op"]


def check_relaxation_regularizer_args(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators,
                                      op="relaxation_regularizer"):
    """Argument checks of the fake kernels (mirrors csrc/relaxation_regularizer.cpp)."""
    for name, t in (("W_r", W_r), ("G", G), ("s", s)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if len(irreps_in) % 2 or len(irreps_out) % 2:
        raise ValueError(f"{op}: irreps_in and irreps_out must be flat (mul, l) pairs")
    d_in = sum(m * (2 * l + 1) for m, l in zip(irreps_in[::2], irreps_in[1::2]))
    d_out = sum(m * (2 * l + 1) for m, l in zip(irreps_out[::2], irreps_out[1::2]))
    max_l = max(list(irreps_in[1::2]) + list(irreps_out[1::2]))
    if len(generators) <= max_l:
        raise ValueError(f"{op}: generators must hold the generators of every degree up to {max_l}, "
                         f"got {len(generators)}")
    if W_r.dim() != 3 or tuple(W_r.shape[1:]) != (d_out, d_in):
        raise ValueError(f"{op}: W_r must be [L, D_out, D_in] = [L, {d_out}, {d_in}], got {list(W_r.shape)}")
    L = W_r.shape[0]
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: G must be float32 or float64, got {G.dtype}")
    if tuple(G.shape) != (L, d_in, d_in):
        raise ValueError(f"{op}: G must be [L, D_in, D_in] = [{L}, {d_in}, {d_in}], got {list(G.shape)}")
    if tuple(s.shape) != (L, d_in) or s.dtype != G.dtype:
        raise ValueError(f"{op}: s must be [L, D_in] = [{L}, {d_in}] in G's dtype, got {list(s.shape)} {s.dtype}")
    if b_r is not None and (tuple(b_r.shape) != (L, d_out) or b_r.dtype != W_r.dtype):
        raise ValueError(f"{op}: b_r must be [L, D_out] = [{L}, {d_out}] in W_r's dtype, got {list(b_r.shape)}")
    if rows is not None and tuple(rows.shape) != (L, n, d_in):
        raise ValueError(f"{op}: rows must be [L, n, D_in] = [{L}, {n}, {d_in}], got {list(rows.shape)}")


def _relaxation_regularizer_fake(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators):
    check_relaxation_regularizer_args(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators)
    L = W_r.shape[0]
    grad_b = (L, W_r.shape[1]) if b_r is not None else (0,)
    return (G.new_empty((L,)), G.new_empty((L,)), G.new_empty(W_r.shape), G.new_empty(W_r.shape),
            G.new_empty(grad_b), G.new_empty(grad_b))


def _relaxation_regularizer_backward_fake(grad_ld, grad_n, W_r, grad_W_ld, grad_W_n, grad_b_ld, grad_b_n,
                                          output_mask):
    return (W_r.new_empty(W_r.shape if output_mask[0] else (0,)),
            W_r.new_empty(grad_b_ld.shape if output_mask[1] and grad_b_ld.numel() else (0,)))


def _relaxation_regularizer_setup_context(ctx, inputs, output):
    W_r, b_r = inputs[0], inputs[1]
    _r_ld, _r_n, *unit_grads = output
    ctx.mark_non_differentiable(*unit_grads)
    ctx.set_materialize_grads(False)  # no zero tensors for the unit gradients' (unused) gradients
    ctx.save_for_backward(W_r, *unit_grads)
    ctx.has_bias = b_r is not None
    ctx.n_generators = len(inputs[8])


def make_relaxation_regularizer_backward(backward_op):
    """Gradients reach W_r and b_r only (G, s and the rows are statistics of the detached input): the
    forward's unit gradients scaled by the upstream ones."""
    def backward(ctx, grad_ld, grad_n, *_unit_grad_grads):
        W_r, *unit_grads = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1]]
        none_for_the_rest = (None,) * 6 + ([None] * ctx.n_generators,)  # the structure of the inputs
        if not any(mask):
            return (None, None) + none_for_the_rest
        L = W_r.shape[0]
        grad_ld = unit_grads[0].new_zeros(L) if grad_ld is None else grad_ld
        grad_n = unit_grads[0].new_zeros(L) if grad_n is None else grad_n
        dW, db = backward_op(grad_ld, grad_n, W_r, *unit_grads, mask)
        return (dW if mask[0] else None, db if mask[1] else None) + none_for_the_rest
    return backward


def register_relaxation_regularizer_op(qualname: str, backward_qualname: str):
    """Fake kernels and autograd for one backend's relaxation_regularizer (native or Triton)."""
    register_op_formulas(qualname, fake=_relaxation_regularizer_fake,
                         backward=make_relaxation_regularizer_backward(dispatcher_op(backward_qualname)),
                         setup_context=_relaxation_regularizer_setup_context, autocast=AUTOCAST_FP32,
                         backward_qualname=backward_qualname, backward_fake=_relaxation_regularizer_backward_fake)
