"""A study's report: per-setting mean ± std (aggregate), study.csv / study.md tables, study.png and the
size / depth curves (study_<axis>.png)."""
from __future__ import annotations

import csv
import math
import os
import textwrap
from typing import Optional

from ..train.config import EXTRA_TESTS
from ..train.report import METRIC_NAMES, format_metric
from .grid import CURVE_AXES, StudyError, study_fields

def study_metric(rows: list[dict]) -> str:
    """The metric of a study's finished runs ("acc" when none has finished); mixed metrics are refused."""
    found = {r["metric"] for r in rows if "metric" in r}
    if len(found) > 1:
        raise StudyError(f"the runs report different metrics {sorted(found)}: classifiers and N-body regressors "
                         "do not go in one study")
    return found.pop() if found else "acc"


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value); NaN for none."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    m = sum(values) / len(values)
    if len(values) == 1:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: list[dict]) -> list[dict]:
    """Per (method, lr, axes): runs, mean ± std (finished runs) of the final and of the best-epoch projected
    test metric (accuracy, MSE or RMSE; for the smoke forecasts also of the test-domain split: keys
    ``test_domain_final_mean`` ...), of the final projected validation metric (what settings are chosen on), of
    the training metric and the projection error at mid-training, of the final training metric and of the
    train–test gap (train − test accuracy; test − train MSE); failure rate (diverged or failed, over all runs)."""
    m = study_metric(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["lr"], r["axes"]), []).append(r)
    out = []
    for (method, lr, axes), rs in sorted(groups.items(),
                                         key=lambda kv: (_axes_order(kv[0][2]), kv[0][0] != "relaxed", kv[0][1])):
        done = [r for r in rs if r["status"] == "finished"]
        final = mean_std([r[f"test_{m}_projected"] for r in done])
        best = mean_std([r.get(f"best_test_{m}_projected") for r in done])
        val = mean_std([r.get(f"val_{m}_projected") for r in done])
        mid = mean_std([r.get(f"mid_train_{m}") for r in done])
        train = mean_std([r.get(f"final_train_{m}") for r in done])
        # train–test gap, positive when the model fits its training data better than it generalises
        sign = 1 if m == "acc" else -1
        gap = mean_std([sign * (r[f"final_train_{m}"] - r[f"test_{m}_projected"]) for r in done
                        if r.get(f"final_train_{m}") is not None and r.get(f"test_{m}_projected") is not None])
        proj = mean_std([r.get("mid_projection_error") for r in done])
        extra = {}
        for t in EXTRA_TESTS.get(m, ()):
            for key, prefix in (("final", ""), ("best", "best_")):
                extra[f"{t}_{key}_mean"], extra[f"{t}_{key}_std"] = mean_std(
                    [r.get(f"{prefix}{t}_{m}_projected") for r in done])
        out.append(dict(method=method, lr=lr, axes=axes, runs=len(rs), finished=len(done), **extra,
                        final_mean=final[0], final_std=final[1], best_mean=best[0], best_std=best[1],
                        val_mean=val[0], val_std=val[1], mid_train_mean=mid[0], mid_train_std=mid[1],
                        final_train_mean=train[0], final_train_std=train[1], gap_mean=gap[0], gap_std=gap[1],
                        mid_projection_error_mean=proj[0], mid_projection_error_std=proj[1],
                        failure_rate=sum(bool(r["failed"]) for r in rs) / len(rs),
                        seeds=sorted(r["seed"] for r in rs)))
    return out


def _axes_order(axes: str) -> list[tuple]:
    """Sort key of an axes string: numeric values by value (n_train=96 before n_train=480), others by name."""
    key = []
    for kv in axes.split(";"):
        name, _, value = kv.partition("=")
        try:
            key.append((name, 0, float(value), ""))
        except ValueError:
            key.append((name, 1, 0.0, value))
    return key


def _fmt(m: float, s: float, metric: str = "acc", signed: bool = False) -> str:
    """``mean ± std`` of a metric; ``signed``: a gap, in one fixed format per metric so that a column's cells line
    up (3 decimals of accuracy, MSEs in scientific notation)."""
    if math.isnan(m):
        return "—"
    if signed:
        value = f"{m:+.3f}" if metric == "acc" else f"{m:+.2e}"
    else:
        value = format_metric(metric, m)
    return f"{value} ± " + (f"{s:.3f}" if metric == "acc" else f"{s:.1e}")


def _fmt_error(m: float, s: float, method: str) -> str:
    return "—" if math.isnan(m) or method == "plain" else f"{m:.2g} ± {s:.1g}"


