"""Train an equivariant classifier by constraint relaxation from the command line.

    relaxeq-train --model vn_pointnet --dataset shapes --epochs 8            # relaxed (the default)
    relaxeq-train --model vn_pointnet --dataset shapes --epochs 8 --plain    # the unrelaxed baseline
    relaxeq-train --dataset modelnet40 --data-root ~/data/modelnet40_ply_hdf5_2048 --train-rotation z
    relaxeq-train --model steerable_cnn --dataset rotmnist --epochs 20        # C_8 steerable CNN on RotMNIST-5k
    relaxeq-train --resume runs/<run>                                         # continue an interrupted run
    torchrun --nproc-per-node 2 -m relaxeq_fast.train ...                    # data parallel (gloo / nccl)

What a run does: trains with θ on every relaxed layer following the θ schedule (exactly 0 at the end)
and the closed-form Lie-derivative / norm regularisers in the loss, evaluates every epoch, projects the
model to an exactly equivariant one, and reports that model's test accuracy and equivariance error.

The run directory holds config.json, metrics.csv (one row per epoch), checkpoint.pt (written after
every epoch, atomically, and only when every loss of the epoch was finite), model_projected.pt, the
plot training.png and summary.json. Resuming from checkpoint.pt reproduces the uninterrupted run's
metrics exactly on CPU: model, optimiser, lr and θ schedules, and every random generator (data order,
augmentation, dropout) are restored. Under torchrun every rank takes its slice of the same global
batch; batch-norm and regulariser statistics are those of the global batch (see
:mod:`relaxeq_fast.distributed`), so the result matches one process up to floating-point reduction
order (use --dtype float64 to compare), except for dropout masks (set --dropout 0 to compare).

Images (--model steerable_cnn, --dataset rotmnist): the rotation protocol maps aligned / z / so3 to
none / a random rotation / a random rotation of each image (the plane has one rotation axis, so z and
so3 coincide), by bilinear interpolation about the image centre (data.augment.rotate_images). The
RotMNIST digits are already rotated; a test rotation re-rotates the fixed test set once, by seeded
angles. The point augmentations (--augment) do not apply to images. The final equivariance error of
an image model is its invariance to exact quarter turns (torch.rot90: pixel permutations, to which a
C_N model with 4 | N is exactly invariant), not to interpolated rotations.
"""
from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn

from . import distributed as D
from .regularizer import REDUCTIONS, combine_regularizers
from .relaxation import SCHEDULES, ThetaScheduler, make_schedule, projection_error
from .vn import equivariance_error, model_regularizers, project, relaxed_layers

__all__ = ["TrainConfig", "ConfigError", "NonFiniteLossError", "MODELS", "PAPER_SETUPS", "train", "main",
           "build_model", "parse_args"]

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
    from .data import DATASETS
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
    from .backend import BACKENDS
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


