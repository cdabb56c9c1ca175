"""What a run reports: metrics.csv, the training plot, the comparison of runs, the one-line summary."""
from __future__ import annotations

import csv
import json
import os
from typing import Optional

from .config import EXTRA_TESTS, metric_fields

METRIC_NAMES = {"acc": "accuracy", "mse": "MSE", "rmse": "RMSE"}


def _write_metrics(path: str, history: list[dict], metric: str = "acc"):
    tmp = path + ".tmp"
    # then a --theta-schedule dual / elastic run's per-layer θ_ℓ, μ_ℓ (and elastic's allowed |θ_ℓ|, u_ℓ)
    fields = metric_fields(metric) + tuple(k for k in history[0] if k.startswith(("theta_l", "mu_l", "u_l")))
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in history:
            w.writerow({k: row[k] for k in fields})
    os.replace(tmp, path)


def summary_metric(s: dict) -> str:
    """The metric of a run's summary.json ("acc" for runs made before regression existed)."""
    return s.get("metric", "acc")


def plot_history(history: list[dict], path: str, title: str = "", metric: str = "acc") -> Optional[str]:
    """training.png: loss, the metric (accuracy; MSE on a log scale), θ (per layer when learnt) and lr, regulariser
    terms, projection error per epoch."""
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
    m = metric
    ax.plot(ep, [h[f"train_{m}"] for h in history], "o-", label="train")
    ax.plot(ep, [h[f"test_{m}"] for h in history], "s-", label="test (current θ)")
    final = "kept relaxation" if "u_l0" in history[0] else "projected"  # elastic: the final model is not projected
    ax.plot(ep, [h.get(f"test_{m}_projected", float("nan")) for h in history], "d--", label=f"test ({final})")
    for extra in EXTRA_TESTS.get(m, ()):
        ax.plot(ep, [h[f"{extra}_{m}_projected"] for h in history], "v--", label=f"{extra} ({final})")
    if any(h.get(f"val_{m}_projected") == h.get(f"val_{m}_projected") for h in history):  # not all NaN
        ax.plot(ep, [h[f"val_{m}_projected"] for h in history], "^:", label=f"validation ({final})")
    if m == "acc":
        ax.set_ylim(0, 1)
    else:
        ax.set_yscale("log")
    ax.set_title(METRIC_NAMES[m]), ax.legend(fontsize=8)
    ax = axes[0, 2]
    layers = sorted((int(k[len("theta_l"):]) for k in history[0] if k.startswith("theta_l")))
    if layers:  # learnt per-layer θ_ℓ (dual / elastic): one line per layer, elastic's bound u_ℓ dotted
        colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
        for i, c in zip(layers, colors):
            ax.plot(ep, [h[f"theta_l{i}"] for h in history], "-", color=c, label=f"θ_{i}" if len(layers) <= 8 else None)
            if f"u_l{i}" in history[0]:
                ax.plot(ep, [h[f"u_l{i}"] for h in history], ":", color=c)
        ax.plot(ep, [h["theta"] for h in history], "k--", lw=2, label="mean")
        ax.legend(fontsize=7, ncol=2)
        ax.set_title("learnt θ_ℓ" + (" (dotted: allowed |θ_ℓ|)" if "u_l0" in history[0] else " per relaxed layer"))
    else:
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


def relaxation_persistence(run_dir: str, fraction: float = 0.1) -> list[dict]:
    """Which layers of a --theta-schedule dual / elastic run kept their relaxation longest.

    Per relaxed layer (metrics.csv's theta_l<i>, summary.json's layer names): ``name``, ``theta_start`` (after the
    first epoch), ``theta_final``, ``last_epoch`` (the last epoch whose |θ_ℓ| is at least ``fraction`` × its
    first-epoch value; 0 if none). Sorted by last_epoch, then |theta_final|, longest-kept first.
    """
    with open(os.path.join(run_dir, "summary.json")) as f:
        names = json.load(f).get("relaxed_layer_names")
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    layers = sorted(int(k[len("theta_l"):]) for k in rows[0] if k.startswith("theta_l")) if rows else []
    if not layers:
        raise ValueError(f"{run_dir}: no per-layer θ_ℓ in metrics.csv (not a --theta-schedule dual / elastic run)")
    out = []
    for i in layers:
        traj = [abs(float(r[f"theta_l{i}"])) for r in rows]
        kept = [int(r["epoch"]) for r, t in zip(rows, traj) if t >= fraction * traj[0]]
        out.append(dict(name=names[i] if names else f"layer {i}", theta_start=float(rows[0][f"theta_l{i}"]),
                        theta_final=float(rows[-1][f"theta_l{i}"]), last_epoch=max(kept, default=0)))
    return sorted(out, key=lambda d: (-d["last_epoch"], -abs(d["theta_final"])))


