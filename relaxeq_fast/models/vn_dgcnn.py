"""The VN-DGCNN classifier (Deng et al. 2021, vnn's dgcnn_cls) in our layout, plain or relaxed; published
channel widths divided by 3, scaled by ``width``. ``relaxed=True`` relaxes the maps the
``relaxed_maps`` option names (see :mod:`relaxeq_fast.models.vn_pointnet`)."""
from __future__ import annotations

import torch
from torch import nn

from ..vn import VNLinearLeakyReLU, VNStdFeature, graph_feature, vn_mean_pool
from ._common import _channels, _check_points, _check_width, _relax_vn_model

__all__ = ["VNDGCNN"]


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
        relaxed_maps: "paper" (the default: as the public code and relaxeq-train; module docstring) or "all"
            (every VN map).
    """

    def __init__(self, num_classes: int = 40, k: int = 20, relaxed: bool = False, dropout: float = 0.5,
                 relax_kwargs: dict | None = None, width: float = 1.0, relaxed_maps: str = "paper"):
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
