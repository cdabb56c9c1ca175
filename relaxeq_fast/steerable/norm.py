"""Field batch norm (equivariant for any field type)."""
from __future__ import annotations

import torch
import torch.nn as nn

from .fields import FieldType, _check_field_input, _field_index, _is_norm_field

__all__ = ["FieldBatchNorm"]


class FieldBatchNorm(nn.Module):
    """Batch norm per field, x [B, C, H, W] → same; equivariant for any field type.

    Trivial and regular fields: mean and variance shared by the field's channels (over batch, pixels
    and the N channels of a regular field — a permutation of them leaves the statistics unchanged),
    affine scale and bias per field. Irreps: no centring (a mean vector is not invariant); the field is
    divided by √(E‖f‖²/d + ε), scale per field, no bias. Eval mode uses running statistics (unbiased
    variance for centred fields). ``stats_reducer`` (set by :func:`relaxeq_fast.distributed.sync_batch_norms`)
    combines the per-rank moments into those of the global batch.
    """

    def __init__(self, ftype: FieldType, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(ftype, FieldType):
            raise TypeError(f"ftype must be a FieldType, got {type(ftype).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.ftype, self.eps, self.momentum = ftype, eps, momentum
        n_fields = len(ftype.fields)
        centred = torch.tensor([not _is_norm_field(f) for f in ftype.fields])
        self.register_buffer("field_of", _field_index(ftype).to(device), persistent=False)
        self.register_buffer("centred", centred.to(device), persistent=False)
        self.register_buffer("field_dims", torch.tensor(ftype.dims, device=device), persistent=False)
        self.register_buffer("centred_index", torch.nonzero(centred).flatten().to(device), persistent=False)
        self.weight = nn.Parameter(torch.ones(n_fields, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(int(centred.sum()), **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(n_fields, **factory))
        self.register_buffer("running_var", torch.ones(n_fields, **factory))
        self.stats_reducer = None

    def _field_mean(self, per_channel: torch.Tensor) -> torch.Tensor:
        """Mean over each field's channels of a per-channel vector [C] → [F]."""
        total = per_channel.new_zeros(len(self.ftype.fields)).index_add(0, self.field_of, per_channel)
        return total / self.field_dims.to(per_channel.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, ftype.dim, H, W] → same shape (batch statistics in training mode, running ones in eval)."""
        _check_field_input(x, self.ftype, type(self).__name__)
        if self.training:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n * min(self.ftype.dims, default=1) < 2:
                raise ValueError(f"FieldBatchNorm: x {list(x.shape)} has one value per channel; batch norm "
                                 "needs at least 2 in training mode")
            mean = self._field_mean(x.mean((0, 2, 3))) * self.centred.to(x.dtype)
            xc = x - mean[self.field_of].view(1, -1, 1, 1)
            var = self._field_mean(xc.square().mean((0, 2, 3)))
            if self.stats_reducer is not None:
                mean, var, n = self.stats_reducer(mean, var, n)
                xc = x - mean[self.field_of].view(1, -1, 1, 1)
            with torch.no_grad():
                count = (n * self.field_dims).to(x.dtype)
                unbiased = torch.where(self.centred, count / (count - 1).clamp_min(1), torch.ones_like(count))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
            xc = x - mean[self.field_of].view(1, -1, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = xc * scale[self.field_of].view(1, -1, 1, 1)
        if self.bias is not None:
            shift = self.bias.new_zeros(len(self.ftype.fields)).index_put((self.centred_index,), self.bias)
            y = y + shift[self.field_of].view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        """Fields, dim, eps and momentum, for ``repr``."""
        return f"fields={len(self.ftype.fields)}, dim={self.ftype.dim}, eps={self.eps}, momentum={self.momentum}"
