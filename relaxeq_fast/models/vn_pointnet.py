"""The VN-PointNet classifier (Deng et al. 2021, vnn's pointnet_cls) in our layout, plain or relaxed.

The published architecture with channel widths divided by 3, k = 20 nearest neighbours, mean pooling,
the VN STN on the 64/3-channel features, and rotation-invariant heads (VNStdFeature,
pooling over points, MLP). ``relaxed=True`` relaxes what the paper's public code relaxes (the default
``relaxed_maps="paper"``: every VNLinearLeakyReLU's maps, every VNLinear, the maps inside VNStdFeature and
the STN — not pooling, not the invariant MLP head — except VNStdFeature's last map, which stays
equivariant, and with the direction maps relaxed without a relaxation bias), or every VN map
(``relaxed_maps="all"``: the worst setting measured, README "Does relaxation help?", and slower).
"""
from __future__ import annotations

import torch
from torch import nn

from ..vn import VNBatchNorm, VNLinear, VNLinearLeakyReLU, VNStdFeature, graph_feature_cross, vn_mean_pool
from ._common import _channels, _check_points, _check_width, _relax_vn_model

__all__ = ["VNPointNet", "VNSTNkd"]


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
        relaxed_maps: "paper" (the default: as the public code and relaxeq-train; module docstring) or "all"
            (every VN map).
        feature_transform: use the VN STN (the published model does).
        dropout: dropout probability in the MLP head.
        width: every VN channel count scaled by this (1 = published; smaller for quick CPU runs).
    """

    def __init__(self, num_classes: int = 40, k: int = 20, relaxed: bool = False, feature_transform: bool = True,
                 dropout: float = 0.4, relax_kwargs: dict | None = None, width: float = 1.0,
                 relaxed_maps: str = "paper"):
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
