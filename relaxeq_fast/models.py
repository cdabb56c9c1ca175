"""VN-PointNet and VN-DGCNN classifiers (Deng et al. 2021, vnn's pointnet_cls and dgcnn_cls) in our
layout, plain or relaxed.

Published architectures with channel widths divided by 3, k = 20 nearest neighbours, mean pooling,
(VN-PointNet) the VN STN on the 64/3-channel features, and rotation-invariant heads (VNStdFeature,
pooling over points, MLP). ``relaxed=True`` relaxes every VN map (``relaxed_maps="all"``: every
VNLinearLeakyReLU's maps, every VNLinear, the maps inside VNStdFeature and the STN — not pooling, not
the invariant MLP head), or what the paper's public code relaxes (``relaxed_maps="paper"``: the same
except VNStdFeature's last map, which stays equivariant, and the direction maps, relaxed without a
relaxation bias).
"""
from __future__ import annotations

import torch
from torch import nn

from .egnn import EGNN  # noqa: F401  (re-exported: relaxeq_fast.models.EGNN)
from .segnn import SEGNN  # noqa: F401  (re-exported; imports e3nn only when built)
from .nn import RelaxedLinear
from .vn import (VNBatchNorm, VNLinear, VNLinearLeakyReLU, VNStdFeature, graph_feature, graph_feature_cross,
                 relax, vn_mean_pool)

RELAXED_MAPS = ("all", "paper")

__all__ = ["VNPointNet", "VNSTNkd", "VNDGCNN", "SteerableCNN", "EGNN", "SEGNN"]


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


