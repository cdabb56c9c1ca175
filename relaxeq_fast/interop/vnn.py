"""Modules written in the public Vector-Neuron code's style (FlyingGiraffe/vnn: features [B, C, 3, N, ...], VNLinear
as an nn.Linear over channels) → our fused layers behind a layout adapter, recognised by structure (children and
attributes), not by class name; weights and batch-norm state are copied, outputs are identical.

Recognised: VNLinear (``map_to_feat``), VNBatchNorm (``bn``), VNLeakyReLU (``map_to_dir`` + ``negative_slope``),
VNMaxPool (``map_to_dir`` only), VNLinearLeakyReLU (``map_to_feat``, ``map_to_dir``, optional ``batchnorm``,
``negative_slope``), VNStdFeature (``vn1``, ``vn2``, ``vn_lin``, without frame normalisation).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import EquivariantLinear
from ..vn import VNBatchNorm, VNLeakyReLU, VNLinear, VNLinearLeakyReLU, VNMaxPool, VNStdFeature

__all__ = ["VNLayoutAdapter", "convert_module"]


class VNLayoutAdapter(nn.Module):
    """Runs one of our layers ([..., C, 3]) on features in the public layout [B, C, 3, N, ...]."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @staticmethod
    def to_ours(x: torch.Tensor) -> torch.Tensor:
        """Public layout [B, C, 3, N, ...] → ours [B, N, ..., C, 3]."""
        return x.movedim((1, 2), (-2, -1))

    @staticmethod
    def to_public(y: torch.Tensor) -> torch.Tensor:
        """Our layout [B, N, ..., C, 3] → public [B, C, 3, N, ...]."""
        return y.movedim((-2, -1), (1, 2))

    def forward(self, x: torch.Tensor):
        """``x`` [B, C_in, 3, N, ...] → the inner layer's output in the public layout, [B, C_out, 3, N, ...]
        (VNMaxPool pools N; VNStdFeature returns ``(x_std [B, C, 3, N, ...], z [B, 3, 3, N, ...])``)."""
        if x.dim() < 3 or x.shape[2] != 3:
            raise ValueError(f"{type(self.inner).__name__} (swapped): x must have the public VN layout "
                             f"[B, C, 3, ...], got {list(x.shape)}")
        if isinstance(self.inner, VNStdFeature):
            x_std, z = self.inner(self.to_ours(x))
            # ours [B, N.., frame vector, xyz] -> public [B, xyz, frame vector, N..]
            return self.to_public(x_std), z.movedim((-2, -1), (2, 1))
        # (VNMaxPool: the public code pools the last dim, which is the dim before C in our layout)
        return self.to_public(self.inner(self.to_ours(x)))

    def extra_repr(self):
        """The layout it accepts, for ``repr``."""
        return "public layout [B, C, 3, ...]"


def _linear_no_bias(m) -> bool:
    return isinstance(m, nn.Linear) and m.bias is None


def _copy_linear(src: nn.Linear, dst: EquivariantLinear):
    with torch.no_grad():
        dst.weights[0].copy_(src.weight)
    return dst


def _as_vn_linear(lin: nn.Linear) -> EquivariantLinear:
    return _copy_linear(lin, VNLinear(lin.in_features, lin.out_features, device=lin.weight.device,
                                      dtype=lin.weight.dtype))


def _as_vn_batchnorm(m) -> VNBatchNorm:
    bn = m.bn
    out = VNBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                      track_running_stats=bn.track_running_stats, device=getattr(bn.weight, "device", None),
                      dtype=getattr(bn.weight, "dtype", None))
    out.load_state_dict({k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"})
    return out.train(bn.training)


def convert_module(m: nn.Module) -> Optional[nn.Module]:
    """Our layer (behind a :class:`VNLayoutAdapter`) for a module of the public VN code recognised by structure,
    or None."""
    children = dict(m.named_children())
    names = set(children)
    slope = getattr(m, "negative_slope", None)
    if names == {"map_to_feat"} and _linear_no_bias(children["map_to_feat"]):
        return VNLayoutAdapter(_as_vn_linear(children["map_to_feat"]))
    if names == {"bn"} and isinstance(children["bn"], (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return VNLayoutAdapter(_as_vn_batchnorm(m))
    if names == {"map_to_dir"} and _linear_no_bias(children["map_to_dir"]):
        lin = children["map_to_dir"]
        if slope is not None:  # VNLeakyReLU
            layer = VNLeakyReLU(lin.in_features, share_nonlinearity=lin.out_features == 1,
                                negative_slope=slope, device=lin.weight.device, dtype=lin.weight.dtype)
        else:  # VNMaxPool
            layer = VNMaxPool(lin.in_features, device=lin.weight.device, dtype=lin.weight.dtype)
        _copy_linear(lin, layer.map_to_dir)
        return VNLayoutAdapter(layer)
    if {"map_to_feat", "map_to_dir"} <= names and names <= {"map_to_feat", "map_to_dir", "batchnorm"} \
            and slope is not None and _linear_no_bias(children["map_to_feat"]):
        feat, direction = children["map_to_feat"], children["map_to_dir"]
        bn = children.get("batchnorm")
        layer = VNLinearLeakyReLU(feat.in_features, feat.out_features,
                                  share_nonlinearity=direction.out_features == 1, use_batchnorm=bn is not None,
                                  negative_slope=slope, device=feat.weight.device, dtype=feat.weight.dtype)
        _copy_linear(feat, layer.map_to_feat)
        _copy_linear(direction, layer.map_to_dir)
        if bn is not None:
            layer.batchnorm = _as_vn_batchnorm(bn)
        return VNLayoutAdapter(layer)
    if names == {"vn1", "vn2", "vn_lin"} and _linear_no_bias(children["vn_lin"]) \
            and not getattr(m, "normalize_frame", False):
        vn1 = convert_module(children["vn1"])
        vn2 = convert_module(children["vn2"])
        if vn1 is None or vn2 is None:
            return None
        layer = VNStdFeature(vn1.inner.in_channels)
        layer.vn1, layer.vn2 = vn1.inner, vn2.inner
        layer.vn_lin = _as_vn_linear(children["vn_lin"])
        return VNLayoutAdapter(layer)
    return None
