"""A C_N-steerable CNN classifier for rotated images (RotMNIST), plain or relaxed."""
from __future__ import annotations

import torch
from torch import nn

from ..vn import relax
from ._common import _check_width

__all__ = ["SteerableCNN"]


class SteerableCNN(nn.Module):
    """C_N-steerable CNN classifier for RotMNIST-style images: [B, 1, 28, 28] → logits [B, num_classes].

    Regular-field steerable convolutions (5×5, 'same' padding) with field batch norm and ReLU,
    two 2×2 max poolings (28 → 14 → 7), a last 5×5 convolution with padding 1 (7 → 5), then the
    invariant head: max over each regular field's N channels (group pooling) and over the pixels, and
    an MLP. Every step maps the pixel grid of a square image onto itself under quarter turns (odd
    kernels with symmetric padding, pooling windows that tile the image), so for 4 | N the logits are
    invariant to 90° rotations up to rounding; other rotations in C_N are equivariant up to the
    grid's interpolation error.

    Args:
        num_classes: output classes (10).
        group: N of C_N (default 8; 4 | N for exact quarter-turn invariance).
        relaxed: relax every steerable convolution (RelaxedR2Conv: kernel K_eq + θ B); kwargs for it in
            ``relax_kwargs`` (theta, relax_init, backend, track_defect). Not the head.
        width: channel multiplier; each layer keeps a whole number (≥ 1) of regular fields.
        channels: channels of the four convolutions at width 1; each must be a multiple of N.
        dropout: dropout probability in the MLP head.
        in_channels: input channels (trivial fields).
    """

    def __init__(self, num_classes: int = 10, group: int = 8, relaxed: bool = False, width: float = 1.0,
                 channels=(64, 96, 128, 192), dropout: float = 0.3, in_channels: int = 1,
                 relax_kwargs: dict | None = None):
        super().__init__()
        from ..steerable import FieldBatchNorm, FieldNonLinearity, FieldType, InvariantPool, R2Conv, SpatialPool2d
        _check_width(width)
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group must be an int N >= 1 (C_N with regular fields), got {group!r}")
        if len(channels) != 4:
            raise ValueError(f"channels must list 4 channel counts, got {channels!r}")
        types = [FieldType.trivial(group, in_channels)]
        for i, c in enumerate(channels):
            types.append(FieldType.regular_channels(group, c, name=f"channels[{i}]"))
        types = [types[0]] + [FieldType.regular(group, max(1, round(len(t.fields) * width))) for t in types[1:]]
        self.group, self.num_classes = group, num_classes

        def block(t_in, t_out, padding):
            return nn.Sequential(R2Conv(t_in, t_out, 5, padding=padding), FieldBatchNorm(t_out), FieldNonLinearity(t_out))

        self.block1 = block(types[0], types[1], 2)
        self.block2 = block(types[1], types[2], 2)
        self.pool1 = SpatialPool2d(types[2], 2)
        self.block3 = block(types[2], types[3], 2)
        self.pool2 = SpatialPool2d(types[3], 2)
        self.block4 = block(types[3], types[4], 1)
        self.invariant = InvariantPool(types[4])
        n = len(types[4].fields)
        self.head = nn.Sequential(nn.Linear(n, 64), nn.BatchNorm1d(64), nn.ELU(), nn.Dropout(dropout),
                                  nn.Linear(64, num_classes))
        if relaxed:
            relax(self, **(relax_kwargs or {}))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Invariant features [B, n_fields] of images [B, in_channels, H, H]."""
        x = self.pool1(self.block2(self.block1(images)))
        x = self.block4(self.pool2(self.block3(x)))
        return self.invariant(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, in_channels, H, H] → logits [B, num_classes]."""
        return self.head(self.features(images))
