"""The run: data-parallel set-up, the training step and epoch, evaluation, checkpoints, projection."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
from typing import Optional

import torch
import torch.nn.functional as TF
from torch import nn

from .. import distributed as D
from ..regularizer import combine_regularizers
from ..relaxation import ThetaScheduler, make_schedule, projection_error
from ..vn import equivariance_error, model_regularizers, project, relaxed_layers
from .build import _augment_batch, _load_data, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .config import IMAGE_MODELS, NonFiniteLossError, TrainConfig, _fail, validate
from .report import _write_metrics, plot_history

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


def _relaxation_parameters(layer: nn.Module) -> list:
    """W_r and b_r of a RelaxedLinear; B of a RelaxedR2Conv (every parameter the plain twin lacks)."""
    plain = {k for k, _ in layer.project().named_parameters()}
    return [p for k, p in layer.named_parameters() if k not in plain]


def resolved_config(cfg: TrainConfig, resume: Optional[str] = None) -> TrainConfig:
    """The configuration a run uses: ``cfg`` (or the resumed run's config.json) with the paper setup
    of its model filled in where unset."""
    if resume is not None:
        if not os.path.isfile(os.path.join(resume, "config.json")):
            _fail(f"--resume {resume}: no config.json there")
        with open(os.path.join(resume, "config.json")) as f:
            cfg = TrainConfig(**{**json.load(f), "run_dir": resume, "progress": cfg.progress})
    return cfg.resolved()


def best_epoch(history: list[dict]) -> dict:
    """The epoch with the best projected validation accuracy (the first of ties) and its projected test
    accuracy: model selection on the validation split, never on the test set. Empty without one."""
    scored = [h for h in history if not math.isnan(h["val_acc_projected"])]
    if not scored:
        return {}
    best = max(scored, key=lambda h: h["val_acc_projected"])  # max keeps the first of equal values
    return dict(best_epoch=best["epoch"], best_val_acc_projected=best["val_acc_projected"],
                best_test_acc_projected=best["test_acc_projected"])


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
    cfg = resolved_config(cfg, resume)
    # before a process group or a device is made from the config (a bad --device would fail there)
    validate(cfg, D.world_size() if D.is_distributed() else int(os.environ.get("WORLD_SIZE", "1")))
    device = _setup_distributed(cfg)
    world, rank = D.world_size(), D.rank()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(cfg.seed)
    train_set, val_set, test_set = _load_data(cfg)

    model = build_model(cfg, num_classes=len(train_set.class_names)).to(device, getattr(torch, cfg.dtype))
    D.sync_batch_norms(model)
    relaxed = not cfg.plain
    params = [p for p in model.parameters() if p.requires_grad]
    # the relaxation's own parameters in a group of their own: --relax-lr theta scales their lr by θ
    relax_ids = {id(p) for m in relaxed_layers(model) for p in _relaxation_parameters(m)}
    groups = [{"params": [p for p in params if id(p) not in relax_ids]},
              {"params": [p for p in params if id(p) in relax_ids]}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    relax_group = opt.param_groups[-1] if relax_ids else None
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
        history, start_epoch, global_step = load_checkpoint(ckpt_path, device, model, opt, sched, theta,
                                                            data_gen, aug_gen)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    net = model
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    local_batch = cfg.batch_size // world
    probe_x = test_set.x[:cfg.eval_batch_size].to(device)  # for the projection error and the final check
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
            task = TF.cross_entropy(out, y, label_smoothing=cfg.label_smoothing)
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
            if relax_group is not None and cfg.relax_lr == "theta":
                # Adam normalises the gradient, so θ in θ·W_r does not slow W_r's updates: scale its
                # step by θ here (the schedule's lr is put back, so the lr schedulers never see it)
                scheduled_lr = relax_group["lr"]
                relax_group["lr"] = scheduled_lr * theta.theta
                opt.step()
                relax_group["lr"] = scheduled_lr
            else:
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
        # the current model (θ as it is now) and its projection (θ := 0, W_r dropped) on every split
        projected = project(copy.deepcopy(model)) if relaxed else model
        accs = {}
        for name, split in (("val", val_set), ("test", test_set)):
            if split is None:
                accs[f"{name}_acc"] = accs[f"{name}_acc_projected"] = float("nan")
                continue
            accs[f"{name}_acc"] = evaluate(model, split.x, split.y, cfg.eval_batch_size, device)
            accs[f"{name}_acc_projected"] = evaluate(projected, split.x, split.y, cfg.eval_batch_size, device) \
                if relaxed else accs[f"{name}_acc"]
        test_acc = accs["test_acc"]
        proj_err = projection_error(model, probe_x) if relaxed else 0.0
        row = dict(epoch=epoch + 1, step=global_step, lr=lr, theta=theta.theta if theta else 0.0,
                   train_loss=(sums[0] / n).item(), train_acc=(sums[4] / sums[5]).item(),
                   reg_loss=(sums[1] / n).item(), r_ld=(sums[2] / n).item(), r_n=(sums[3] / n).item(),
                   **accs, projection_error=proj_err, epoch_seconds=time.perf_counter() - t0)
        history.append(row)
        epochs_run += 1
        if show:
            print(f"  epoch {epoch + 1}: test acc {test_acc:.3f} (projected {accs['test_acc_projected']:.3f}), "
                  f"θ {row['theta']:.3f}, projection error {proj_err:.2e}", file=sys.stderr)
        if rank == 0:
            save_checkpoint(ckpt_path, model, opt, sched, theta, data_gen, aug_gen, history=history,
                            epoch=epoch + 1, step=global_step, config=dataclasses.asdict(cfg))
            _write_metrics(os.path.join(run_dir, "metrics.csv"), history)
            plot_history(history, os.path.join(run_dir, "training.png"),
                         f"{cfg.model} on {cfg.dataset} ({'plain' if cfg.plain else 'relaxed'}), "
                         f"train {cfg.train_rotation} / test {cfg.test_rotation}")

    finished = len(history) == cfg.epochs
    summary = dict(run_dir=run_dir, epochs_done=len(history), finished=finished, relaxed=relaxed,
                   num_classes=len(train_set.class_names))
    if finished:
        final = project(copy.deepcopy(model)).eval() if relaxed else copy.deepcopy(model).eval()
        n_layers = sum(1 for _ in relaxed_layers(model))
        summary.update(
            test_acc_projected=evaluate(final, test_set.x, test_set.y, cfg.eval_batch_size, device),
            equivariance_error=_final_equivariance_error(final, probe_x, cfg),
            relaxed_layers=n_layers, theta_final=theta.theta if theta else 0.0,
            seconds=sum(h["epoch_seconds"] for h in history), **best_epoch(history))
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
        from ..steerable import rot90_equivariance_error
        return rot90_equivariance_error(model, x)
    return equivariance_error(model, x, output="invariant", seed=cfg.seed)
