"""relaxed_params: weight [C_out, C_in], weight_relax [C_out d, C_in d], bias / bias_relax [C_out d] or None,
theta 0-d -> M [C_out d, C_in d], c [C_out d] ([0] without biases)

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from .autocast import AUTOCAST_FP32
from .registration import dispatcher_op, register_op_formulas

__all__ = ["check_relaxed_params_args", "make_relaxed_params_backward", "register_relaxed_params_op"]


def check_relaxed_params_args(weight, weight_relax, bias, bias_relax, theta, op="relaxed_params") -> int:
    """Argument checks of the fake kernel and the functional wrapper (mirror csrc/relaxed_params.cpp);
    returns d."""
    for name, t in (("weight", weight), ("weight_relax", weight_relax), ("theta", theta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"{op}: weight must be [C_out, C_in] with C_out, C_in > 0, got {list(weight.shape)}")
    c_out, c_in = weight.shape
    d = weight_relax.shape[1] // c_in if weight_relax.dim() == 2 else 0
    if weight_relax.dim() != 2 or d < 1 or tuple(weight_relax.shape) != (c_out * d, c_in * d):
        raise ValueError(f"{op}: weight_relax must be [C_out d, C_in d] = [{c_out} d, {c_in} d] for weight "
                         f"{list(weight.shape)}, got {list(weight_relax.shape)}")
    if weight_relax.dtype != weight.dtype or weight_relax.device != weight.device:
        raise ValueError(f"{op}: weight_relax must have weight's dtype and device ({weight.dtype}, {weight.device}), "
                         f"got {weight_relax.dtype}, {weight_relax.device}")
    if theta.dim() != 0 or theta.dtype != weight.dtype or theta.device != weight.device:
        raise ValueError(f"{op}: theta must be a 0-d tensor in weight's dtype and device, got shape "
                         f"{list(theta.shape)} {theta.dtype} on {theta.device}")
    for name, b in (("bias", bias), ("bias_relax", bias_relax)):
        if b is not None and (b.dim() != 1 or b.shape[0] != c_out * d or b.dtype != weight.dtype
                              or b.device != weight.device):
            raise ValueError(f"{op}: {name} must be [C_out d] = [{c_out * d}] in weight's dtype and device, got "
                             f"{list(b.shape)} {b.dtype} on {b.device}")
    return d


def _relaxed_params_fake(weight, weight_relax, bias, bias_relax, theta):
    check_relaxed_params_args(weight, weight_relax, bias, bias_relax, theta)
    c_len = weight_relax.shape[0] if bias is not None or bias_relax is not None else 0
    return torch.empty_like(weight_relax, memory_format=torch.contiguous_format), weight.new_empty((c_len,))


def _relaxed_params_backward_fake(grad_M, grad_c, weight, weight_relax, bias_relax, theta, output_mask):
    n = grad_M.shape[0]
    return (weight.new_empty(weight.shape if output_mask[0] else (0,)),
            weight.new_empty(grad_M.shape if output_mask[1] else (0,)),
            weight.new_empty((n,) if output_mask[2] else (0,)),
            weight.new_empty((n,) if output_mask[3] else (0,)),
            weight.new_empty(() if output_mask[4] else (0,)))


def _relaxed_params_setup_context(ctx, inputs, output):
    weight, weight_relax, bias, bias_relax, theta = inputs
    ctx.save_for_backward(weight, weight_relax, bias_relax, theta)
    ctx.has_bias = (bias is not None, bias_relax is not None)


def make_relaxed_params_backward(backward_op):
    """Gradients of weight, weight_relax, the biases and θ (dθ = ⟨dM, W_r⟩ + ⟨dc, b_r⟩: a learned θ; a scheduled θ
    is a buffer and asks for none)."""
    def backward(ctx, grad_M, grad_c):
        weight, weight_relax, bias_relax, theta = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias[0] and ctx.needs_input_grad[2],
                ctx.has_bias[1] and ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        if not any(mask):
            return None, None, None, None, None
        if grad_M is None:  # only c was used
            grad_M = torch.zeros_like(weight_relax, memory_format=torch.contiguous_format)
        grad_c = weight.new_empty((0,)) if grad_c is None else grad_c
        grads = backward_op(grad_M, grad_c, weight, weight_relax, bias_relax, theta, mask)
        return tuple(g if m else None for g, m in zip(grads, mask))
    return backward


def register_relaxed_params_op(qualname: str, backward_qualname: str):
    """Fake kernels, autograd and autocast of relaxed_params (written once in ATen calls, CPU and CUDA)."""
    register_op_formulas(qualname, fake=_relaxed_params_fake,
                         backward=make_relaxed_params_backward(dispatcher_op(backward_qualname)),
                         setup_context=_relaxed_params_setup_context, autocast=AUTOCAST_FP32,
                         backward_qualname=backward_qualname, backward_fake=_relaxed_params_backward_fake)