def compare_runs(run_dirs: list[str], out_png: Optional[str] = None) -> str:
    """A table of finished runs (projected test metric: accuracy or MSE, equivariance error, time) and, when
    ``out_png`` is given, their test metric and θ per epoch on one plot. Returns the table."""
    rows, histories, metrics = [], [], set()
    for d in run_dirs:
        with open(os.path.join(d, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(d, "metrics.csv")) as f:
            histories.append([{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)])
        m = summary_metric(s)
        metrics.add(m)
        label = run_kind(s)
        rows.append(f"| {label} | {format_metric(m, s[f'test_{m}_projected'])} | {s['equivariance_error']:.1e} | "
                    f"{s['seconds']:.0f} s | {d} |")
    if len(metrics) > 1:
        raise ValueError(f"compare_runs: the runs report different metrics {sorted(metrics)} "
                         "(classifiers and N-body regressors do not compare)")
    m = metrics.pop() if metrics else "acc"
    table = "\n".join([f"| run | test {METRIC_NAMES[m]} (projected) | equivariance error | training time | run dir |",
                       "|---|---|---|---|---|", *rows])
    if out_png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
        for d, hist in zip(run_dirs, histories):
            ep = [h["epoch"] for h in hist]
            a1.plot(ep, [h[f"test_{m}"] for h in hist], "o-", label=os.path.basename(os.path.normpath(d)))
            a2.plot(ep, [h["theta"] for h in hist], "o-", label=os.path.basename(os.path.normpath(d)))
        a1.set(title=f"test {METRIC_NAMES[m]} per epoch (current θ; last epoch θ = 0)", xlabel="epoch")
        a1.set_ylim(0, 1) if m == "acc" else a1.set_yscale("log")
        a2.set(title="θ at the end of the epoch", xlabel="epoch")
        for a in (a1, a2):
            a.grid(alpha=0.3), a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_png, dpi=90)
        plt.close(fig)
    return table


def format_metric(metric: str, value: float) -> str:
    """An accuracy to 3 decimals, an MSE to 4 significant digits (exponent form), an RMSE to 4."""
    if metric == "rmse":
        return f"{value:.4g}"
    return f"{value:.3f}" if metric == "acc" else f"{value:.3e}"


def run_kind(s: dict) -> str:
    """What the run's final model is: plain, relaxed → projected, or (elastic) relaxed, kept."""
    return "plain" if not s["relaxed"] else "relaxed, kept (elastic)" if s.get("kept_relaxation") else \
        "relaxed → projected"


def format_summary(s: dict) -> str:
    if not s.get("finished"):
        return f"stopped after {s['epochs_done']} epoch(s); resume with --resume {s['run_dir']}"
    kind = run_kind(s)
    m = summary_metric(s)
    extras = "".join(f", {name} {format_metric(m, s[f'{name}_{m}_projected'])}" for name in EXTRA_TESTS.get(m, ())
                     if f"{name}_{m}_projected" in s)
    return (f"{kind}: test {METRIC_NAMES[m]} {format_metric(m, s[f'test_{m}_projected'])}{extras}, equivariance "
            f"error {s['equivariance_error']:.1e}, {s['seconds']:.0f} s of training; plots: {s['plot']}")


def plot_forecast(model, x, y, path: str, title: str = "", steps=(1, 5, 10, 20)) -> Optional[str]:
    """forecast.png: one window's true and predicted velocity fields (speed as colour, arrows on a coarse grid)
    and their difference, at the rolled-out ``steps`` (those within the target's horizon). x [1, T_in, 2, H, W],
    y [1, T, 2, H, W]."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    import torch
    steps = [t for t in steps if t <= y.shape[1]] or [y.shape[1]]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        pred = model(x, max(steps))[0].double().cpu()
    model.train(was_training)
    true = y[0].double().cpu()
    vmax = float(true[[t - 1 for t in steps]].norm(dim=1).max())
    fig, axes = plt.subplots(3, len(steps), figsize=(2.6 * len(steps) + 1.2, 8), squeeze=False,
                             constrained_layout=True)
    H, W = true.shape[-2:]
    stride = max(1, H // 12)
    rows, cols = torch.meshgrid(torch.arange(0, H, stride), torch.arange(0, W, stride), indexing="ij")
    for j, t in enumerate(steps):
        for i, (name, f) in enumerate((("true", true[t - 1]), ("predicted", pred[t - 1]),
                                       ("error", pred[t - 1] - true[t - 1]))):
            ax = axes[i, j]
            im = ax.imshow(f.norm(dim=0), cmap="viridis", vmin=0, vmax=vmax)
            # image rows grow downwards, v_y points up: the arrow's row component is −v_y
            ax.quiver(cols, rows, f[0][::stride, ::stride], -f[1][::stride, ::stride], color="w", scale=vmax * 20,
                      width=0.004, angles="xy")
            rmse = f" (RMSE {float(f.square().mean().sqrt()):.3g})" if i == 2 else ""
            ax.set_title(f"{name}, step {t}{rmse}", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.5, label="speed |v| (error: |predicted − true|)")
    fig.suptitle(title)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