class VNSTNkd(nn.Module):
    """The VN spatial transformer of VN-PointNet: features [B, P, d, 3] → a global [B, d, 3].

    Three VNLinearLeakyReLU over points (d → 64/3 → 128/3 → 1024/3 channels), mean pooling over P,
    two more VNLinearLeakyReLU (→ 512/3 → 256/3) and a VNLinear back to d channels.

    Args:
        d: channels in and out (64 // 3 = 21 in VN-PointNet at width 1).
        negative_slope: of the VN leaky ReLUs (0 = VN ReLU, as the published model).
        width: every hidden channel count scaled by this (1 = published); ``d`` is not scaled.
    """

    def __init__(self, d: int = 64 // 3, negative_slope: float = 0.0, width: float = 1.0):
        super().__init__()
        ns = negative_slope
        c64, c128, c1024, c512, c256 = (_channels(c // 3, width) for c in (64, 128, 1024, 512, 256))
        self.conv1 = VNLinearLeakyReLU(d, c64, negative_slope=ns)
        self.conv2 = VNLinearLeakyReLU(c64, c128, negative_slope=ns)
        self.conv3 = VNLinearLeakyReLU(c128, c1024, negative_slope=ns)
        self.fc1 = VNLinearLeakyReLU(c1024, c512, negative_slope=ns)
        self.fc2 = VNLinearLeakyReLU(c512, c256, negative_slope=ns)
        self.fc3 = VNLinear(c256, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Features ``x`` [B, P, d, 3] → global [B, d, 3] (equivariant)."""
        x = vn_mean_pool(self.conv3(self.conv2(self.conv1(x))))  # pool over points
        return self.fc3(self.fc2(self.fc1(x)))


class VNPointNet(nn.Module):
    """VN-PointNet classifier: points [B, P, 3] → log-probabilities [B, num_classes] (rotation invariant).

    Args:
        num_classes: output classes (40 for ModelNet40).
        k: neighbours for the first edge features (k ≤ P required).
        relaxed: build relaxed (see the module docstring); kwargs for RelaxedLinear (theta,
            relax_init, backend, ...) go in ``relax_kwargs``.
        relaxed_maps: "all" (every VN map) or "paper" (as the public code; module docstring).
        feature_transform: use the VN STN (the published model does).
        dropout: dropout probability in the MLP head.
        width: every VN channel count scaled by this (1 = published; smaller for quick CPU runs).
    """

    def __init__(self, num_classes: int = 40, k: int = 20, relaxed: bool = False, feature_transform: bool = True,
                 dropout: float = 0.4, relax_kwargs: dict | None = None, width: float = 1.0,
                 relaxed_maps: str = "all"):
        super().__init__()
        _check_width(width)
        self.k, self.num_classes = k, num_classes
        ns = 0.0
        c64, c128, c1024 = (_channels(c // 3, width) for c in (64, 128, 1024))
        self.conv_pos = VNLinearLeakyReLU(3, c64, negative_slope=ns)
        self.conv1 = VNLinearLeakyReLU(c64, c64, negative_slope=ns)
        self.fstn = VNSTNkd(c64, width=width) if feature_transform else None
        self.conv2 = VNLinearLeakyReLU(c64 * (2 if feature_transform else 1), c128, negative_slope=ns)
        self.conv3 = VNLinear(c128, c1024)
        self.bn3 = VNBatchNorm(c1024)
        self.std_feature = VNStdFeature(c1024 * 2, negative_slope=ns)
        self.head = nn.Sequential(
            nn.Linear(c1024 * 6, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 256), nn.Dropout(p=dropout), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, num_classes))
        if relaxed:
            _relax_vn_model(self, relaxed_maps, relax_kwargs)

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Invariant global features [B, 6·C] of points [B, P, 3] (C = 341 at width 1)."""
        _check_points(points, self.k, "VNPointNet")
        x = points.unsqueeze(2)  # [B, P, 1, 3]
        x = vn_mean_pool(self.conv_pos(graph_feature_cross(x, self.k)))  # mean over neighbours
        x = self.conv1(x)
        if self.fstn is not None:
            x_global = self.fstn(x).unsqueeze(1).expand_as(x)
            x = torch.cat((x, x_global), dim=-2)
        x = self.bn3(self.conv3(self.conv2(x)))
        x = torch.cat((x, x.mean(dim=1, keepdim=True).expand_as(x)), dim=-2)
        x, _frame = self.std_feature(x)
        return x.reshape(x.shape[0], x.shape[1], -1).amax(dim=1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Points [B, P, 3] → log-probabilities [B, num_classes]."""
        return torch.log_softmax(self.head(self.features(points)), dim=-1)


class VNDGCNN(nn.Module):
    """VN-DGCNN classifier: points [B, P, 3] → logits [B, num_classes] (rotation invariant).

    Four EdgeConv stages on k-nearest-neighbour graphs recomputed from the features, mean pooling over
    neighbours, a shared-nonlinearity VNLinearLeakyReLU over the concatenated stages, VNStdFeature, then
    max and mean over points and the MLP head (as vnn's dgcnn_cls).

    Args:
        num_classes: output classes (40 for ModelNet40).
        k: neighbours of every kNN graph (k ≤ P required).
        relaxed: build relaxed (see the module docstring); kwargs for RelaxedLinear (theta,
            relax_init, backend, ...) go in ``relax_kwargs``.
        dropout: dropout probability in the MLP head.
        width: every VN channel count scaled by this (1 = published; smaller for quick CPU runs).
        relaxed_maps: "all" (every VN map) or "paper" (as the public code; module docstring).
    """

    def __init__(self, num_classes: int = 40, k: int = 20, relaxed: bool = False, dropout: float = 0.5,
                 relax_kwargs: dict | None = None, width: float = 1.0, relaxed_maps: str = "all"):
        super().__init__()
        _check_width(width)
        self.k, self.num_classes = k, num_classes
        c1, c2, c3, c4, c5 = (_channels(c // 3, width) for c in (64, 64, 128, 256, 1024))
        self.conv1 = VNLinearLeakyReLU(2, c1)
        self.conv2 = VNLinearLeakyReLU(c1 * 2, c2)
        self.conv3 = VNLinearLeakyReLU(c2 * 2, c3)
        self.conv4 = VNLinearLeakyReLU(c3 * 2, c4)
        self.conv5 = VNLinearLeakyReLU(c1 + c2 + c3 + c4, c5, share_nonlinearity=True)
        self.std_feature = VNStdFeature(c5 * 2)
        self.head = nn.Sequential(
            nn.Linear(c5 * 12, 512, bias=False), nn.BatchNorm1d(512), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(512, 256), nn.BatchNorm1d(256), nn.LeakyReLU(0.2), nn.Dropout(dropout),
            nn.Linear(256, num_classes))
        if relaxed:
            _relax_vn_model(self, relaxed_maps, relax_kwargs)

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Invariant global features [B, 12·C] of points [B, P, 3] (C = 341 at width 1)."""
        _check_points(points, self.k, "VNDGCNN")
        x = points.unsqueeze(2)  # [B, P, 1, 3]
        stages = []
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            x = vn_mean_pool(conv(graph_feature(x, self.k)))  # mean over neighbours
            stages.append(x)
        x = self.conv5(torch.cat(stages, dim=-2))
        x = torch.cat((x, x.mean(dim=1, keepdim=True).expand_as(x)), dim=-2)
        x, _frame = self.std_feature(x)
        x = x.reshape(x.shape[0], x.shape[1], -1)
        return torch.cat((x.amax(dim=1), x.mean(dim=1)), dim=-1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Points [B, P, 3] → logits [B, num_classes]."""
        return self.head(self.features(points))


# ---- steerable CNN on images ----------------------------------------------------------------------------

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
        from .steerable import FieldBatchNorm, FieldNonLinearity, FieldType, InvariantPool, R2Conv, SpatialPool2d
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
