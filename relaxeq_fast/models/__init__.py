"""Example networks, one module per family, plain or ``relaxed=True``:

- :mod:`.vn_pointnet` / :mod:`.vn_dgcnn`: VN classifiers for point clouds (Deng et al. 2021);
- :mod:`.steerable_cnn`: a C_N-steerable CNN for rotated images;
- :mod:`.egnn` / :mod:`.segnn`: E(3)-equivariant graph networks for N-body dynamics (SEGNN needs e3nn,
  imported only when one is built);
- :mod:`.se3_transformer`: se3-transformer-pytorch's SE(3)-Transformer for N-body dynamics (the library is
  imported only when one is built);
- :mod:`.smoke`: velocity-field forecasters for the smoke plumes (plain CNN, C_N-steerable CNN, RSteer).
"""
from ._common import RELAXED_MAPS  # noqa: F401  (relaxeq_fast.models.RELAXED_MAPS: the trainer's choices)
from .egnn import EGNN
from .se3_transformer import SE3TransformerNBody
from .segnn import SEGNN
from .smoke import ConvForecaster, SteerableForecaster
from .steerable_cnn import SteerableCNN
from .vn_dgcnn import VNDGCNN
from .vn_pointnet import VNPointNet, VNSTNkd

__all__ = ["VNPointNet", "VNSTNkd", "VNDGCNN", "SteerableCNN", "EGNN", "SEGNN", "SE3TransformerNBody",
           "ConvForecaster", "SteerableForecaster"]
