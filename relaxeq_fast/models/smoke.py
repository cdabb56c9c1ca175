"""Forecasters of 2D velocity fields for the smoke-plume task (:mod:`relaxeq_fast.data.smoke`): a plain CNN,
an exactly C_4-equivariant steerable CNN and RSteer, each plain or (the last two) with the relaxation
paper's θ·B branch on every convolution.

The architecture of the public code (``2DFlow/models/model_rotation.py``): five 3 × 3 convolutions with zero
padding, ReLU between them, no normalisation, no residual; the input is the last ``input_frames`` velocity
fields stacked frame-major as channels (v_x, v_y of frame 0, then frame 1, …), the output one velocity field.
For the steerable models the input is ``input_frames`` frequency-1 fields of C_N (each (v_x, v_y) turns with
the grid), the hidden layers ``hidden`` regular fields (N channels each, pointwise ReLU) and the output one
frequency-1 field; published: C_4, 92 hidden fields.

* :class:`ConvForecaster` ("cnn"): plain ``nn.Conv2d`` layers with ``hidden·N`` channels (the steerable
  models' channel count), no symmetry.
* :class:`SteerableForecaster` ("equiv"; ``rsteer=True``: "rsteer"): R2Conv layers, or RSteerConv layers
  whose basis coefficients vary over the kernel positions (:mod:`relaxeq_fast.steerable.rsteer`) with
  ``alpha`` × the mean coefficient difference between neighbouring positions, summed over the layers, as
  :meth:`auxiliary_loss` (the trainer adds it to the task loss). ``relaxed=True`` relaxes every convolution
  (RelaxedR2Conv / RelaxedRSteerConv: kernel + θ B, the defect regulariser); :func:`relaxeq_fast.vn.project`
  gives back the exact (or the RSteer) model, whose state_dict loads into ``relaxed=False``.

Every forecaster maps frames [B, T_in, 2, H, W] to ``steps`` predicted frames [B, steps, 2, H, W],
autoregressively: each prediction is appended to the input window and the oldest frame dropped.
"""
from __future__ import annotations

import torch
from torch import nn

from ..vn import relax
from ._common import _check_width

__all__ = ["ConvForecaster", "SteerableForecaster", "rollout"]

PUBLISHED_HIDDEN = 92  # regular C_4 fields per hidden layer in the public code


def rollout(step: nn.Module, frames: torch.Tensor, steps: int) -> torch.Tensor:
    """Autoregressive forecast: ``step`` maps [B, T·2, H, W] → [B, 2, H, W]; frames [B, T, 2, H, W] →
    [B, steps, 2, H, W]."""
    if frames.dim() != 5 or frames.shape[2] != 2:
        raise ValueError(f"frames must have shape [B, T, 2, H, W] (velocity fields), got {list(frames.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    window = frames.flatten(1, 2)
    out = []
    for _ in range(steps):
        pred = step(window)
        out.append(pred)
        window = torch.cat((window[:, 2:], pred), 1)
    return torch.stack(out, 1)


def _hidden_fields(hidden: int, width: float) -> int:
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int (fields per hidden layer), got {hidden!r}")
    _check_width(width)
    return max(1, round(hidden * width))


def _check_depth(layers: int):
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 2:
        raise ValueError(f"layers must be an int >= 2 (convolutions, the last one linear), got {layers!r}")


class _Forecaster(nn.Module):
    input_frames: int

    def forward(self, frames: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """frames [B, input_frames, 2, H, W] → the next ``steps`` fields [B, steps, 2, H, W]."""
        if frames.dim() == 5 and frames.shape[1] != self.input_frames:
            raise ValueError(f"{type(self).__name__}: frames must hold input_frames = {self.input_frames} "
                             f"frames, got {frames.shape[1]}")
        return rollout(self.step, frames, steps)


class ConvForecaster(_Forecaster):
    """Plain CNN: ``layers`` 3 × 3 convolutions 2·input_frames → hidden_channels → … → 2, ReLU between.

    Args: input_frames (10), hidden_channels (the steerable models' hidden·N = 368 at the published size),
    layers (5), kernel_size (3), width (multiplies hidden_channels).
    """

    def __init__(self, input_frames: int = 10, hidden_channels: int = PUBLISHED_HIDDEN * 4, layers: int = 5,
                 kernel_size: int = 3, width: float = 1.0):
        super().__init__()
        _check_depth(layers)
        c = _hidden_fields(hidden_channels, width)
        self.input_frames = input_frames
        dims = [2 * input_frames] + [c] * (layers - 1) + [2]
        mods = []
        for i in range(layers):
            mods.append(nn.Conv2d(dims[i], dims[i + 1], kernel_size, padding=kernel_size // 2))
            if i < layers - 1:
                mods.append(nn.ReLU())
        self.step = nn.Sequential(*mods)


class SteerableForecaster(_Forecaster):
    """C_N-steerable CNN (or RSteer): ``layers`` steerable 3 × 3 convolutions, input_frames × frequency-1 →
    hidden regular fields → … → one frequency-1 field, pointwise ReLU between.

    Args:
        input_frames: velocity fields in the input window (10).
        hidden: regular fields per hidden layer at width 1 (published 92), scaled by ``width``.
        group: N of C_N (4: the grid's exact quarter turns; others interpolate the kernels' rotation).
        layers, kernel_size: 5 and 3 as published.
        rsteer: RSteerConv layers (position-dependent coefficients) instead of R2Conv.
        alpha: weight of RSteer's coefficient penalty in :meth:`auxiliary_loss`.
        relaxed: relax every convolution (kernel + θ B); ``relax_kwargs`` go to the relaxed layers.
    """

    def __init__(self, input_frames: int = 10, hidden: int = PUBLISHED_HIDDEN, group: int = 4, layers: int = 5,
                 kernel_size: int = 3, width: float = 1.0, rsteer: bool = False, alpha: float = 1e-5,
                 relaxed: bool = False, relax_kwargs: dict | None = None):
        super().__init__()
        from ..steerable import FieldNonLinearity, FieldType, R2Conv, RSteerConv
        _check_depth(layers)
        if isinstance(group, bool) or not isinstance(group, int) or group < 2:
            raise ValueError(f"group must be an int N >= 2 (C_N; frequency-1 fields need N >= 2), got {group!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        n = _hidden_fields(hidden, width)
        self.input_frames, self.group, self.alpha, self.rsteer = input_frames, group, float(alpha), rsteer
        velocity = FieldType.irreps(group, [1])
        types = [FieldType.irreps(group, [1], input_frames)] + [FieldType.regular(group, n)] * (layers - 1) + [velocity]
        conv = RSteerConv if rsteer else R2Conv
        mods = []
        for i in range(layers):
            mods.append(conv(types[i], types[i + 1], kernel_size, padding=kernel_size // 2))
            if i < layers - 1:
                mods.append(FieldNonLinearity(types[i + 1]))
        self.step = nn.Sequential(*mods)
        if relaxed:
            relax(self, **(relax_kwargs or {}))

    def auxiliary_loss(self) -> torch.Tensor:
        """RSteer: alpha × Σ over layers of the coefficient penalty (0-d); 0 for the exact model."""
        from ..steerable import RSteerConv
        terms = [m.coefficient_penalty() for m in self.modules() if isinstance(m, RSteerConv)]
        if not terms:
            return next(self.parameters()).new_zeros(())
        return self.alpha * torch.stack(terms).sum()

    def extra_repr(self) -> str:
        """The group, RSteer or not, and alpha, for ``repr``."""
        return f"group=C_{self.group}, rsteer={self.rsteer}, alpha={self.alpha:g}"
