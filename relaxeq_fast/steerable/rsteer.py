"""RSteer's relaxed steerable convolution (Wang, Walters & Yu, ICML 2022) and its relaxed twin.

RSteer keeps the steerable kernel basis {K_b} but lets each coefficient vary over the kernel's positions p:

    K(p) = Σ_b w_b(p) K_b(p)          w [n_basis, k, k]   (an R2Conv has one w_b for every p)

With w_b(p) = w_b for every p the kernel is the exact steerable one; a penalty on the differences of w
between neighbouring positions (:meth:`RSteerConv.coefficient_penalty`) pulls the layer towards it, so the
model is approximately equivariant: it can learn how far the data break the symmetry. The public code
(``models/model_rotation.py``, ``Relaxed_Rot_SteerConv``) penalises ``mean |w[..., :-1] − w[..., 1:]|`` over
the positions flattened row-major (which also pairs the end of one row with the start of the next); ours
takes the mean absolute difference over horizontal and vertical neighbours on the k × k grid. Its bias is free
per channel; ours is the equivariant bias of R2Conv, so that equal coefficients give exactly R2Conv.

:class:`RelaxedRSteerConv` adds the relaxation paper's θ·B branch on top (kernel K_RSteer + θ B, one
``relaxed_conv2d`` call with the defect regulariser of B), and projects back to RSteerConv.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .conv import R2Conv, RelaxedR2Conv
from .fields import FieldType

__all__ = ["RSteerConv", "RelaxedRSteerConv"]


class RSteerConv(R2Conv):
    """R2Conv whose basis coefficients vary over the kernel positions: ``weight`` [n_basis, k, k].

    Init: each position's coefficients drawn independently with R2Conv's variance (RSteer draws them
    independently per position too), so E‖K‖² is R2Conv's. :meth:`from_r2conv` starts from an exact kernel
    instead (the coefficients repeated over the positions).

    Shapes: x [B, in_type.dim, H, W] → [B, out_type.dim, H', W'] as R2Conv.
    """

    def __init__(self, in_type: FieldType, out_type: FieldType, kernel_size: int, padding: Optional[int] = None,
                 bias: bool = True, max_frequency: Optional[int] = None, device=None, dtype=None):
        super().__init__(in_type, out_type, kernel_size, padding, bias, max_frequency, device=device, dtype=dtype)
        k, n = self.kernel_size, self.n_basis
        std = math.sqrt(out_type.dim / n) if n > 0 else 0.0
        self.weight = nn.Parameter(torch.randn(n, k, k, device=self.weight.device, dtype=self.weight.dtype) * std)

    @classmethod
    def from_r2conv(cls, layer: R2Conv) -> "RSteerConv":
        """An RSteerConv computing exactly ``layer`` (its coefficients at every position, its bias)."""
        out = cls(layer.in_type, layer.out_type, layer.kernel_size, layer.padding, bias=layer.bias is not None,
                  max_frequency=layer.max_frequency, device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(layer.weight[:, None, None].expand_as(out.weight))
            if layer.bias is not None:
                out.bias.copy_(layer.bias)
        return out.train(layer.training)

    def coefficient_penalty(self) -> torch.Tensor:
        """Mean |w_b(p) − w_b(p')| over horizontally and vertically neighbouring kernel positions p, p' (0-d);
        0 exactly when every coefficient is the same at every position (the exact steerable kernel)."""
        w = self.weight
        if w.numel() == 0 or self.kernel_size == 1:
            return w.new_zeros(())
        horizontal = (w[:, :, 1:] - w[:, :, :-1]).abs()
        vertical = (w[:, 1:, :] - w[:, :-1, :]).abs()
        return (horizontal.sum() + vertical.sum()) / (horizontal.numel() + vertical.numel())


class RelaxedRSteerConv(RelaxedR2Conv, RSteerConv):
    """RSteerConv plus the relaxation branch: kernel ``K_RSteer + θ B`` (B free), computed, with the data-mode
    defect regulariser of B, in one ``relaxed_conv2d`` call, exactly as :class:`RelaxedR2Conv` (whose
    arguments it takes). :meth:`project` returns the RSteerConv ("nearest" adds θ·P_eq(B)'s coefficients at
    every position)."""

    plain_class = RSteerConv