def _augment_batch(x: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """The listed augmentations in a fixed order (dropout, scale, shift, jitter), then the rotation.

    Point dropout duplicates points exactly; at a point whose k neighbours are all its copies every
    VN feature is rank 1, and VN batch norm then multiplies sideways changes — which only the relaxed
    branch can make — by |BN|/(‖x‖ + ε), up to ~1e6: the relaxed weights' task gradient explodes.
    Jitter applied after the dropout removes the exact duplicates; --clip-grad-norm bounds the step.
    """
    from .data import augment
    if cfg.model in IMAGE_MODELS:
        return _rotate_images(x, cfg.train_rotation, gen)
    chosen = set(_augmentations(cfg))
    if "dropout" in chosen:
        x = augment.point_dropout(x, generator=gen)
    if "scale" in chosen:
        x = augment.anisotropic_scale(x, generator=gen)
    if "shift" in chosen:
        x = augment.shift(x, generator=gen)
    if "jitter" in chosen:
        x = augment.jitter(x, generator=gen)
    return augment.rotate(x, cfg.train_rotation, generator=gen)


def _rotate_images(x: torch.Tensor, rotation: str, gen: torch.Generator) -> torch.Tensor:
    """The image rotation protocol: aligned → unchanged; z, so3 → each image by its own angle ~ U[0, 2π)."""
    from .data import augment
    return x if rotation == "aligned" else augment.random_rotate_images(x, generator=gen)


def build_model(cfg: TrainConfig, num_classes: int) -> nn.Module:
    """The classifier of ``cfg.model``, relaxed unless ``cfg.plain``."""
    from .models import VNDGCNN, SteerableCNN, VNPointNet
    relax_kwargs = dict(relax_init=cfg.relax_init, theta=cfg.theta_max, backend=cfg.backend)
    if cfg.model == "steerable_cnn":
        return SteerableCNN(num_classes=num_classes, group=cfg.group, relaxed=not cfg.plain, width=cfg.width,
                            dropout=cfg.dropout, relax_kwargs=relax_kwargs)
    cls = {"vn_pointnet": VNPointNet, "vn_dgcnn": VNDGCNN}[cfg.model]
    return cls(num_classes=num_classes, k=cfg.k, relaxed=not cfg.plain, relax_kwargs=relax_kwargs,
               dropout=cfg.dropout, width=cfg.width)


# ---- data -------------------------------------------------------------------------------------------

def _load_data(cfg: TrainConfig):
    from .data import augment, load_dataset
    try:
        train, test = load_dataset(cfg.dataset, cfg.data_root, num_points=cfg.num_points, seed=cfg.seed,
                                   n_train=cfg.n_train, n_test=cfg.n_test)
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise ConfigError(f"{cfg.dataset}: {str(e).splitlines()[0]}") from e
    if cfg.batch_size > len(train.y):
        _fail(f"--batch-size {cfg.batch_size} is larger than the training set ({len(train.y)} samples)")
    # the test set is rotated once, by rotations fixed by the seed: every epoch sees the same test set
    gen = torch.Generator().manual_seed(cfg.seed + 7919)
    dtype = getattr(torch, cfg.dtype)
    if cfg.model in IMAGE_MODELS:
        test_x = _rotate_images(test.x.to(dtype), cfg.test_rotation, gen)
    else:
        test_x = augment.rotate(test.x.to(dtype), cfg.test_rotation, generator=gen)
    return train._replace(x=train.x.to(dtype)), test._replace(x=test_x.contiguous())


# ---- evaluation --------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> float:
    """Accuracy in eval mode; every rank evaluates its strided share and the counts are summed."""
    was_training = model.training
    model.eval()
    r, w = D.rank(), D.world_size()
    correct = torch.zeros(2, dtype=torch.float64)
    idx = torch.arange(r, len(y), w)
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        pred = model(x[b].to(device)).argmax(dim=-1).cpu()
        correct += torch.tensor([(pred == y[b]).sum().item(), len(b)], dtype=torch.float64)
    if D.is_distributed():
        torch.distributed.all_reduce(correct)
    model.train(was_training)
    return (correct[0] / correct[1]).item()


# ---- checkpoints and outputs ------------------------------------------------------------------------

def _atomic_save(obj, path: str):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_metrics(path: str, history: list[dict]):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        w.writeheader()
        for row in history:
            w.writerow({k: row[k] for k in METRIC_FIELDS})
    os.replace(tmp, path)


def plot_history(history: list[dict], path: str, title: str = "") -> Optional[str]:
    """training.png: loss, accuracy, θ and lr, regulariser terms, projection error per epoch."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ep = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ax = axes[0, 0]
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train loss (task + reg.)")
    ax.plot(ep, [h["reg_loss"] for h in history], "s--", label="regulariser term of the loss")
    ax.set_title("loss"), ax.legend(fontsize=8)
    ax = axes[0, 1]
    ax.plot(ep, [h["train_acc"] for h in history], "o-", label="train")
    ax.plot(ep, [h["test_acc"] for h in history], "s-", label="test (current θ)")
    ax.set_ylim(0, 1), ax.set_title("accuracy"), ax.legend(fontsize=8)
    ax = axes[0, 2]
    ax.plot(ep, [h["theta"] for h in history], "o-", color="C3")
    ax.set_title("θ at the end of the epoch")
    ax = axes[1, 0]
    for key, label in (("r_ld", "R_LD (Σ over layers)"), ("r_n", "R_N (Σ over layers)")):
        vals = [h[key] for h in history]
        ax.plot(ep, vals, "o-", label=label)
    if any(h[k] > 0 for h in history for k in ("r_ld", "r_n")):
        ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_title("regulariser terms (epoch mean)"), ax.legend(fontsize=8)
    ax = axes[1, 1]
    pe = [h["projection_error"] for h in history]
    ax.plot(ep, pe, "o-", color="C4")
    if any(v > 0 for v in pe):
        ax.set_yscale("symlog", linthresh=1e-8)
    ax.set_title("projection error ‖f_θ − f_proj‖ / ‖f_proj‖")
    ax = axes[1, 2]
    ax.plot(ep, [h["lr"] for h in history], "o-", color="C5")
    ax.set_title("learning rate")
    for a in axes.flat:
        a.set_xlabel("epoch"), a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ---- the run ----------------------------------------------------------------------------------------

def _make_run_dir(cfg: TrainConfig) -> str:
    if cfg.run_dir:
        return cfg.run_dir
    stamp = time.strftime("%Y%m%d-%H%M%S")
    kind = "plain" if cfg.plain else "relaxed"
    return os.path.join(cfg.runs_root, f"{cfg.model}-{cfg.dataset}-{kind}-s{cfg.seed}-{stamp}")


def _setup_distributed(cfg: TrainConfig):
    """Initialise the process group when launched by torchrun; returns the device."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        if cfg.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            torch.distributed.init_process_group("nccl")
            return torch.device("cuda", local)
        torch.distributed.init_process_group("gloo")
    return torch.device(cfg.device)


def train(cfg: TrainConfig, resume: Optional[str] = None, stop_after: Optional[int] = None) -> dict:
    """Run (or resume) a training; returns the summary (also written to summary.json).

    resume: a run directory with checkpoint.pt; the config is read from its config.json.
    stop_after: stop after this many epochs of this call, as if interrupted (checkpoint kept).
    """
    if resume is not None:
        if not os.path.isfile(os.path.join(resume, "config.json")):
            _fail(f"--resume {resume}: no config.json there")
        with open(os.path.join(resume, "config.json")) as f:
            cfg = TrainConfig(**{**json.load(f), "run_dir": resume, "progress": cfg.progress})
    cfg = cfg.resolved()
    # before a process group or a device is made from the config (a bad --device would fail there)
    validate(cfg, D.world_size() if D.is_distributed() else int(os.environ.get("WORLD_SIZE", "1")))
    device = _setup_distributed(cfg)
    world, rank = D.world_size(), D.rank()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.seed)
    train_set, test_set = _load_data(cfg)

    model = build_model(cfg, num_classes=len(train_set.class_names)).to(device, getattr(torch, cfg.dtype))
    D.sync_batch_norms(model)
    relaxed = not cfg.plain
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    elif cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)
    steps_per_epoch = len(train_set.y) // cfg.batch_size  # the last partial batch is dropped
    total = cfg.epochs * steps_per_epoch if cfg.theta_unit == "step" else cfg.epochs
    theta = ThetaScheduler(model, make_schedule(cfg.theta_schedule, total, theta_max=cfg.theta_max)) \
        if relaxed else None
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
    history: list[dict] = []
    start_epoch, global_step = 0, 0

    run_dir = _make_run_dir(cfg)
    ckpt_path = os.path.join(run_dir, "checkpoint.pt")
    if resume is not None:
        if not os.path.isfile(ckpt_path):
            _fail(f"--resume {resume}: no checkpoint.pt there")
        ck = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["lr_schedule"])
        if theta is not None:
            theta.load_state_dict(ck["theta"])
        data_gen.set_state(ck["data_gen"])
        aug_gen.set_state(ck["aug_gen"])
        torch.set_rng_state(ck["torch_rng"])
        history, start_epoch, global_step = ck["history"], ck["epoch"], ck["step"]
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    net = model
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    local_batch = cfg.batch_size // world
    val_x = test_set.x[:cfg.eval_batch_size].to(device)
    show = cfg.progress and rank == 0
    epochs_run = 0
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epochs_run >= stop_after:
            break
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train_set.y), generator=data_gen)
        sums = torch.zeros(6, dtype=torch.float64)  # loss, reg, r_ld, r_n, correct, seen
        bar = range(steps_per_epoch)
        if show:
            from tqdm import tqdm
            bar = tqdm(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=True, dynamic_ncols=True, file=sys.stderr)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb = _augment_batch(train_set.x[idx], cfg, aug_gen)  # the global batch, then this rank's slice
            sl = slice(rank * local_batch, (rank + 1) * local_batch)
            x, y = xb[sl].to(device), train_set.y[idx][sl].to(device)
            out = net(x)
            task = TF.cross_entropy(out, y)
            reg = task.new_zeros(())
            r_ld = r_n = 0.0
            if relaxed:
                D.all_reduce_input_stats(model)
                D.all_reduce_conv_defects(model)
                terms = model_regularizers(model)
                th = theta.theta if cfg.theta_scaled_lambda else None
                reg = combine_regularizers(terms, cfg.lambda_ld, cfg.lambda_n, cfg.reduction, theta=th)
                r_ld = sum(t.lie_derivative.detach() for t in terms).item()
                r_n = sum(t.projection.detach() for t in terms).item()
            loss = task + reg
            stats = torch.tensor([loss.item(), reg.item(), r_ld, r_n, (out.argmax(-1) == y).sum().item(), len(y)],
                                 dtype=torch.float64)
            if D.is_distributed():
                torch.distributed.all_reduce(stats)
                stats[:4] /= world
            if not all(math.isfinite(v) for v in stats[:4].tolist()):
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch + 1}, step {step + 1} (task {task.item():.4g}, regulariser "
                    f"{reg.item():.4g}); lower --lr or the λs. {ckpt_path} still holds the last finite epoch")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
            opt.step()
            sums += stats
            global_step += 1
            if theta is not None and cfg.theta_unit == "step":
                theta.step()
            if show:
                n = step + 1
                bar.set_postfix(loss=f"{sums[0] / n:.3f}", acc=f"{sums[4] / sums[5]:.3f}",
                                θ=f"{theta.theta if theta else 0:.3f}", R_LD=f"{sums[2] / n:.2e}",
                                R_N=f"{sums[3] / n:.2e}", refresh=False)
        if theta is not None and cfg.theta_unit == "epoch":
            theta.step()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        n = max(steps_per_epoch, 1)
        test_acc = evaluate(model, test_set.x, test_set.y, cfg.eval_batch_size, device)
        proj_err = projection_error(model, val_x) if relaxed else 0.0
        row = dict(epoch=epoch + 1, step=global_step, lr=lr, theta=theta.theta if theta else 0.0,
                   train_loss=(sums[0] / n).item(), train_acc=(sums[4] / sums[5]).item(),
                   reg_loss=(sums[1] / n).item(), r_ld=(sums[2] / n).item(), r_n=(sums[3] / n).item(),
                   test_acc=test_acc, projection_error=proj_err, epoch_seconds=time.perf_counter() - t0)
        history.append(row)
        epochs_run += 1
        if show:
            print(f"  epoch {epoch + 1}: test acc {test_acc:.3f}, θ {row['theta']:.3f}, "
                  f"projection error {proj_err:.2e}", file=sys.stderr)
        if rank == 0:
            _atomic_save(dict(model=model.state_dict(), optimizer=opt.state_dict(), lr_schedule=sched.state_dict(),
                              theta=theta.state_dict() if theta else None, data_gen=data_gen.get_state(),
                              aug_gen=aug_gen.get_state(), torch_rng=torch.get_rng_state(), history=history,
                              epoch=epoch + 1, step=global_step, config=dataclasses.asdict(cfg)), ckpt_path)
            _write_metrics(os.path.join(run_dir, "metrics.csv"), history)
            plot_history(history, os.path.join(run_dir, "training.png"),
                         f"{cfg.model} on {cfg.dataset} ({'plain' if cfg.plain else 'relaxed'}), "
                         f"train {cfg.train_rotation} / test {cfg.test_rotation}")

    finished = len(history) == cfg.epochs
    summary = dict(run_dir=run_dir, epochs_done=len(history), finished=finished, relaxed=relaxed)
    if finished:
        final = project(copy.deepcopy(model)).eval() if relaxed else copy.deepcopy(model).eval()
        n_layers = sum(1 for _ in relaxed_layers(model))
        summary.update(
            test_acc_projected=evaluate(final, test_set.x, test_set.y, cfg.eval_batch_size, device),
            equivariance_error=_final_equivariance_error(final, val_x, cfg),
            relaxed_layers=n_layers, theta_final=theta.theta if theta else 0.0,
            seconds=sum(h["epoch_seconds"] for h in history))
        if rank == 0:
            torch.save(dict(model=final.state_dict(), config=dataclasses.asdict(cfg),
                            class_names=train_set.class_names), os.path.join(run_dir, "model_projected.pt"))
    if rank == 0:
        summary["plot"] = os.path.join(run_dir, "training.png")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _final_equivariance_error(model: nn.Module, x: torch.Tensor, cfg: TrainConfig) -> float:
    """Invariance error of the final classifier: random 3D rotations for point clouds; the exact
    quarter turns (torch.rot90) for images."""
    if cfg.model in IMAGE_MODELS:
        from .steerable import rot90_equivariance_error
        return rot90_equivariance_error(model, x)
    return equivariance_error(model, x, output="invariant", seed=cfg.seed)


