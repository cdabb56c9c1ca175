"""What a run learns: classification (accuracy), N-body regression (MSE) or smoke-plume forecasting (RMSE), as
one interface the loop uses.

A task says how a batch of the dataset's ``x`` becomes the model's arguments, what the training loss is,
which per-sample metric is summed for the epoch's and the evaluation's numbers, whether that metric is
better high or low (model selection on the validation split), and how the final model's symmetry is
checked.

N-body batches are packed: x [B, n, 7] = (positions, velocities, charges) at the input frame, y [B, n, 3]
the positions to predict; a random rotation R and translation t act as x ↦ (x R^T + t, v R^T, q),
y ↦ y R^T + t.

Smoke batches: x [B, 10, 2, H, W] (the input window of velocity fields), y [B, T, 2, H, W] (the next T fields:
6 in training and validation, 20 in the test splits); the model rolls out T steps. The training loss is the
sum over the T steps of each step's MSE (the public code's); the metric is the RMSE, √(mean over samples of the
sample's MSE over its T steps, channels and pixels).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn

from .config import FLOW_MODELS, GRAPH_MODELS, IMAGE_MODELS, TrainConfig


@dataclass(frozen=True)
class Task:
    kind: str              # "classification", "regression" or "forecast"
    metric: str            # the metric's column suffix: "acc", "mse" or "rmse"
    higher_is_better: bool

    def inputs(self, x: torch.Tensor, y: Optional[torch.Tensor] = None) -> tuple:
        """The model's positional arguments for a batch x (forecasts: the window and the number of steps in the
        targets y, 1 without them)."""
        if self.kind == "regression":
            return unpack_nbody(x)
        if self.kind == "forecast":
            return (x, 1 if y is None else y.shape[1])
        return (x,)

    def loss(self, out: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        if self.kind == "regression":
            return TF.mse_loss(out, y)
        if self.kind == "forecast":  # Σ over the rolled-out steps of each step's MSE
            return TF.mse_loss(out, y) * y.shape[1]
        return TF.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)

    def metric_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of the per-sample metric (1 for a correct prediction; a sample's MSE), 0-d."""
        if self.kind in ("regression", "forecast"):
            return (out.detach() - y).square().flatten(1).mean(1).sum()
        return (out.detach().argmax(-1) == y).sum()

    def finish(self, mean: float) -> float:
        """The reported metric from the mean of the per-sample metric (RMSE: its square root)."""
        return math.sqrt(mean) if self.metric == "rmse" else mean

    def static_mse(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """N-body: the MSE of predicting that nothing moves (target := input positions), the baseline."""
        return (unpack_nbody(x)[0].double() - y.double()).square().mean().item()

    def better(self, a: float, b: float) -> bool:
        """Whether metric value a is strictly better than b."""
        return a > b if self.higher_is_better else a < b


CLASSIFICATION = Task("classification", "acc", True)
REGRESSION = Task("regression", "mse", False)
FORECAST = Task("forecast", "rmse", False)


def task_of(cfg: TrainConfig) -> Task:
    if cfg.model in FLOW_MODELS:
        return FORECAST
    return REGRESSION if cfg.model in GRAPH_MODELS else CLASSIFICATION


def persistence_rmse(x, y) -> float:
    """Smoke: the RMSE of predicting that the last input field persists (the floor a forecaster must beat),
    over windows x [N, T_in, 2, H, W] and targets y [N, T, 2, H, W] (tensors or FrameWindows)."""
    total, n = 0.0, len(y)
    for i in range(0, n, 256):
        xb, yb = x[i:min(i + 256, n)].double(), y[i:min(i + 256, n)].double()
        total += (yb - xb[:, -1:]).square().flatten(1).mean(1).sum().item()
    return math.sqrt(total / max(n, 1))


@torch.no_grad()
def flow_equivariance_error(model: nn.Module, x: torch.Tensor) -> float:
    """Worst relative error ‖f(g x) − g f(x)‖ / ‖f(x)‖ of a one-step forecast over the quarter turns g (the
    grid turned and the velocity vectors with it) on windows x [B, T_in, 2, H, W]."""
    from ..data.smoke import rotate_fields
    base = model(x, 1)
    scale = base.norm().clamp_min(torch.finfo(base.dtype).tiny)
    return max(((model(rotate_fields(x, q), 1) - rotate_fields(base, q)).norm() / scale).item() for q in (1, 2, 3))


def pack_nbody(loc: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor) -> torch.Tensor:
    """loc, vel [N, n, 3], charges [N, n, 1] → x [N, n, 7]."""
    return torch.cat([loc, vel, charges], -1)


def unpack_nbody(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, n, 7] → (loc [B, n, 3], vel [B, n, 3], charges [B, n, 1])."""
    return x[..., :3], x[..., 3:6], x[..., 6:7]


def move_nbody(x: torch.Tensor, y: torch.Tensor, R: torch.Tensor, t: torch.Tensor):
    """The systems rotated by R [B, 3, 3] (or [3, 3]) and translated by t [B, 3] (or [3]): (x, y) as packed."""
    loc, vel, q = unpack_nbody(x)
    R = R.expand(x.shape[0], 3, 3) if R.dim() == 2 else R
    t = t.expand(x.shape[0], 3) if t.dim() == 1 else t
    turn = lambda v: v @ R.transpose(-1, -2)  # noqa: E731
    return pack_nbody(turn(loc) + t[:, None], turn(vel), q), turn(y) + t[:, None]


@torch.no_grad()
def nbody_equivariance_error(model: nn.Module, x: torch.Tensor, n_transforms: int = 4, seed: int = 0) -> float:
    """Worst relative error ‖f(R x + t) − (R f(x) + t)‖ / ‖f(x)‖ of a position predictor over random
    rotations R and translations t (|t| ~ 1) on packed N-body inputs x [B, n, 7]."""
    from ..reps import random_rotation
    gen = torch.Generator().manual_seed(seed)
    base = model(*unpack_nbody(x))
    worst = 0.0
    for _ in range(n_transforms):
        R = random_rotation(generator=gen, dtype=x.dtype, device=x.device)
        t = torch.randn(3, generator=gen, dtype=torch.float64).to(x)
        moved_x, expected = move_nbody(x, base, R, t)
        err = (model(*unpack_nbody(moved_x)) - expected).norm() / base.norm().clamp_min(torch.finfo(base.dtype).tiny)
        worst = max(worst, err.item())
    return worst


def final_equivariance_error(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> float:
    """The final model's symmetry error: E(3) of the predicted positions for N-body; invariance to random 3D
    rotations for point-cloud classifiers; to the exact quarter turns (torch.rot90) for images; equivariance to
    them for the smoke forecasts (RSteer and the CNN are not equivariant: the error says how far)."""
    if cfg.model in GRAPH_MODELS:
        return nbody_equivariance_error(model, x, seed=cfg.seed)
    if cfg.model in FLOW_MODELS:
        return flow_equivariance_error(model, x)
    if cfg.model in IMAGE_MODELS:
        from ..steerable import rot90_equivariance_error
        return rot90_equivariance_error(model, x)
    from ..vn import equivariance_error
    return equivariance_error(model, x, output="invariant", seed=cfg.seed)
