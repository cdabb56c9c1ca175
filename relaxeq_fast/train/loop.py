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
from torch import nn

from .. import distributed as D
from ..regularizer import combine_regularizers
from ..relaxation import (DualTheta, ElasticTheta, ThetaScheduler, layer_equivariance_errors, make_schedule,
                          projection_error)
from ..vn import model_regularizers, project, relaxed_layers
from .build import _load_data, augment_batch, build_model
from .checkpoint import load_checkpoint, save_checkpoint
from .config import AMP_DTYPES, EXTRA_TESTS, NonFiniteLossError, TrainConfig, _fail, validate
from ..progress import progress
from .report import _write_metrics, plot_forecast, plot_history, run_kind
from .task import CLASSIFICATION, Task, final_equivariance_error, persistence_rmse, task_of

@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device,
             task: Task = CLASSIFICATION) -> float:
    """The task's metric in eval mode (accuracy; the mean per-system MSE for N-body; the RMSE of the rolled-out
    forecasts for the smoke plumes) over x [N, ...], y [N, ...]; every rank evaluates its strided share and the
    sums are added."""
    was_training = model.training
    model.eval()
    r, w = D.rank(), D.world_size()
    total = torch.zeros(2, dtype=torch.float64)
    idx = torch.arange(r, len(y), w)
    for i in range(0, len(idx), batch_size):
        b = idx[i:i + batch_size]
        yb = y[b].to(device)
        out = model(*task.inputs(x[b].to(device), yb))
        total += torch.tensor([task.metric_sum(out, yb).item(), len(b)], dtype=torch.float64)
    if D.is_distributed():
        torch.distributed.all_reduce(total)
    model.train(was_training)
    return task.finish((total[0] / total[1]).item())


PROGRESS_EVERY = 10  # steps between reads of the running numbers for the progress bar
PLOT_EVERY_S = 30.0  # training.png: redrawn at most this often (and after the last epoch)


def forward_loss(net: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                 theta_buffer: Optional[torch.Tensor]):
    """The part of a step that ``--compile`` compiles: forward, task loss and regulariser.

    Returns (loss, regulariser, ΣR_LD, ΣR_N, the batch's metric sum: correct predictions or Σ per-sample
    MSE), all 0-d tensors on the device; only loss carries gradient. θ is read from theta_buffer (a tensor),
    so a new θ is not a new graph. A model's own ``auxiliary_loss()`` (RSteer's coefficient penalty) is part
    of the task loss.
    """
    kind = task_of(cfg)
    out = net(*kind.inputs(x, y))
    task = kind.loss(out, y, cfg)
    if hasattr(model, "auxiliary_loss"):
        task = task + model.auxiliary_loss()
    zero = task.detach().new_zeros(())
    reg, r_ld, r_n = task.new_zeros(()), zero, zero
    if theta_buffer is not None:
        D.all_reduce_input_stats(model)
        D.all_reduce_conv_defects(model)
        terms = model_regularizers(model)
        reg = combine_regularizers(terms, cfg.lambda_ld, cfg.lambda_n, cfg.reduction,
                                   theta=theta_buffer if cfg.theta_scaled_lambda else None)
        r_ld = sum(t.lie_derivative.detach() for t in terms)
        r_n = sum(t.projection.detach() for t in terms)
    return task + reg, reg.detach(), r_ld, r_n, kind.metric_sum(out, y)


def compiled_forward_loss(cfg: TrainConfig, device: torch.device, compiler: str = "inductor"):
    """forward_loss under torch.compile with cfg.compile's mode ('auto': CUDA graphs on CUDA);
    compiler: torch.compile's backend (tests use 'aot_eager' where only the tracing matters)."""
    from ..backend import fill_caches_before_compile
    fill_caches_before_compile(device, cfg.backend)
    if compiler != "inductor":  # modes are inductor's
        return torch.compile(forward_loss, backend=compiler, dynamic=False)
    mode = cfg.compile if cfg.compile != "auto" else ("reduce-overhead" if device.type == "cuda" else "default")
    return torch.compile(forward_loss, mode=mode, dynamic=False)


