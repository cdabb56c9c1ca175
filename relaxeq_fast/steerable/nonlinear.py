"""Field nonlinearities: pointwise on trivial / regular fields, norm nonlinearity on irreps."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fields import FieldType, _check_field_input, _field_index, _is_norm_field

__all__ = ["FieldNonLinearity"]


class FieldNonLinearity(nn.Module):
    """ReLU on trivial and regular fields (pointwise: commutes with channel permutations); on irreps the
    norm nonlinearity f ↦ ReLU(‖f‖ + b) f / ‖f‖ with a learned bias b per irrep field (init 0).
    x [B, ftype.dim, H, W] → same shape."""

    def __init__(self, ftype: FieldType, norm_eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        if not isinstance(ftype, FieldType):
            raise TypeError(f"ftype must be a FieldType, got {type(ftype).__name__}")
        self.ftype, self.norm_eps = ftype, norm_eps
        norm_fields = [i for i, f in enumerate(ftype.fields) if _is_norm_field(f)]
        self.register_buffer("field_of", _field_index(ftype).to(device), persistent=False)
        pointwise = torch.tensor([not _is_norm_field(ftype.fields[i]) for i in _field_index(ftype).tolist()],
                                 dtype=torch.bool)
        self.register_buffer("pointwise", pointwise.view(1, -1, 1, 1).to(device), persistent=False)
        self.register_buffer("norm_index", torch.tensor(norm_fields, dtype=torch.long, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(norm_fields), device=device, dtype=dtype)) if norm_fields else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ftype.dim, H, W] → same shape."""
        _check_field_input(x, self.ftype, type(self).__name__)
        if self.bias is None:
            return torch.relu(x)
        n_fields = len(self.ftype.fields)
        sq = x.new_zeros(x.shape[0], n_fields, *x.shape[2:]).index_add(1, self.field_of, x.square())
        norm = sq.clamp_min(self.norm_eps ** 2).sqrt()
        b = self.bias.new_zeros(n_fields).index_put((self.norm_index,), self.bias).view(1, -1, 1, 1)
        gate = (torch.relu(norm + b) / norm)[:, self.field_of]
        return torch.where(self.pointwise, torch.relu(x), x * gate)
