"""What a run learns: classification (accuracy) or N-body regression (MSE), as one interface the loop uses.

A task says how a batch of the dataset's ``x`` becomes the model's arguments, what the training loss is,
which per-sample metric is summed for the epoch's and the evaluation's numbers, whether that metric is
better high or low (model selection on the validation split), and how the final model's symmetry is
checked.

N-body batches are packed: x [B, n, 7] = (positions, velocities, charges) at the input frame, y [B, n, 3]
the positions to predict; a random rotation R and translation t act as x ↦ (x R^T + t, v R^T, q),
y ↦ y R^T + t.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as TF
from torch import nn

from .config import GRAPH_MODELS, IMAGE_MODELS, TrainConfig


@dataclass(frozen=True)
class Task:
    kind: str              # "classification" or "regression"
    metric: str            # the metric's column suffix: "acc" or "mse"
    higher_is_better: bool

    def inputs(self, x: torch.Tensor) -> tuple:
        """The model's positional arguments for a batch x."""
        if self.kind == "regression":
            return unpack_nbody(x)
        return (x,)

    def loss(self, out: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
        if self.kind == "regression":
            return TF.mse_loss(out, y)
        return TF.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)

    def metric_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of the per-sample metric (1 for a correct prediction; a system's MSE), 0-d."""
        if self.kind == "regression":
            return (out.detach() - y).square().flatten(1).mean(1).sum()
        return (out.detach().argmax(-1) == y).sum()

    def static_mse(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """N-body: the MSE of predicting that nothing moves (target := input positions), the baseline."""
        return (unpack_nbody(x)[0].double() - y.double()).square().mean().item()

    def better(self, a: float, b: float) -> bool:
        """Whether metric value a is strictly better than b."""
        return a > b if self.higher_is_better else a < b


CLASSIFICATION = Task("classification", "acc", True)
REGRESSION = Task("regression", "mse", False)


def task_of(cfg: TrainConfig) -> Task:
    return REGRESSION if cfg.model in GRAPH_MODELS else CLASSIFICATION


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
    rotations for point-cloud classifiers; to the exact quarter turns (torch.rot90) for images."""
    if cfg.model in GRAPH_MODELS:
        return nbody_equivariance_error(model, x, seed=cfg.seed)
    if cfg.model in IMAGE_MODELS:
        from ..steerable import rot90_equivariance_error
        return rot90_equivariance_error(model, x)
    from ..vn import equivariance_error
    return equivariance_error(model, x, output="invariant", seed=cfg.seed)