def compare_runs(run_dirs: list[str], out_png: Optional[str] = None) -> str:
    """A table of finished runs (projected test accuracy, equivariance error, time) and, when
    ``out_png`` is given, their test accuracy and θ per epoch on one plot. Returns the table."""
    rows, histories = [], []
    for d in run_dirs:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(d, "metrics.csv")) as f:
            histories.append([{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)])
        label = "relaxed → projected" if s["relaxed"] else "plain"
        rows.append(f"| {label} | {s['test_acc_projected']:.3f} | {s['equivariance_error']:.1e} | "
                    f"{s['seconds']:.0f} s | {d} |")
    table = "\n".join(["| run | test accuracy (projected) | equivariance error | training time | run dir |",
                       "|---|---|---|---|---|", *rows])
    if out_png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for d, hist in zip(run_dirs, histories):
            ep = [h["epoch"] for h in hist]
            a1.plot(ep, [h["test_acc"] for h in hist], "o-", label=os.path.basename(os.path.normpath(d)))
            a2.plot(ep, [h["theta"] for h in hist], "o-", label=os.path.basename(os.path.normpath(d)))
        a1.set(title="test accuracy per epoch (current θ; last epoch θ = 0)", xlabel="epoch", ylim=(0, 1))
        a2.set(title="θ at the end of the epoch", xlabel="epoch")
        for a in (a1, a2):
            a.grid(alpha=0.3), a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_png, dpi=90)
        plt.close(fig)
    return table