def train_step(net: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, opt,
               theta_buffer: Optional[torch.Tensor], relax_group: Optional[dict], theta_value: float,
               forward_loss_fn=forward_loss, scaler: Optional[torch.amp.GradScaler] = None,
               dual: Optional[DualTheta] = None) -> torch.Tensor:
    """One optimisation step on a (local) batch x [B, ...], y [B, ...]; returns, on the device and without
    reading anything back to the host, float64 [6]: loss, regulariser, ΣR_LD, ΣR_N, metric sum, samples.

    net is the model or its DDP wrapper. theta_buffer: the layers' θ (a 0-d tensor; None for a plain
    model); theta_value: the same θ as a number, for --relax-lr theta's lr (the optimiser takes numbers).
    forward_loss_fn: :func:`forward_loss` or its compiled form. cfg.amp: the forward and the loss run under
    torch.autocast in that dtype; scaler: the float16 grad scaler (its step skips a step with non-finite
    gradients without a host read when the optimiser is fused). dual: --theta-schedule dual's learnt θ_ℓ: its penalty
    Σ μ_ℓ θ_ℓ² joins the loss, and its multipliers take their dual step after the optimiser's.
    """
    with torch.autocast(x.device.type, dtype=AMP_DTYPES.get(cfg.amp), enabled=cfg.amp is not None):
        loss, reg, r_ld, r_n, metric_sum = forward_loss_fn(net, model, x, y, cfg, theta_buffer)
    # the objective adds the multipliers' penalty; the reported loss stays task + regulariser, comparable across
    # θ schedules (Σ μ_ℓ θ_ℓ² grows with μ and would swamp it)
    objective = loss + dual.penalty() if dual is not None else loss
    opt.zero_grad(set_to_none=True)
    (scaler.scale(objective) if scaler is not None else objective).backward()
    if cfg.clip_grad_norm is not None:
        if scaler is not None:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad_norm)
    step = (lambda: scaler.step(opt)) if scaler is not None else opt.step
    if relax_group is not None and cfg.relax_lr == "theta":
        # Adam normalises the gradient, so θ in θ·W_r does not slow W_r's updates: scale its step by θ
        # here (the schedule's lr is put back, so the lr schedulers never see it)
        scheduled_lr = relax_group["lr"]
        relax_group["lr"] = scheduled_lr * theta_value
        step()
        relax_group["lr"] = scheduled_lr
    else:
        step()
    if scaler is not None:
        scaler.update()
    if dual is not None:
        dual.dual_step()
    return torch.stack([loss.detach().double(), reg.double(), r_ld.double(), r_n.double(),
                        metric_sum.double(), metric_sum.new_tensor(len(y)).double()])


class _EpochTally:
    """The epoch's running sums of train_step's numbers, kept on the device; read (a host sync, and an
    all-reduce across ranks) only at the progress-bar interval and at the end of the epoch.

    The first step whose loss or regulariser is not finite is remembered on the device, so the read
    that finds it can name it; the epoch's checkpoint is then never written.
    """

    NEVER = 2 ** 62

    def __init__(self, device, task: Task = CLASSIFICATION):
        self.task, self.metric = task, task.metric
        self.sums = torch.zeros(6, dtype=torch.float64, device=device)
        self.first_bad = torch.full((), self.NEVER, dtype=torch.int64, device=device)
        self.bad_values = torch.zeros(2, dtype=torch.float64, device=device)
        self.steps = 0

    def add(self, step: int, stats: torch.Tensor) -> None:
        bad = ~torch.isfinite(stats[:4]).all()
        new_bad = bad & (self.first_bad == self.NEVER)
        self.first_bad = torch.where(new_bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.bad_values = torch.where(new_bad, stats[:2], self.bad_values)
        self.sums += stats
        self.steps += 1

    def read(self, epoch: int, ckpt_path: str) -> dict:
        """Mean loss / regulariser / R_LD / R_N per step and the metric (accuracy, MSE) so far (over every rank);
        NonFiniteLossError if a step so far was not finite."""
        sums, first_bad = self.sums.clone(), self.first_bad.clone()
        if D.is_distributed():
            torch.distributed.all_reduce(sums)
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MIN)
            sums[:4] /= D.world_size()
        bad = int(first_bad.item())
        if bad != self.NEVER:
            task_plus_reg, reg = self.bad_values.tolist()
            raise NonFiniteLossError(
                f"non-finite loss at epoch {epoch + 1}, step {bad + 1} (loss {task_plus_reg:.4g}, regulariser "
                f"{reg:.4g}); lower --lr or the λs. {ckpt_path} still holds the last finite epoch")
        n = max(self.steps, 1)
        values = (sums / torch.tensor([n, n, n, n, 1, 1], dtype=sums.dtype, device=sums.device)).tolist()
        return dict(train_loss=values[0], reg_loss=values[1], r_ld=values[2], r_n=values[3],
                    **{f"train_{self.metric}": self.task.finish(values[4] / max(values[5], 1))})


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU batch → device; from pinned memory without blocking the host on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


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
            saved = json.load(f)
        # a setting given with --resume that differs from the run's would be silently ignored: refuse
        defaults = dataclasses.asdict(TrainConfig())
        asked = {k: v for k, v in dataclasses.asdict(cfg).items()
                 if k not in ("run_dir", "progress", "threads") and v != defaults[k]}
        differ = sorted(k for k, v in asked.items() if k in saved and saved[k] != v)
        if differ:
            _fail(f"--resume {resume}: the run was made with other settings ("
                  + ", ".join(f"{k}: {saved[k]!r} there, {asked[k]!r} asked" for k in differ)
                  + "); resume without them, or start a new run")
        cfg = TrainConfig(**{**saved, "run_dir": resume, "progress": cfg.progress})
    return cfg.resolved()


