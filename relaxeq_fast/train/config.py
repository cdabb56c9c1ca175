"""The configuration of a run: every setting (TrainConfig), the paper setups that fill what is unset,
and validation that names the bad argument in one line before anything is built."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..regularizer import REDUCTIONS
from ..relaxation import SCHEDULES

POINT_MODELS = ("vn_pointnet", "vn_dgcnn")
IMAGE_MODELS = ("steerable_cnn",)
MODELS = POINT_MODELS + IMAGE_MODELS
IMAGE_DATASETS = ("rotmnist",)
ROTATIONS = ("aligned", "z", "so3")
AUGMENTATIONS = ("dropout", "scale", "shift", "jitter")
METRIC_FIELDS = ("epoch", "step", "lr", "theta", "train_loss", "train_acc", "reg_loss", "r_ld", "r_n",
                 "test_acc", "projection_error", "epoch_seconds")

# The paper's setups (VN-PointNet: Adam 1e-3, wd 1e-4, StepLR 20/0.7, batch 24, 300 points;
# VN-DGCNN: SGD 0.1 momentum 0.9, cosine to 1e-3, batch 32). Explicit arguments override them.
PAPER_SETUPS = {
    "vn_pointnet": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4, lr_schedule="step", lr_step=20,
                        lr_gamma=0.7, batch_size=24, num_points=300),
    "vn_dgcnn": dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, lr_schedule="cosine", momentum=0.9,
                     batch_size=32, num_points=300),
    # Steerable CNN on RotMNIST (Weiler & Cesa 2019 style): Adam 1e-3, batch 64, small weight decay.
    "steerable_cnn": dict(optimizer="adam", lr=1e-3, weight_decay=1e-5, lr_schedule="cosine", batch_size=64,
                          dropout=0.3),
}


class ConfigError(ValueError):
    """A bad configuration; the message is one line naming the cause."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; the last checkpoint (from a finite epoch) is left untouched."""


@dataclass
class TrainConfig:
    """Every setting of a run (saved as config.json in the run directory). None = the model's paper setup."""
    model: str = "vn_pointnet"
    dataset: str = "shapes"
    data_root: Optional[str] = None
    train_rotation: str = "so3"
    test_rotation: str = "so3"
    epochs: int = 10
    batch_size: Optional[int] = None
    num_points: Optional[int] = None
    k: int = 20
    width: float = 1.0
    group: int = 8
    dropout: Optional[float] = None
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    augment: str = "none"
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    lr_schedule: Optional[str] = None
    lr_step: int = 20
    lr_gamma: float = 0.7
    plain: bool = False
    theta_schedule: str = "hold_linear"
    theta_max: float = 1.0
    theta_unit: str = "step"
    lambda_ld: float = 1e-2
    lambda_n: float = 1e-3
    reduction: str = "paper"
    theta_scaled_lambda: bool = False
    relax_init: str = "zeros"
    clip_grad_norm: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    backend: Optional[str] = None
    run_dir: Optional[str] = None
    runs_root: str = "runs"
    eval_batch_size: int = 64
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the model's paper setup filled in where this config says None."""
        cfg = dataclasses.replace(self)
        for key, value in PAPER_SETUPS.get(cfg.model, {}).items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        if cfg.dropout is None:
            cfg.dropout = 0.4 if cfg.model == "vn_pointnet" else 0.5
        return cfg


def _fail(msg: str):
    raise ConfigError(msg)



