"""The configuration of a run: every setting (TrainConfig), the paper setups that fill what is unset,
and validation that names the bad argument in one line before anything is built."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..models import RELAXED_MAPS
from ..nn import PROJECTION_MODES, RELAX_SPACES, check_choice
from ..regularizer import REDUCTIONS
from ..relaxation import SCHEDULES

# --theta-schedule: a hand schedule, "dual": per-layer θ learnt under the constraint θ = 0 (relaxation.DualTheta),
# or "elastic": the same under |θ_ℓ| <= a priced slack, the model keeps its relaxation (relaxation.ElasticTheta)
LEARNT_THETA = ("dual", "elastic")
THETA_SCHEDULES = tuple(sorted(SCHEDULES)) + LEARNT_THETA

POINT_MODELS = ("vn_pointnet", "vn_dgcnn")
IMAGE_MODELS = ("steerable_cnn",)
GRAPH_MODELS = ("egnn", "segnn", "se3_transformer")  # N-body regressors: (positions, velocities, charges) → positions
FLOW_MODELS = ("cnn", "equiv", "rsteer")  # velocity-field forecasters (smoke plumes)
MODELS = POINT_MODELS + IMAGE_MODELS + GRAPH_MODELS + FLOW_MODELS
IMAGE_DATASETS = ("rotmnist",)
GRAPH_DATASETS = ("nbody",)
FLOW_DATASETS = ("smoke",)
DEFECT_MODES = ("data", "weight")
# test splits a task reports beside "test", by metric: the smoke forecasts' test-domain simulations
EXTRA_TESTS = {"rmse": ("test_domain",)}
ROTATIONS = ("aligned", "z", "so3")
AUGMENTATIONS = ("dropout", "scale", "shift", "jitter")


def metric_fields(metric: str = "acc") -> tuple[str, ...]:
    """metrics.csv's columns for a task whose metric is ``metric`` ("acc", "mse" or "rmse")."""
    tests = ("test",) + EXTRA_TESTS.get(metric, ())
    return ("epoch", "step", "lr", "theta", "train_loss", f"train_{metric}", "reg_loss", "r_ld", "r_n",
            f"val_{metric}", f"val_{metric}_projected",
            *(f"{t}_{metric}{p}" for t in tests for p in ("", "_projected")), "projection_error", "epoch_seconds")


# The paper's setups, from its public code (github StefanosPert/Equivariant_Optimization_CR,
# PCClassification/): optimiser, lr schedule, batch, points; θ per epoch on a triangle 0 → 1 → 0; the
# regulariser λ (√ΣR_LD + √ΣR_N), θ-scaled for VN-DGCNN; the relaxation init; which maps are relaxed
# ("paper": VNStdFeature's last map not relaxed, direction maps without relaxation bias); the loader's
# augmentation (anisotropic scale, shift) and the loop's after the rotation (point dropout, isotropic
# scale, smaller shift); label smoothing for VN-DGCNN. Explicit arguments override every value.
PAPER_SETUPS = {
    "vn_pointnet": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4, lr_schedule="step", lr_step=20,
                        lr_gamma=0.7, batch_size=24, num_points=300, dropout=0.4,
                        theta_schedule="triangle", theta_unit="epoch", lambda_ld=1e-2, lambda_n=1e-2,
                        theta_scaled_lambda=False, relax_init="zeros", relaxed_maps="paper",
                        augment="scale,shift", augment_rotated="dropout,scale,shift", label_smoothing=0.0),
    "vn_dgcnn": dict(optimizer="sgd", lr=0.1, weight_decay=1e-4, lr_schedule="cosine", momentum=0.9,
                     batch_size=32, num_points=300, dropout=0.5,
                     theta_schedule="triangle", theta_unit="epoch", lambda_ld=5e-4, lambda_n=5e-4,
                     theta_scaled_lambda=True, relax_init="default", relaxed_maps="paper",
                     augment="scale,shift", augment_rotated="dropout,scale,shift", label_smoothing=0.2),
    # Steerable CNN on RotMNIST (Weiler & Cesa 2019 style; not in the paper's code): Adam 1e-3, batch 64,
    # small weight decay; θ held at 1 then linear to 0 per step (short image runs: a per-epoch triangle
    # over a few epochs leaves θ near 0), λ_N below λ_LD until the study sets them.
    "steerable_cnn": dict(optimizer="adam", lr=1e-3, weight_decay=1e-5, lr_schedule="cosine", batch_size=64,
                          dropout=0.3, group=8, theta_schedule="hold_linear", theta_unit="step", lambda_ld=1e-2,
                          lambda_n=1e-3, theta_scaled_lambda=False, relax_init="zeros", relaxed_maps="all",
                          augment="none", augment_rotated="none", label_smoothing=0.0),
    # N-body regressors (issue 14): Adam 5e-4, weight decay 1e-12, batch 100 as the EGNN / SEGNN N-body
    # experiments are described (not line-checked against their code); θ per epoch on the triangle (the
    # relaxation code's --cycle); no rotation of the data (the published benchmark's); λ ours.
    **{m: dict(optimizer="adam", lr=5e-4, weight_decay=1e-12, lr_schedule="none", batch_size=100, dropout=0.0,
               theta_schedule="triangle", theta_unit="epoch", lambda_ld=1e-2, lambda_n=1e-2,
               theta_scaled_lambda=False, relax_init="zeros", relaxed_maps="all", augment="none",
               augment_rotated="none", label_smoothing=0.0, train_rotation="aligned", test_rotation="aligned")
       for m in GRAPH_MODELS},
    # smoke-plume forecasters: the public 2DFlow code (run_model.py, utils.py): Adam 1e-3, weight decay 4e-4,
    # StepLR every epoch × 0.95, batch 16, C_4; θ per epoch on the triangle, the relaxation branch at nn.Conv2d's
    # init; its regulariser 0.01 (‖B‖ + ‖B − rot90 B‖) per layer is weight-based: ours is λ (√Σ‖D(B)‖² + √Σ‖B‖²)
    # with the exact defect D (weight mode), λ = 0.01. No rotation of the data: the symmetry break is the point.
    **{m: dict(optimizer="adam", lr=1e-3, weight_decay=4e-4, lr_schedule="step", lr_step=1, lr_gamma=0.95,
               batch_size=16, dropout=0.0, group=4, theta_schedule="triangle", theta_unit="epoch", lambda_ld=1e-2,
               lambda_n=1e-2, theta_scaled_lambda=False, relax_init="default", relaxed_maps="all", defect="weight",
               augment="none", augment_rotated="none", label_smoothing=0.0, train_rotation="aligned",
               test_rotation="aligned")
       for m in FLOW_MODELS},
}
# The public code's augmentations are for ModelNet40. The embedded shapes are told apart by their axis
# ratios (sphere / ellipsoids, cube / boxes): an anisotropic scale of 2/3–3/2 changes the class, so
# on them nothing is augmented unless asked for.
DATASET_SETUPS = {"shapes": dict(augment="none", augment_rotated="none")}
# what is left unset by a model's setup (an unknown model is refused by validate)
GENERIC_DEFAULTS = dict(train_rotation="so3", test_rotation="so3", optimizer="adam", lr=1e-3, weight_decay=0.0,
                        lr_schedule="none", lr_step=20, lr_gamma=0.7, batch_size=32, num_points=1024, dropout=0.5,
                        group=8, theta_schedule="triangle", theta_unit="epoch", lambda_ld=1e-2, lambda_n=1e-2,
                        theta_scaled_lambda=False, relax_init="zeros", relaxed_maps="all", defect="data",
                        augment="none", augment_rotated="none", label_smoothing=0.0)


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
    train_rotation: Optional[str] = None
    test_rotation: Optional[str] = None
    epochs: int = 10
    batch_size: Optional[int] = None
    num_points: Optional[int] = None
    k: int = 20
    width: float = 1.0
    group: Optional[int] = None
    smoke_preset: str = "tiny"
    rsteer_alpha: float = 1e-5
    dropout: Optional[float] = None
    n_train: Optional[int] = None
    n_test: Optional[int] = None
    layers: Optional[int] = None  # depth: egnn / segnn message-passing layers, se3_transformer blocks (None: default)
    norm_diff: bool = False  # egnn: normalised coordinate differences (EGNN-vel's norm_diff option)
    augment: Optional[str] = None
    augment_rotated: Optional[str] = None
    label_smoothing: Optional[float] = None
    val_fraction: float = 0.0
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    lr_schedule: Optional[str] = None
    lr_step: Optional[int] = None
    lr_gamma: Optional[float] = None
    plain: bool = False
    theta_schedule: Optional[str] = None
    theta_max: float = 1.0
    theta_init: float = 1.0
    dual_lr: float = 1.0
    slack_cost: float = 1.0
    theta_lr: Optional[float] = None
    theta_unit: Optional[str] = None
    lambda_ld: Optional[float] = None
    lambda_n: Optional[float] = None
    reduction: str = "paper"
    relax_space: str = "full"
    projection: str = "drop"
    theta_scaled_lambda: Optional[bool] = None
    relax_init: Optional[str] = None
    relaxed_maps: Optional[str] = None
    defect: Optional[str] = None
    relax_lr: str = "same"
    clip_grad_norm: Optional[float] = None
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    threads: Optional[int] = None
    backend: Optional[str] = None
    compile: Optional[str] = None
    amp: Optional[str] = None
    run_dir: Optional[str] = None
    runs_root: str = "runs"
    eval_batch_size: int = 64
    progress: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the model's paper setup (then the dataset's) filled in where this config says None."""
        cfg = dataclasses.replace(self)
        setups = {**GENERIC_DEFAULTS, **PAPER_SETUPS.get(cfg.model, {}), **DATASET_SETUPS.get(cfg.dataset, {})}
        for key, value in setups.items():
            if getattr(cfg, key) is None:
                setattr(cfg, key, value)
        return cfg


# 'auto': CUDA graphs on CUDA (the step is bound by launching small kernels), plain inductor on CPU
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# --amp: the autocast dtype of the training step (the parameters, the optimiser and evaluation stay float32)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _fail(msg: str):
    raise ConfigError(msg)


def _check_choice(cfg: TrainConfig, field: str, choices):
    """A ConfigError naming the flag (--relax-space for relax_space) unless ``cfg.<field>`` is in ``choices``."""
    check_choice(getattr(cfg, field), choices, "--" + field.replace("_", "-"), ConfigError)


# models with a depth setting (--layers) and their default depth
DEPTH_MODELS = {"egnn": 4, "segnn": 4, "se3_transformer": 2}


def training_set_size(cfg: TrainConfig) -> Optional[int]:
    """The number of training samples the dataset has, where that is known without reading it (N-body's
    simulated split, RotMNIST-5k's 5000 digits less the test set), else None."""
    if cfg.dataset == "nbody":
        from ..data import nbody
        return nbody.SIZES["train"]
    if cfg.dataset == "rotmnist" and not cfg.data_root:
        return 5000 - (1000 if cfg.n_test is None else cfg.n_test)
    return None


def _validate_size_and_depth(cfg: TrainConfig) -> None:
    """--n-train: a positive int, at most the training set, leaving at least one batch after the validation split;
    --layers: a positive int, for a model that has a depth setting."""
    if cfg.n_train is not None:
        n = cfg.n_train
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            _fail(f"--n-train must be a positive integer, got {n!r}")
        size = training_set_size(cfg)
        if size is not None and n > size:
            _fail(f"--n-train {n} is larger than the {cfg.dataset} training set ({size} samples)")
        if cfg.dataset == "shapes":  # whole classes: the procedural set rounds to a multiple of its classes
            from ..data.shapes import SHAPE_CLASSES
            n = max(1, round(n / len(SHAPE_CLASSES))) * len(SHAPE_CLASSES)
        kept = n - round(cfg.val_fraction * n)
        if kept < cfg.batch_size:
            _fail(f"--n-train {cfg.n_train} leaves {kept} training samples after the validation split, fewer than one "
                  f"batch (--batch-size {cfg.batch_size})")
    if cfg.layers is not None:
        if isinstance(cfg.layers, bool) or not isinstance(cfg.layers, int) or cfg.layers < 1:
            _fail(f"--layers must be a positive integer, got {cfg.layers!r}")
        if cfg.model not in DEPTH_MODELS:
            _fail(f"--layers {cfg.layers}: --model {cfg.model} has no depth setting (--layers sets the message-passing "
                  f"layers or blocks of {', '.join(DEPTH_MODELS)})")


def validate(cfg: TrainConfig, world: int = 1) -> None:
    """One-line ConfigError for anything that cannot work, before any data or model is built."""
    from ..data import DATASETS as CLASSIFICATION_DATASETS
    datasets = CLASSIFICATION_DATASETS + GRAPH_DATASETS + FLOW_DATASETS
    _check_choice(cfg, "model", MODELS)
    _check_choice(cfg, "dataset", datasets)
    flows = cfg.model in FLOW_MODELS
    if flows != (cfg.dataset in FLOW_DATASETS):
        _fail(f"--model {cfg.model} and --dataset {cfg.dataset} do not go together: the smoke-plume forecasts "
              f"(--dataset {FLOW_DATASETS[0]}) are learnt by --model {' or '.join(FLOW_MODELS)}, and only that task")
    if flows:
        _validate_flow(cfg)
    if cfg.dataset in IMAGE_DATASETS and cfg.model in POINT_MODELS:
        _fail(f"--model {cfg.model} takes point clouds; {cfg.dataset} is an image dataset")
    graphs = cfg.model in GRAPH_MODELS
    if graphs != (cfg.dataset in GRAPH_DATASETS):
        _fail(f"--model {cfg.model} and --dataset {cfg.dataset} do not go together: the N-body task "
              f"(--dataset {GRAPH_DATASETS[0]}) is learnt by --model {' or '.join(GRAPH_MODELS)}, and only that task")
    if graphs and cfg.val_fraction:
        _fail(f"--val-fraction {cfg.val_fraction}: --dataset nbody has its own validation split (set it to 0)")
    if graphs and _augmentations(cfg.augment) + _augmentations(cfg.augment_rotated):
        _fail(f"--augment / --augment-rotated apply to point clouds; --model {cfg.model} takes N-body systems "
              "(only the rotation protocol applies)")
    images = cfg.model in IMAGE_MODELS
    if images and cfg.dataset not in IMAGE_DATASETS:
        _fail(f"--model {cfg.model} takes images; {cfg.dataset} is a point-cloud dataset (use --dataset rotmnist)")
    for flag, value in (("--augment", cfg.augment), ("--augment-rotated", cfg.augment_rotated)):
        if images and _augmentations(value):
            _fail(f"{flag} {value} applies to point clouds; --model {cfg.model} takes images (use 'none')")
        for a in _augmentations(value):
            if a not in AUGMENTATIONS:
                _fail(f"{flag} takes a comma list of {list(AUGMENTATIONS)} or 'none', got {a!r}")
    if (images or flows) and (isinstance(cfg.group, bool) or not isinstance(cfg.group, int) or cfg.group < 1 + flows):
        _fail(f"--group must be an int N >= {1 + flows} (C_N), got {cfg.group!r}")
    if cfg.norm_diff is not False:
        if cfg.norm_diff is not True:
            _fail(f"--norm-diff must be a bool, got {cfg.norm_diff!r}")
        if cfg.model != "egnn":
            _fail(f"--norm-diff is an egnn setting (its normalised coordinate differences), not one of --model {cfg.model}")
    if cfg.dataset == "modelnet40":
        if not cfg.data_root:
            _fail("--dataset modelnet40 needs --data-root (a modelnet40_ply_hdf5_2048 or "
                  "modelnet40_normal_resampled directory)")
        if not os.path.exists(cfg.data_root):
            _fail(f"--data-root {cfg.data_root} does not exist")
    for name in ("train_rotation", "test_rotation"):
        _check_choice(cfg, name, ROTATIONS)
    points = cfg.model in POINT_MODELS
    for name in ("epochs", "batch_size", "eval_batch_size") + (("num_points", "k") if points else ()):
        v = getattr(cfg, name)
        if not isinstance(v, int) or v < 1:
            _fail(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
    if points and cfg.k > cfg.num_points:
        _fail(f"--k {cfg.k} neighbours needs at least as many points, got --num-points {cfg.num_points}")
    if cfg.batch_size % world:
        _fail(f"--batch-size {cfg.batch_size} (global) must divide evenly over {world} processes")
    if cfg.batch_size // world < 2 and not (graphs or flows):
        _fail(f"--batch-size {cfg.batch_size} gives {cfg.batch_size // world} sample(s) per process; "
              "batch norm needs at least 2")
    if not cfg.width > 0:
        _fail(f"--width must be positive, got {cfg.width}")
    _validate_size_and_depth(cfg)
    if not 0 <= cfg.dropout < 1:
        _fail(f"--dropout must be in [0, 1), got {cfg.dropout}")
    for name in ("label_smoothing", "val_fraction"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and 0 <= v < 1):
            _fail(f"--{name.replace('_', '-')} must be in [0, 1), got {v!r}")
    if cfg.relax_lr not in ("same", "theta"):
        _fail(f"--relax-lr must be 'same' or 'theta', got {cfg.relax_lr!r}")
    _check_choice(cfg, "relaxed_maps", RELAXED_MAPS)
    if cfg.optimizer not in ("adam", "sgd"):
        _fail(f"--optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
    if cfg.lr_schedule not in ("step", "cosine", "none"):
        _fail(f"--lr-schedule must be 'step', 'cosine' or 'none', got {cfg.lr_schedule!r}")
    if isinstance(cfg.lr_step, bool) or not isinstance(cfg.lr_step, int) or cfg.lr_step < 1:
        _fail(f"--lr-step must be a positive integer (epochs), got {cfg.lr_step!r}")
    if not (isinstance(cfg.lr_gamma, (int, float)) and 0 < cfg.lr_gamma <= 1):
        _fail(f"--lr-gamma must be in (0, 1], got {cfg.lr_gamma!r}")
    for name in ("lr", "weight_decay", "lambda_ld", "lambda_n", "theta_max"):
        v = getattr(cfg, name)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= (0 if name != "lr" else 1e-300)):
            _fail(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}, got {v!r}")
    _check_choice(cfg, "theta_schedule", THETA_SCHEDULES)
    if cfg.theta_schedule in LEARNT_THETA:
        for name in ("theta_init", "dual_lr"):
            v = getattr(cfg, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and (v >= 0 or name == "theta_init")):
                _fail(f"--{name.replace('_', '-')} must be a finite number{' >= 0' if name == 'dual_lr' else ''}, "
                      f"got {v!r}")
        if cfg.relax_lr != "same":
            _fail(f"--relax-lr theta scales the relaxation's lr by one global θ; --theta-schedule {cfg.theta_schedule} "
                  "learns one θ per layer (use --relax-lr same)")
        if cfg.theta_scaled_lambda:
            _fail(f"--theta-scaled-lambda scales λ by one global θ; --theta-schedule {cfg.theta_schedule} learns one θ "
                  "per layer (use --no-theta-scaled-lambda)")
    if cfg.theta_lr is not None:
        if cfg.theta_schedule not in LEARNT_THETA:
            _fail(f"--theta-lr is the learning rate of learnt θ_ℓ (--theta-schedule dual / elastic); "
                  f"--theta-schedule {cfg.theta_schedule} schedules θ")
        if not (isinstance(cfg.theta_lr, (int, float)) and math.isfinite(cfg.theta_lr) and cfg.theta_lr > 0):
            _fail(f"--theta-lr must be a finite number > 0, got {cfg.theta_lr!r}")
    if cfg.theta_schedule == "elastic":
        v = cfg.slack_cost
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            _fail(f"--slack-cost must be a finite number > 0, got {v!r}")
        if not cfg.dual_lr < 2 * v:
            # μ ← μ (1 − η/α) + η θ²: the multipliers oscillate and collapse to 0 unless η < 2α
            _fail(f"--theta-schedule elastic needs --dual-lr < 2 × --slack-cost (the dual step is stable only then), "
                  f"got --dual-lr {cfg.dual_lr!r} and --slack-cost {v!r}")
    if cfg.theta_unit not in ("step", "epoch"):
        _fail(f"--theta-unit must be 'step' or 'epoch', got {cfg.theta_unit!r}")
    _check_choice(cfg, "reduction", REDUCTIONS)
    _check_choice(cfg, "relax_space", RELAX_SPACES)
    _check_choice(cfg, "projection", PROJECTION_MODES)
    _check_choice(cfg, "defect", DEFECT_MODES)
    if cfg.relax_init not in ("zeros", "default"):
        _fail(f"--relax-init must be 'zeros' or 'default', got {cfg.relax_init!r}")
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        _fail(f"--device must be 'cpu' or 'cuda[:i]', got {cfg.device!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        _fail(f"--device {cfg.device}: torch sees no CUDA GPU on this machine")
    from ..backend import BACKENDS
    if cfg.backend is not None:
        _check_choice(cfg, "backend", BACKENDS)
    if cfg.dtype not in ("float32", "float64"):
        _fail(f"--dtype must be 'float32' or 'float64', got {cfg.dtype!r}")
    if cfg.clip_grad_norm is not None and not (math.isfinite(cfg.clip_grad_norm) and cfg.clip_grad_norm > 0):
        _fail(f"--clip-grad-norm must be a finite number > 0, got {cfg.clip_grad_norm!r}")
    if cfg.threads is not None and cfg.threads < 1:
        _fail(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.amp is not None:
        _check_choice(cfg, "amp", AMP_DTYPES)
        if cfg.dtype != "float32":
            _fail(f"--amp needs --dtype float32 (autocast never lowers float64), got --dtype {cfg.dtype}")
        if cfg.amp == "fp16" and not cfg.device.startswith("cuda"):
            _fail("--amp fp16 needs --device cuda (float16 training needs a grad scaler, a CUDA recipe); "
                  "on CPU use --amp bf16")
    if cfg.compile is not None:
        _check_choice(cfg, "compile", COMPILE_MODES)
        if world > 1:
            _fail("--compile is single-process for now: under torchrun drop --compile")


def _validate_flow(cfg: TrainConfig) -> None:
    """The smoke-plume task's own rules (its data come with their validation split; nothing is rotated)."""
    from ..data.smoke import PRESETS
    if cfg.model == "cnn" and not cfg.plain:
        _fail("--model cnn has no symmetry to relax: add --plain (relaxation needs --model equiv or rsteer)")
    _check_choice(cfg, "smoke_preset", sorted(PRESETS))
    if cfg.val_fraction:
        _fail(f"--val-fraction {cfg.val_fraction}: --dataset smoke has its own validation frames (set it to 0)")
    if _augmentations(cfg.augment) + _augmentations(cfg.augment_rotated):
        _fail(f"--augment / --augment-rotated apply to point clouds; --model {cfg.model} takes velocity fields")
    for name in ("train_rotation", "test_rotation"):
        if getattr(cfg, name) != "aligned":
            _fail(f"--{name.replace('_', '-')} {getattr(cfg, name)}: the smoke plumes are not rotated (their "
                  "symmetry break is the point); use 'aligned'")
    if not (isinstance(cfg.rsteer_alpha, (int, float)) and math.isfinite(cfg.rsteer_alpha) and cfg.rsteer_alpha >= 0):
        _fail(f"--rsteer-alpha must be a finite number >= 0, got {cfg.rsteer_alpha!r}")


def _augmentations(spec: Optional[str]) -> list[str]:
    """'scale,shift' → ['scale', 'shift']; 'none', '' or None → []."""
    return [] if spec in (None, "", "none") else [a.strip() for a in spec.split(",")]