def best_epoch(history: list[dict], task: Task = CLASSIFICATION) -> dict:
    """The epoch with the best projected validation metric (highest accuracy, lowest (R)MSE; the first of ties)
    and its projected test metric (and the smoke forecasts' test-domain one): model selection on the validation
    split, never on a test set. Empty without one."""
    val = f"val_{task.metric}_projected"
    tests = [f"{t}_{task.metric}_projected" for t in ("test",) + EXTRA_TESTS.get(task.metric, ())]
    best = None
    for h in history:
        if not math.isnan(h[val]) and (best is None or task.better(h[val], best[val])):
            best = h
    if best is None:
        return {}
    return {"best_epoch": best["epoch"], f"best_{val}": best[val], **{f"best_{t}": best[t] for t in tests}}


def _dual_columns(dual: DualTheta) -> dict:
    """metrics.csv's per-layer columns of a --theta-schedule dual / elastic run: theta_l<i>, mu_l<i> and, elastic,
    the allowed |θ_ℓ| u_l<i> (relaxed_layers order)."""
    cols = {"theta_l": dual.thetas(), "mu_l": dual.multipliers}
    if isinstance(dual, ElasticTheta):
        cols["u_l"] = dual.slacks()
    return {f"{prefix}{i}": v for prefix, values in cols.items() for i, v in enumerate(values.tolist())}


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
    train_set, val_set, test_set, extra_tests = _load_data(cfg)
    task = task_of(cfg)
    metric = task.metric

    model = build_model(cfg, num_classes=len(train_set.class_names)).to(device, getattr(torch, cfg.dtype))
    D.sync_batch_norms(model)
    relaxed = not cfg.plain
    steps_per_epoch = len(train_set.y) // cfg.batch_size  # the last partial batch is dropped
    total = cfg.epochs * steps_per_epoch if cfg.theta_unit == "step" else cfg.epochs
    theta = None
    if relaxed and cfg.theta_schedule == "dual":  # before the optimiser: the θ_ℓ become parameters
        theta = DualTheta(model, cfg.theta_init, cfg.dual_lr)
    elif relaxed and cfg.theta_schedule == "elastic":
        theta = ElasticTheta(model, cfg.theta_init, cfg.dual_lr, cfg.slack_cost)
    elif relaxed:
        theta = ThetaScheduler(model, make_schedule(cfg.theta_schedule, total, theta_max=cfg.theta_max))
    dual = theta if isinstance(theta, DualTheta) else None
    # elastic: the final model is the relaxed one (its "_projected" scores are the model's own, no projection)
    keeps_relaxation = getattr(dual, "keeps_relaxation", False)
    projects = relaxed and not keeps_relaxation
    params = [p for p in model.parameters() if p.requires_grad]
    # the relaxation's own parameters in a group of their own: --relax-lr theta scales their lr by θ; learnt θ_ℓ in
    # a third, at --theta-lr and without weight decay (the constraint, not the decay, is what pulls θ_ℓ to 0)
    theta_ids = {id(p) for p in dual.parameters()} if dual is not None else set()
    relax_ids = {id(p) for m in relaxed_layers(model) for p in _relaxation_parameters(m)} - theta_ids
    groups = [{"params": [p for p in params if id(p) not in relax_ids | theta_ids]},
              {"params": [p for p in params if id(p) in relax_ids]},
              {"params": [p for p in params if id(p) in theta_ids], "weight_decay": 0.0,
               "lr": cfg.theta_lr if cfg.theta_lr is not None else cfg.lr}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        # fused: one op per step instead of ~10 per parameter (the relaxed model has ~2× the parameters)
        opt = torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay,
                               fused=device.type in ("cpu", "cuda"))
    else:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    relax_group = next((g for g in opt.param_groups if id(g["params"][0]) in relax_ids), None)
    if cfg.lr_schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    elif cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.01)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _e: 1.0)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
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
                                                            data_gen, aug_gen, scaler)
    if rank == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)

    net = model
    if D.is_distributed():
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  broadcast_buffers=False)
    local_batch = cfg.batch_size // world
    # θ as the layers hold it (a buffer, set in place): the regulariser reads it without a host copy
    theta_buffer = next(iter(relaxed_layers(model))).theta if relaxed else None
    step_forward = compiled_forward_loss(cfg, device) if cfg.compile else forward_loss
    probe_x = test_set.x[:cfg.eval_batch_size].to(device)  # for the projection error and the final check
    show = cfg.progress and rank == 0
    epochs_run = 0
    plot_path = os.path.join(run_dir, "training.png")
    plot_title = (f"{cfg.model} on {cfg.dataset} ({'plain' if cfg.plain else 'relaxed'}), "
                  f"train {cfg.train_rotation} / test {cfg.test_rotation}")
    plotted_at = -math.inf

    def read_tally(tally, epoch):
        try:
            return tally.read(epoch, ckpt_path)
        except NonFiniteLossError:  # training.png ends where the checkpoint does
            if rank == 0 and history:
                plot_history(history, plot_path, plot_title, metric)
            raise
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epochs_run >= stop_after:
            break
        t0 = time.perf_counter()
        model.train()
        perm = torch.randperm(len(train_set.y), generator=data_gen)
        tally = _EpochTally(device, task)
        bar = range(steps_per_epoch)
        if show:  # a bar on a terminal; in a log file one line per epoch (below) and one per minute
            bar = progress(bar, desc=f"epoch {epoch + 1}/{cfg.epochs}", log_every=60.0)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            xb, yb = augment_batch(train_set.x[idx], train_set.y[idx], cfg, aug_gen)  # global, then this rank's
            sl = slice(rank * local_batch, (rank + 1) * local_batch)
            x, y = _to_device(xb[sl], device), _to_device(yb[sl], device)
            theta_value = theta.theta if theta is not None and cfg.relax_lr == "theta" else 0.0
            tally.add(step, train_step(net, model, x, y, cfg, opt, theta_buffer, relax_group, theta_value,
                                       step_forward, scaler, dual))
            global_step += 1
            if theta is not None and cfg.theta_unit == "step":
                theta.step()
            if show and ((step + 1) % PROGRESS_EVERY == 0 or step + 1 == steps_per_epoch):
                m = read_tally(tally, epoch)  # the only host reads of the step's numbers
                bar.set_postfix(loss=f"{m['train_loss']:.3g}", **{metric: f"{m[f'train_{metric}']:.3g}"},
                                θ=f"{theta.theta if theta else 0:.3f}", R_LD=f"{m['r_ld']:.2e}",
                                R_N=f"{m['r_n']:.2e}", refresh=False)
        means = read_tally(tally, epoch)
        if theta is not None and cfg.theta_unit == "epoch":
            theta.step()
        lr = opt.param_groups[0]["lr"]
        sched.step()
        # the current model (θ as it is now) and its projection (θ := 0, W_r dropped) on every split
        projected = project(copy.deepcopy(model), cfg.projection) if projects else model
        scores = {}
        for name, split in (("val", val_set), ("test", test_set), *extra_tests.items()):
            if split is None:
                scores[f"{name}_{metric}"] = scores[f"{name}_{metric}_projected"] = float("nan")
                continue
            scores[f"{name}_{metric}"] = evaluate(model, split.x, split.y, cfg.eval_batch_size, device, task)
            scores[f"{name}_{metric}_projected"] = (
                evaluate(projected, split.x, split.y, cfg.eval_batch_size, device, task) if projected is not model
                else scores[f"{name}_{metric}"])
        proj_err = projection_error(model, task.inputs(probe_x), cfg.projection) if relaxed else 0.0
        row = dict(epoch=epoch + 1, step=global_step, lr=lr, theta=theta.theta if theta else 0.0,
                   **means, **scores, projection_error=proj_err, epoch_seconds=time.perf_counter() - t0,
                   **(_dual_columns(dual) if dual is not None else {}))
        history.append(row)
        epochs_run += 1
        if show:
            print(f"  epoch {epoch + 1}: test {metric} {scores[f'test_{metric}']:.4g} (projected "
                  f"{scores[f'test_{metric}_projected']:.4g}), θ {row['theta']:.3f}, projection error "
                  f"{proj_err:.2e}", file=sys.stderr)
        if rank == 0:
            save_checkpoint(ckpt_path, model, opt, sched, theta, data_gen, aug_gen, scaler, history=history,
                            epoch=epoch + 1, step=global_step, config=dataclasses.asdict(cfg))
            _write_metrics(os.path.join(run_dir, "metrics.csv"), history, metric)
            # a redraw costs ~1 s, as much as a small epoch: at most every PLOT_EVERY_S, and after the last epoch
            last = epoch + 1 == cfg.epochs or (stop_after is not None and epochs_run >= stop_after)
            if last or time.perf_counter() - plotted_at >= PLOT_EVERY_S:
                plot_history(history, plot_path, plot_title, metric)
                plotted_at = time.perf_counter()

    finished = len(history) == cfg.epochs
    summary = dict(run_dir=run_dir, epochs_done=len(history), finished=finished, relaxed=relaxed,
                   metric=metric, num_classes=len(train_set.class_names))
    if dual is not None:  # metrics.csv's theta_l<i> is the layer named here
        names = {id(m): name for name, m in model.named_modules()}
        summary["relaxed_layer_names"] = [names[id(m)] for m in dual.layers]
    if finished and dual is not None:
        # nothing forced θ_ℓ to 0: how far the learnt model is from its projection, then (dual) θ_ℓ := 0
        summary.update(thetas_final=dual.thetas().tolist(), multipliers_final=dual.multipliers.tolist(),
                       projection_error_final=projection_error(model, task.inputs(probe_x), cfg.projection))
        if keeps_relaxation:
            summary.update(kept_relaxation=True, slacks_final=dual.slacks().tolist(),
                           layer_equivariance_errors=layer_equivariance_errors(model, task.inputs(probe_x)))
        dual.finish()
    if finished:
        final = (project(copy.deepcopy(model), cfg.projection) if projects else copy.deepcopy(model)).eval()
        n_layers = sum(1 for _ in relaxed_layers(model))
        summary.update(
            **{f"{name}_{metric}_projected": evaluate(final, split.x, split.y, cfg.eval_batch_size, device, task)
               for name, split in (("test", test_set), *extra_tests.items())},
            equivariance_error=final_equivariance_error(final, probe_x, cfg),
            relaxed_layers=n_layers, theta_final=theta.theta if theta else 0.0,
            seconds=sum(h["epoch_seconds"] for h in history), **best_epoch(history, task))
        if task.kind == "regression":  # the floor a model must beat: predicting that nothing moves
            summary["test_mse_static"] = task.static_mse(test_set.x, test_set.y)
        if task.kind == "forecast":  # the floor: the last input field persists
            for name, split in (("test", test_set), *extra_tests.items()):
                summary[f"{name}_rmse_persistence"] = persistence_rmse(split.x, split.y)
        if rank == 0:
            # elastic: the relaxed model (it loads into the relaxed model, with its θ_ℓ)
            summary["model_file"] = os.path.join(run_dir, "model_relaxed.pt" if keeps_relaxation
                                                 else "model_projected.pt")
            torch.save(dict(model=final.state_dict(), config=dataclasses.asdict(cfg),
                            class_names=train_set.class_names), summary["model_file"])
            if task.kind == "forecast":
                summary["forecast_plot"] = plot_forecast(final, test_set.x[:1].to(device), test_set.y[:1].to(device),
                                                         os.path.join(run_dir, "forecast.png"),
                                                         f"{cfg.model} ({run_kind(summary)}), test-future window 0")
    if rank == 0:
        summary["plot"] = os.path.join(run_dir, "training.png")
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary

