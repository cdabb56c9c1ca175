"""Group pooling, spatial pooling, the invariant head and the quarter-turn invariance certificate."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fields import FieldType, _check_field_input, _is_norm_field

__all__ = ["GroupPool", "InvariantPool", "SpatialPool2d", "rot90_equivariance_error"]


class GroupPool(nn.Module):
    """Invariant per field: max over a regular field's N channels, ‖f‖ of an irrep, a trivial field as is.
    x [B, in_type.dim, H, W] → [B, n_fields, H, W] (``out_type``: trivial fields)."""

    def __init__(self, in_type: FieldType):
        super().__init__()
        if not isinstance(in_type, FieldType):
            raise TypeError(f"in_type must be a FieldType, got {type(in_type).__name__}")
        self.in_type = in_type
        self.out_type = FieldType.trivial(in_type.group, len(in_type.fields))
        kinds = {f for f in in_type.fields}
        self._uniform_regular = len(kinds) == 1 and next(iter(kinds))[0] == "regular"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_type.dim, H, W] → [B, n_fields, H, W]."""
        _check_field_input(x, self.in_type, type(self).__name__)
        if self._uniform_regular:
            return x.unflatten(1, (len(self.in_type.fields), self.in_type.dims[0])).amax(2)
        outs = []
        for f, o, d in zip(self.in_type.fields, self.in_type.offsets(), self.in_type.dims):
            part = x[:, o:o + d]
            outs.append(part.amax(1, keepdim=True) if f[0] == "regular" else
                        part if f[0] == "trivial" else part.norm(dim=1, keepdim=True))
        return torch.cat(outs, 1)


class SpatialPool2d(nn.Module):
    """Spatial max / average pooling per channel that keeps exact 90° symmetry.

    Pooling acts per channel, so it commutes with the fibre action of trivial and regular fields
    (permutations); max pooling of irrep components would not, so mode "max" rejects irreps ("avg"
    is linear and fine). The windows must tile the image symmetrically: (H − k) % s == 0 and
    (W − k) % s == 0, otherwise the dropped border is on one side only and a rotated input is pooled
    on other windows — an error, not a silent approximation.

    x [B, in_type.dim, H, W] → [B, in_type.dim, (H − k) / s + 1, (W − k) / s + 1] (k = ``kernel_size``,
    s = ``stride``, default k).
    """

    def __init__(self, in_type: FieldType, kernel_size: int = 2, stride: Optional[int] = None, mode: str = "max"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        if mode == "max" and any(_is_norm_field(f) for f in in_type.fields):
            raise ValueError("mode='max' is not equivariant for irrep fields (it mixes components); use mode='avg'")
        self.in_type, self.kernel_size, self.stride, self.mode = in_type, kernel_size, stride or kernel_size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_type.dim, H, W] → [B, in_type.dim, (H − k) / s + 1, (W − k) / s + 1]."""
        _check_field_input(x, self.in_type, type(self).__name__)
        k, s = self.kernel_size, self.stride
        H, W = x.shape[-2:]
        if H < k or W < k or (H - k) % s or (W - k) % s:
            raise ValueError(f"SpatialPool2d: x is {H}×{W}; pooling {k}×{k} with stride {s} needs (H − {k}) and "
                             f"(W − {k}) divisible by {s}, or the dropped border breaks the rotation symmetry")
        pool = F.max_pool2d if self.mode == "max" else F.avg_pool2d
        return pool(x, k, s)

    def extra_repr(self) -> str:
        """Kernel size, stride and mode, for ``repr``."""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode}"


class InvariantPool(nn.Module):
    """The invariant head's input: :class:`GroupPool`, then max (or mean) over all pixels.
    x [B, in_type.dim, H, W] → [B, n_fields], invariant to every rotation that maps the grid onto itself."""

    def __init__(self, in_type: FieldType, spatial: str = "max"):
        super().__init__()
        if spatial not in ("max", "mean"):
            raise ValueError(f"spatial must be 'max' or 'mean', got {spatial!r}")
        self.group_pool, self.spatial = GroupPool(in_type), spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_type.dim, H, W] → [B, n_fields]."""
        x = self.group_pool(x)
        return x.amax((2, 3)) if self.spatial == "max" else x.mean((2, 3))


@torch.no_grad()
def rot90_equivariance_error(model: nn.Module, images: torch.Tensor) -> float:
    """Worst relative error ‖f(rot90(x, k)) − f(x)‖ / ‖f(x)‖ over k = 1, 2, 3 for an invariant image model.

    images: [B, C, H, W] with trivial channels (H = W). Quarter turns are exact pixel permutations, so a
    C_N model with 4 | N (or SO(2)) is invariant to them up to rounding: the certificate for image
    models. The model is evaluated as it is (call ``model.eval()`` first).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square [B, C, H, H], got "
                         f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    base = model(images)
    denom = base.norm().clamp_min(torch.finfo(base.dtype).tiny)
    return max(((model(torch.rot90(images, k, dims=(-2, -1))) - base).norm() / denom).item() for k in (1, 2, 3))