def validate(cfg: TrainConfig, world: int = 1) -> None:
    """One-line ConfigError for anything that cannot work, before any data or model is built."""
    from ..data import DATASETS
    if cfg.model not in MODELS:
        _fail(f"--model must be one of {list(MODELS)}, got {cfg.model!r}")
    if cfg.dataset not in DATASETS:
        _fail(f"--dataset must be one of {list(DATASETS)}, got {cfg.dataset!r}")
    if cfg.dataset in IMAGE_DATASETS and cfg.model in POINT_MODELS:
        _fail(f"--model {cfg.model} takes point clouds; {cfg.dataset} is an image dataset")
    images = cfg.model in IMAGE_MODELS
    if images and cfg.dataset not in IMAGE_DATASETS:
        _fail(f"--model {cfg.model} takes images; {cfg.dataset} is a point-cloud dataset (use --dataset rotmnist)")
    if images and _augmentations(cfg):
        _fail(f"--augment {cfg.augment} applies to point clouds; --model {cfg.model} takes images (use 'none')")
    if images and (isinstance(cfg.group, bool) or not isinstance(cfg.group, int) or cfg.group < 1):
        _fail(f"--group must be an int N >= 1 (C_N), got {cfg.group!r}")
    if cfg.dataset == "modelnet40":
        if not cfg.data_root:
            _fail("--dataset modelnet40 needs --data-root (a modelnet40_ply_hdf5_2048 or "
                  "modelnet40_normal_resampled directory)")
        if not os.path.exists(cfg.data_root):
            _fail(f"--data-root {cfg.data_root} does not exist")
    for name in ("train_rotation", "test_rotation"):
        if getattr(cfg, name) not in ROTATIONS:
            _fail(f"--{name.replace('_', '-')} must be one of {list(ROTATIONS)}, got {getattr(cfg, name)!r}")
    for name in ("epochs", "batch_size", "eval_batch_size") + (() if images else ("num_points", "k")):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            _fail(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if not images and cfg.k > cfg.num_points:
        _fail(f"--k {cfg.k} neighbours needs at least as many points, got --num-points {cfg.num_points}")
    if cfg.batch_size % world:
        _fail(f"--batch-size {cfg.batch_size} (global) must divide evenly over {world} processes")
    if cfg.batch_size // world < 2:
        _fail(f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world} sample(s) per process; "
              "batch norm needs at least 2")
    if not cfg.width > 0:
        _fail(f"--width must be positive, got {cfg.width}")
    if not 0 <= cfg.dropout < 1:
        _fail(f"--dropout must be in [0, 1), got {cfg.dropout}")
    for a in _augmentations(cfg):
        if a not in AUGMENTATIONS:
            _fail(f"--augment takes a comma list of {list(AUGMENTATIONS)} or 'none', got {a!r}")
    if cfg.optimizer not in ("adam", "sgd"):
        _fail(f"--optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("step", "cosine", "none"):
        _fail(f"--lr-schedule must be 'step', 'cosine' or 'none', got {cfg.lr_schedule!r}")
    for name in ("lr", "weight_decay", "lambda_ld", "lambda_n", "theta_max"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= (0 if name != "lr" else 1e-300)):
            _fail(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    if cfg.theta_schedule not in SCHEDULES:
        _fail(f"--theta-schedule must be one of {sorted(SCHEDULES)}, got {cfg.theta_schedule!r}")
    if cfg.theta_unit not in ("step", "epoch"):
        _fail(f"--theta-unit must be 'step' or 'epoch', got {cfg.theta_unit!r}")
    if cfg.reduction not in REDUCTIONS:
        _fail(f"--reduction must be one of {list(REDUCTIONS)}, got {cfg.reduction!r}")
    if cfg.relax_init not in ("zeros", "default"):
        _fail(f"--relax-init must be 'zeros' or 'default', got {cfg.relax_init!r}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        _fail(f"--device must be 'cpu' or 'cuda[:i]', got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {cfg.device}: torch sees no CUDA GPU on this machine")
    from ..backend import BACKENDS
    if cfg.backend is not None and cfg.backend not in BACKENDS:
        _fail(f"--backend must be one of {list(BACKENDS)}, got {cfg.backend!r}")
    if cfg.dtype not in ("float32", "float64"):
        _fail(f"--dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    if cfg.clip_grad_norm is not None and not (math.isfinite(cfg.clip_grad_norm) and cfg.clip_grad_norm > 0):
        _fail(f"--clip-grad-norm must be a finite number > 0, got {cfg.clip_grad_norm!r}")
    if cfg.threads is not None and cfg.threads < 1:
        _fail(f"--threads must be >= 1, got {cfg.threads}")


def _augmentations(cfg: TrainConfig) -> list[str]:
    return [] if cfg.augment in ("", "none") else [a.strip() for a in cfg.augment.split(",")]
