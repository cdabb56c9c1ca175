"""relaxed_conv_params: kernel, weight_relax [O, I, k, k], theta 0-d, defect_out [O, O], defect_in [I, I],
defect_spatial [k², k²] -> M [O, I, k, k], D [O, I, k, k] ([0] unless need_defect)

Argument checks, fake and autograd formulas, shared by the native and Triton ops.
"""
from __future__ import annotations

import torch

from .autocast import AUTOCAST_FP32
from .registration import dispatcher_op, register_op_formulas

__all__ = ["check_relaxed_conv_params_args", "make_relaxed_conv_params_backward", "register_relaxed_conv_params_op"]


def check_relaxed_conv_params_args(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                   op="relaxed_conv_params") -> None:
    """Argument checks of the fake kernel and the functional wrapper (mirror csrc/relaxed_conv_params.cpp)."""
    for name, t in (("kernel", kernel), ("weight_relax", weight_relax), ("theta", theta), ("defect_out", defect_out),
                    ("defect_in", defect_in), ("defect_spatial", defect_spatial)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight_relax.dim() != 4 or weight_relax.shape[2] != weight_relax.shape[3]:
        raise ValueError(f"{op}: weight_relax must be [O, I, k, k], got {list(weight_relax.shape)}")
    like = (weight_relax.dtype, weight_relax.device)
    if kernel.shape != weight_relax.shape or (kernel.dtype, kernel.device) != like:
        raise ValueError(f"{op}: kernel must have weight_relax's shape, dtype and device ({list(weight_relax.shape)}, "
                         f"{like[0]}, {like[1]}), got {list(kernel.shape)}, {kernel.dtype}, {kernel.device}")
    if theta.dim() != 0 or (theta.dtype, theta.device) != like:
        raise ValueError(f"{op}: theta must be a 0-d tensor in weight_relax's dtype and device, got shape "
                         f"{list(theta.shape)} {theta.dtype} on {theta.device}")
    O, I, k, _ = weight_relax.shape
    for name, t, n in (("defect_out", defect_out, O), ("defect_in", defect_in, I), ("defect_spatial", defect_spatial, k * k)):
        if tuple(t.shape) != (n, n) or (t.dtype, t.device) != like:
            raise ValueError(f"{op}: {name} must be [{n}, {n}] in weight_relax's dtype and device ({like[0]}, "
                             f"{like[1]}), got {list(t.shape)} {t.dtype} on {t.device}")


def _relaxed_conv_params_fake(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial, rotation_step,
                              need_defect):
    check_relaxed_conv_params_args(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial)
    return (torch.empty_like(weight_relax, memory_format=torch.contiguous_format),
            weight_relax.new_empty(weight_relax.shape if need_defect else (0,)))


def _relaxed_conv_params_backward_fake(grad_M, grad_D, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                       rotation_step, output_mask):
    return (weight_relax.new_empty(weight_relax.shape if output_mask[0] else (0,)),
            weight_relax.new_empty(() if output_mask[1] else (0,)))


def _relaxed_conv_params_setup_context(ctx, inputs, output):
    _kernel, weight_relax, theta, defect_out, defect_in, defect_spatial, rotation_step, _need = inputs
    ctx.save_for_backward(weight_relax, theta, defect_out, defect_in, defect_spatial)
    ctx.rotation_step = rotation_step


def make_relaxed_conv_params_backward(backward_op):
    """dkernel = dM; dB = θ dM + Dᵀ(dD) and dθ = ⟨dM, B⟩ from the backward op (dθ for a learned θ only; the
    defect matrices are constants)."""
    def backward(ctx, grad_M, grad_D):
        weight_relax, theta, defect_out, defect_in, defect_spatial = ctx.saved_tensors
        mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if grad_M is None:  # only D was used
            grad_M = torch.zeros_like(weight_relax, memory_format=torch.contiguous_format)
        grad_B = grad_theta = None
        if any(mask):
            grad_D = weight_relax.new_empty((0,)) if grad_D is None or grad_D.numel() == 0 else grad_D
            grad_B, grad_theta = backward_op(grad_M, grad_D, weight_relax, theta, defect_out, defect_in,
                                             defect_spatial, ctx.rotation_step, mask)
        return ((grad_M if ctx.needs_input_grad[0] else None), grad_B if mask[0] else None,
                grad_theta if mask[1] else None, None, None, None, None, None)
    return backward


def register_relaxed_conv_params_op(qualname: str, backward_qualname: str):
    """Fake kernels, autograd and autocast of relaxed_conv_params (written once in ATen calls, CPU and CUDA)."""
    register_op_formulas(qualname, fake=_relaxed_conv_params_fake,
                         backward=make_relaxed_conv_params_backward(dispatcher_op(backward_qualname)),
                         setup_context=_relaxed_conv_params_setup_context, autocast=AUTOCAST_FP32,
                         backward_qualname=backward_qualname, backward_fake=_relaxed_conv_params_backward_fake)
