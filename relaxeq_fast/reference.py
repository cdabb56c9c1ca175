"""Pure-PyTorch references: the ground truth for tests and the fallback without the extension.

Each ``<op>_ref`` has the signature of ``torch.ops.relaxeq.<op>`` and works in any dtype
(float64 in tests).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = ["relaxed_linear_ref", "relaxed_linear_backward_ref", "stats_dtype"]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Input statistics are accumulated in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def relaxed_linear_ref(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor], stats: bool):
    """y = x Mᵀ + c and, when ``stats``, G = x̂ᵀx̂, s = Σ_n x̂_n (x̂ = x detached).

    x: [N, D_in], M: [D_out, D_in], c: [D_out] or None
    → y: [N, D_out], G: [D_in, D_in] (or [0, 0]), s: [D_in] (or [0]); G, s in ``stats_dtype``.
    """
    y = x @ M.T
    if c is not None:
        y = y + c
    sdt = stats_dtype(x.dtype)
    if stats:
        xs = x.detach().to(sdt)
        G, s = xs.T @ xs, xs.sum(0)
    else:
        G, s = x.new_empty((0, 0), dtype=sdt), x.new_empty((0,), dtype=sdt)
    return y, G, s


def relaxed_linear_backward_ref(dy: torch.Tensor, x: torch.Tensor, M: torch.Tensor,
                                output_mask: Sequence[bool]):
    """dx = dy M, dM = dyᵀ x, dc = Σ_n dy_n; an output not asked for is an empty [0] tensor."""
    empty = x.new_empty((0,))
    dx = dy @ M if output_mask[0] else empty
    dM = dy.T @ x if output_mask[1] else empty
    dc = dy.sum(0) if output_mask[2] else empty
    return dx, dM, dc
