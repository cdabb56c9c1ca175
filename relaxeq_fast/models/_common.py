"""Helpers shared by the example networks: channel widths, input checks and which VN maps ``relaxed=True``
relaxes."""
from __future__ import annotations

import torch
from torch import nn

from ..nn import RelaxedLinear
from ..vn import VNStdFeature, relax

RELAXED_MAPS = ("all", "paper")


def _channels(published: int, width: float) -> int:
    """Published channel count (already divided by 3) scaled by ``width``, at least 4 (the
    VNStdFeature chain halves twice)."""
    return max(4, round(published * width))


def _check_width(width):
    if not (isinstance(width, (int, float)) and width > 0):
        raise ValueError(f"width must be a positive number (1 = published channel counts), got {width!r}")


def _relax_vn_model(model: nn.Module, relaxed_maps: str, relax_kwargs: dict | None) -> None:
    """relax() every VN map, then for "paper" undo what the public code does not relax (in place)."""
    if relaxed_maps not in RELAXED_MAPS:
        raise ValueError(f"relaxed_maps must be one of {list(RELAXED_MAPS)}, got {relaxed_maps!r}")
    relax_kwargs = relax_kwargs or {}
    relax(model, **relax_kwargs)
    if relaxed_maps == "all":
        return
    for m in list(model.modules()):
        if isinstance(m, VNStdFeature) and isinstance(m.vn_lin, RelaxedLinear):
            m.vn_lin = m.vn_lin.project()
        direction = getattr(m, "map_to_dir", None)
        if isinstance(direction, RelaxedLinear) and direction.bias_relax is not None:
            m.map_to_dir = RelaxedLinear.from_plain(direction.project(),
                                                    **{**relax_kwargs, "relax_bias": False})


def _check_points(points: torch.Tensor, k: int, who: str):
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{who}: points must have shape [B, P, 3], got {list(points.shape)}")
    if points.shape[1] < k:
        raise ValueError(f"{who}: k = {k} neighbours needs at least {k} points per cloud, got P = {points.shape[1]}")