def write_outputs(out_dir: str, rows: list[dict], title: str) -> tuple[str, str, Optional[str]]:
    """study.csv, study.md, study.png in out_dir; returns their paths (png None without matplotlib)."""
    m = study_metric(rows)
    fields = study_fields(m)
    csv_path = os.path.join(out_dir, "study.csv")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
    groups = aggregate(rows)
    name = METRIC_NAMES[m]
    failed = {"acc": "below twice chance", "mse": "no better than predicting that nothing moves",
              "rmse": "no better than predicting that the last input field persists"}[m]
    extras = EXTRA_TESTS.get(m, ())
    extra_head = "".join(f" final {t} {m} | best-epoch {t} {m} |" for t in extras)
    lines = [f"# {title}", "",
             f"Mean ± sample std over seeds. Projected test {name} at the last epoch, and at the epoch with "
             f"the best projected validation {name}" + (f" (likewise on {', '.join(extras)})" if extras else "")
             + f"; projected validation {name} at the last epoch (what "
             f"settings are chosen on); training {name} and projection error ‖f_θ − f_proj‖/‖f_proj‖ at "
             f"mid-training (θ's peak). Failed: diverged or {failed}.", "",
             f"| method | lr | axes | seeds | final {m} | best-epoch {m} |{extra_head} final val {m} | mid train {m} | "
             "mid proj. error | failed |",
             "|---|---|---|---|---|---|" + "---|---|" * len(extras) + "---|---|---|---|"]
    for g in groups:
        extra_cells = "".join(f" {_fmt(g[f'{t}_final_mean'], g[f'{t}_final_std'], m)} | "
                              f"{_fmt(g[f'{t}_best_mean'], g[f'{t}_best_std'], m)} |" for t in extras)
        lines.append(f"| {g['method']} | {g['lr']:g} | {g['axes'] or '—'} | {g['finished']}/{g['runs']} "
                     f"({','.join(map(str, g['seeds']))}) | {_fmt(g['final_mean'], g['final_std'], m)} | "
                     f"{_fmt(g['best_mean'], g['best_std'], m)} |{extra_cells} {_fmt(g['val_mean'], g['val_std'], m)} | "
                     f"{_fmt(g['mid_train_mean'], g['mid_train_std'], m)} | "
                     f"{_fmt_error(g['mid_projection_error_mean'], g['mid_projection_error_std'], g['method'])} | "
                     f"{g['failure_rate']:.0%} |")
    for axis in curve_axes(groups):
        lines += ["", *_curve_lines(groups, axis, m)]
        _plot_curve(out_dir, groups, axis, m, title)
    md_path = os.path.join(out_dir, "study.md")
    with open(md_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path, md_path, _plot(out_dir, rows, groups, title)


def _axes_dict(axes: str) -> dict:
    return dict(kv.split("=", 1) for kv in axes.split(";") if kv)


def curve_axes(groups: list[dict]) -> list[str]:
    """The size / depth axes (CURVE_AXES) the groups vary over."""
    present = {k for g in groups for k in _axes_dict(g["axes"])}
    return [a for a in CURVE_AXES if a in present]


def curves(groups: list[dict], axis: str) -> dict:
    """{(method, lr, the other axes): {axis value (int): group}}: one curve per method and setting."""
    out: dict = {}
    for g in groups:
        axes = _axes_dict(g["axes"])
        if axis not in axes:
            continue
        value = int(axes.pop(axis))
        out.setdefault((g["method"], g["lr"], ";".join(f"{k}={v}" for k, v in axes.items())), {})[value] = g
    return out


def _curve_lines(groups: list[dict], axis: str, m: str) -> list[str]:
    """study.md's two tables against ``axis``: the final projected test metric, and the train–test gap."""
    lines = []
    by_curve = curves(groups, axis)
    values = sorted({v for c in by_curve.values() for v in c})
    head = "| method | lr | other axes | " + " | ".join(f"{axis} = {v}" for v in values) + " |"
    rule = "|---|---|---|" + "---|" * len(values)
    for what, key, fmt in ((f"final projected test {m}", "final", lambda a, b: _fmt(a, b, m)),
                           ("train–test gap (" + ("train − test accuracy" if m == "acc" else f"test − train {m}")
                            + ")", "gap", lambda a, b: _fmt(a, b, m, signed=True))):
        lines += [f"## {what} against {axis}", "", head, rule]
        for (method, lr, rest), c in sorted(by_curve.items(), key=lambda kv: (kv[0][2], kv[0][0] != "relaxed")):
            cells = [fmt(c[v][f"{key}_mean"], c[v][f"{key}_std"]) if v in c else "—" for v in values]
            lines.append(f"| {method} | {lr:g} | {rest or '—'} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _plot_curve(out_dir: str, groups: list[dict], axis: str, m: str, title: str) -> Optional[str]:
    """study_<axis>.png: the final projected test metric and the train–test gap against the axis values, one
    line per method and setting with its ± std band."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    name = METRIC_NAMES[m]
    for (method, lr, rest), c in sorted(curves(groups, axis).items(), key=lambda kv: str(kv[0])):
        xs = sorted(c)
        label = f"{method} lr {lr:g}" + (f" {rest}" if rest else "")
        for a, key in ((a1, "final"), (a2, "gap")):
            mean = [c[x][f"{key}_mean"] for x in xs]
            std = [c[x][f"{key}_std"] for x in xs]
            line, = a.plot(xs, mean, "o-" if method == "relaxed" else "s--", label=label)
            a.fill_between(xs, [u - s for u, s in zip(mean, std)], [u + s for u, s in zip(mean, std)], alpha=0.15,
                           color=line.get_color())
    a1.set(xlabel=axis, ylabel=f"projected test {name} (last epoch)", title=f"{name} against {axis}")
    a2.set(xlabel=axis, ylabel="train − test" if m == "acc" else "test − train",
           title="train–test gap (mean ± std over seeds)")
    if axis == "n_train":
        a1.set_xscale("log"), a2.set_xscale("log")
    if m != "acc":
        a1.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, f"study_{axis}.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _plot(out_dir: str, rows: list[dict], groups: list[dict], title: str) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(17, 4.5))
    lines: dict[tuple, list[dict]] = {}
    for g in groups:
        lines.setdefault((g["method"], g["axes"]), []).append(g)
    for (method, axes), gs in lines.items():
        gs = sorted(gs, key=lambda g: g["lr"])
        label = method + (f" {axes}" if axes else "")
        a1.errorbar([g["lr"] for g in gs], [g["final_mean"] for g in gs], yerr=[g["final_std"] for g in gs],
                    marker="o" if method == "relaxed" else "s", capsize=3, label=label)
    name = METRIC_NAMES[study_metric(rows)]
    a1.set(xscale="log", xlabel="learning rate", ylabel=f"projected test {name} (last epoch)",
           title=f"{name} against lr (mean ± std over seeds)")
    colors: dict[tuple, str] = {}  # the relaxed groups' colours, reused by the projection-error panel
    curves: dict[tuple, list[list[float]]] = {}
    for r in rows:
        if r.get("curve"):
            curves.setdefault((r["method"], r["lr"], r["axes"]), []).append(r["curve"])
    for (method, lr, axes), cs in sorted(curves.items(), key=lambda kv: str(kv[0])):
        n = min(len(c) for c in cs)
        ms = [mean_std([c[i] for c in cs]) for i in range(n)]
        ep = list(range(1, n + 1))
        m = [x[0] for x in ms]
        s = [x[1] for x in ms]
        line, = a2.plot(ep, m, "-" if method == "relaxed" else "--",
                        label=f"{method} lr {lr:g}" + (f" {axes}" if axes else ""))
        a2.fill_between(ep, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], alpha=0.15,
                        color=line.get_color())
        colors[(method, lr, axes)] = line.get_color()
    a2.set(xlabel="epoch", ylabel=f"projected test {name}", title="per epoch (mean ± std over seeds)")
    errors: dict[tuple, list[list[float]]] = {}
    for r in rows:
        if r.get("projection_curve") and r["method"] == "relaxed":
            errors.setdefault((r["lr"], r["axes"]), []).append(r["projection_curve"])
    for (lr, axes), cs in sorted(errors.items(), key=lambda kv: str(kv[0])):
        n = min(len(c) for c in cs)
        # geometric mean over seeds: the errors span decades, and are exactly 0 at θ = 0
        ep = [i + 1 for i in range(n) if all(c[i] > 0 for c in cs)]
        a3.plot(ep, [math.exp(sum(math.log(c[i - 1]) for c in cs) / len(cs)) for i in ep],
                label=f"lr {lr:g}" + (f" {axes}" if axes else ""), color=colors.get(("relaxed", lr, axes)))
    a3.set(xlabel="epoch", ylabel="‖f_θ − f_proj‖ / ‖f_proj‖", yscale="log",
           title="relaxed runs' projection error (geometric mean)")
    if name in ("MSE", "RMSE"):
        a1.set_yscale("log"), a2.set_yscale("log")
    for a in (a1, a2, a3):
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:  # nothing to label when every run diverged
            a.legend(fontsize=7)
    fig.suptitle(textwrap.fill(title, 120), fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "study.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
