"""Public functions: shapes documented, backend chosen here, autograd through torch.library ops."""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import _ops
from .backend import resolve_backend
from .reference import relaxed_linear_ref

__all__ = ["InputStats", "relaxed_linear"]


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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    _ops.check_relaxed_linear_args(x2, M, c)
    op = _raw_relaxed_linear(resolve_backend(x.device, backend))
    y, G, s = op(x2, M, c, stats)
    y = y.reshape(*lead, M.shape[0])
    if not stats:
        return y
    return y, InputStats(G, s, math.prod(lead))