# ---- command line -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="relaxeq-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help=f"one of {list(MODELS)}")
    g.add_argument("--dataset", default=d.dataset, help="shapes (embedded), modelnet40 (needs --data-root), rotmnist")
    g.add_argument("--data-root", default=None, help="directory of a local dataset copy")
    g.add_argument("--train-rotation", default=d.train_rotation, help=f"one of {list(ROTATIONS)}")
    g.add_argument("--test-rotation", default=d.test_rotation, help=f"one of {list(ROTATIONS)}")
    g.add_argument("--num-points", type=int, default=None, help="points per cloud (paper: 300)")
    g.add_argument("--k", type=int, default=d.k, help="nearest neighbours for edge features")
    g.add_argument("--width", type=float, default=d.width, help="channel multiplier (1 = published model)")
    g.add_argument("--group", type=int, default=d.group, help="steerable_cnn: the rotation group C_N (N)")
    g.add_argument("--dropout", type=float, default=None, help="head dropout (paper model: 0.4 / 0.5)")
    g.add_argument("--n-train", type=int, default=None, help="training samples (default: the dataset's)")
    g.add_argument("--n-test", type=int, default=None, help="test samples (default: the dataset's)")
    g.add_argument("--augment", default=d.augment,
                   help=f"comma list of {list(AUGMENTATIONS)} or 'none' (applied in that order, then the rotation)")
    g = p.add_argument_group("optimisation (unset: the paper's setup for --model)")
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--batch-size", type=int, default=None, help="global batch (paper: 24 / 32)")
    g.add_argument("--optimizer", default=None, help="adam or sgd")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    g.add_argument("--lr-schedule", default=None, help="step, cosine or none")
    g.add_argument("--lr-step", type=int, default=d.lr_step, help="StepLR period in epochs")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="StepLR factor")
    g = p.add_argument_group("relaxation")
    g.add_argument("--plain", action="store_true", help="train the unrelaxed equivariant model instead")
    g.add_argument("--theta-schedule", default=d.theta_schedule, help=f"one of {sorted(SCHEDULES)}")
    g.add_argument("--theta-max", type=float, default=d.theta_max)
    g.add_argument("--theta-unit", default=d.theta_unit, help="step the θ schedule per 'step' or per 'epoch'")
    g.add_argument("--lambda-ld", type=float, default=d.lambda_ld, help="weight of the Lie-derivative term")
    g.add_argument("--lambda-n", type=float, default=d.lambda_n, help="weight of the norm term")
    g.add_argument("--reduction", default=d.reduction, help=f"one of {list(REDUCTIONS)}")
    g.add_argument("--theta-scaled-lambda", action="store_true", help="scale the regulariser with θ")
    g.add_argument("--relax-init", default=d.relax_init, help="zeros or default (nn.Linear init of W_r)")
    g.add_argument("--clip-grad-norm", type=float, default=None,
                   help="clip the gradient norm (advised with --augment dropout without jitter)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:i")
    g.add_argument("--dtype", default=d.dtype, help="float32, or float64 (slow; for exact comparisons)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: cores / processes)")
    g.add_argument("--backend", default=None, help="kernel backend: native, triton, reference, auto")
    g.add_argument("--run-dir", default=None, help="output directory (default: runs/<model>-<data>-...)")
    g.add_argument("--runs-root", default=d.runs_root, help="parent of the default run directory")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (resumable), e.g. to split a long run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv=None) -> tuple[TrainConfig, Optional[str], Optional[int]]:
    ns = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields}, progress=not ns.no_progress)
    return cfg, ns.resume, ns.stop_after


def format_summary(s: dict) -> str:
    if not s.get("finished"):
        return f"stopped after {s['epochs_done']} epoch(s); resume with --resume {s['run_dir']}"
    kind = "relaxed → projected" if s["relaxed"] else "plain"
    return (f"{kind}: test accuracy {s['test_acc_projected']:.3f}, equivariance error "
            f"{s['equivariance_error']:.1e}, {s['seconds']:.0f} s of training; plots: {s['plot']}")


def main(argv=None) -> int:
    cfg, resume, stop_after = parse_args(argv)
    try:
        summary = train(cfg, resume=resume, stop_after=stop_after)
        if D.rank() == 0:
            print(f"[relaxeq-train] {format_summary(summary)}")
        return 0
    except (ConfigError, NonFiniteLossError) as e:
        print(f"relaxeq-train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
