"""VN-PointNet classifier (Deng et al. 2021, vnn's pointnet_cls) in our layout, plain or relaxed.

Published architecture with channel widths divided by 3, k = 20 nearest neighbours for the first
edge features, mean pooling, the VN STN on the 64/3-channel features, and a rotation-invariant head
(VNStdFeature, max over points, MLP). ``relaxed=True`` relaxes exactly what the paper relaxes: every
VNLinearLeakyReLU's maps, every VNLinear, the maps inside VNStdFeature and the STN — not pooling, not
the invariant MLP head.
"""
from __future__ import annotations

import torch
from torch import nn

from .vn import (VNBatchNorm, VNLinear, VNLinearLeakyReLU, VNStdFeature, graph_feature_cross, relax,
                 vn_mean_pool)

__all__ = ["VNPointNet", "VNSTNkd"]


class VNSTNkd(nn.Module):
    """The VN spatial transformer of VN-PointNet: features [B, P, d, 3] → a global [B, d, 3]."""

    def __init__(self, d: int = 64 // 3, negative_slope: float = 0.0):
        super().__init__()
        ns = negative_slope
        self.conv1 = VNLinearLeakyReLU(d, 64 // 3, negative_slope=ns)
        self.conv2 = VNLinearLeakyReLU(64 // 3, 128 // 3, negative_slope=ns)
        self.conv3 = VNLinearLeakyReLU(128 // 3, 1024 // 3, negative_slope=ns)
        self.fc1 = VNLinearLeakyReLU(1024 // 3, 512 // 3, negative_slope=ns)
        self.fc2 = VNLinearLeakyReLU(512 // 3, 256 // 3, negative_slope=ns)
        self.fc3 = VNLinear(256 // 3, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = vn_mean_pool(self.conv3(self.conv2(self.conv1(x))))  # pool over points
        return self.fc3(self.fc2(self.fc1(x)))


class VNPointNet(nn.Module):
    """VN-PointNet classifier: points [B, P, 3] → log-probabilities [B, num_classes] (rotation invariant).

    Args:
        num_classes: output classes (40 for ModelNet40).
        k: neighbours for the first edge features (k ≤ P required).
        relaxed: build with every relaxable map relaxed (see the module docstring); kwargs for
            RelaxedLinear (theta, relax_init, backend, ...) go in ``relax_kwargs``.
        feature_transform: use the VN STN (the published model does).
    """

    def __init__(self, num_classes: int = 40, k: int = 20, relaxed: bool = False, feature_transform: bool = True,
                 dropout: float = 0.4, relax_kwargs: dict | None = None):
        super().__init__()
        self.k, self.num_classes = k, num_classes
        ns = 0.0
        self.conv_pos = VNLinearLeakyReLU(3, 64 // 3, negative_slope=ns)
        self.conv1 = VNLinearLeakyReLU(64 // 3, 64 // 3, negative_slope=ns)
        self.fstn = VNSTNkd(64 // 3) if feature_transform else None
        self.conv2 = VNLinearLeakyReLU(64 // 3 * (2 if feature_transform else 1), 128 // 3, negative_slope=ns)
        self.conv3 = VNLinear(128 // 3, 1024 // 3)
        self.bn3 = VNBatchNorm(1024 // 3)
        self.std_feature = VNStdFeature(1024 // 3 * 2, negative_slope=ns)
        width = 1024 // 3 * 6
        self.head = nn.Sequential(
            nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU(),
            nn.Linear(512, 256), nn.Dropout(p=dropout), nn.BatchNorm1d(256), nn.ReLU(),
            nn.Linear(256, num_classes))
        if relaxed:
            relax(self, **(relax_kwargs or {}))

    def features(self, points: torch.Tensor) -> torch.Tensor:
        """Invariant global features [B, 2046] of points [B, P, 3]."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"VNPointNet: points must have shape [B, P, 3], got {list(points.shape)}")
        if points.shape[1] < self.k:
            raise ValueError(f"VNPointNet: k = {self.k} neighbours needs at least {self.k} points per cloud, "
                             f"got P = {points.shape[1]}")
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
        return torch.log_softmax(self.head(self.features(points)), dim=-1)
