"""A tensor argument against x (one dtype, one device): shared by every op's argument checks."""
from __future__ import annotations

__all__ = ["check_matches_x"]


def check_matches_x(t, name, x, op):
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")
