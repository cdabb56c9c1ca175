"""relaxeq-study: a grid of ordinary relaxeq-train runs — seeds × learning rates × {relaxed, plain} ×
optional ablation axes — run resumably, several at once, and aggregated into study.csv, study.md and
study.png. Axes over the training-set size or the depth (``--axis n_train=96,192,480``, ``--axis layers=4,8,16``)
also get curves: study.md tabulates, and study_<axis>.png plots, the metric and the train–test gap against them.

    relaxeq-study --out studies/pointnet --seeds 0,1,2 --lrs 3e-4,1e-3,3e-3 --jobs 2 -- \\
        --model vn_pointnet --dataset shapes --num-points 128 --k 10 --width 0.25 --epochs 30 --val-fraction 0.1
    relaxeq-study --out studies/ablate --seeds 0,1,2 --lrs 1e-3 --methods relaxed \\
        --axis theta_schedule=triangle,hold_linear --axis lambda_n=1e-2,1e-3 -- --epochs 30 ...

Every run has its own directory under ``<out>/runs`` (named by method, lr, seed and axis values). Running
the same command again skips finished runs, resumes interrupted ones (from their checkpoint) and does not
repeat diverged ones. An axis that only concerns the relaxation (θ schedule, λ, init, relaxed maps, ...)
is not crossed with the plain runs. A run *failed* if it diverged (non-finite loss) or its final
projected test accuracy is below twice chance (N-body: its test MSE is no better than predicting that nothing
moves). Accuracies (MSEs) in the tables are the projected model's: at the last epoch, and at the epoch with
the best projected validation score (needs --val-fraction > 0 in the training arguments, or a dataset with
its own validation split such as nbody; never selected on the test set). Under --theta-schedule elastic the
final model keeps its relaxation (it is not projected): its columns hold that model's own scores.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import textwrap
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Optional

from ._deps import MissingDependency
from .train.config import EXTRA_TESTS, ConfigError, TrainConfig
from .train.cli import parse_args
from .train.report import METRIC_NAMES, format_metric, summary_metric

METHODS = ("relaxed", "plain")
# axes that change only the relaxed runs: a plain run is not repeated over them
RELAXATION_AXES = ("theta_schedule", "theta_unit", "theta_max", "lambda_ld", "lambda_n", "reduction", "relax_space",
                   "projection", "theta_scaled_lambda", "relax_init", "relaxed_maps", "relax_lr")
# settings a study sets itself, or that do not change a run's result
NOT_AXES = ("seed", "lr", "plain", "run_dir", "runs_root", "progress", "threads", "device", "data_root")
# ignored when checking that an existing run directory holds the intended run
RUN_CONTROL = ("run_dir", "runs_root", "progress", "threads")
# axes of sizes and depths: study.md tabulates, and study_<axis>.png plots, the metric and the train–test gap
# against their values (one line per method and setting, mean ± std over seeds)
CURVE_AXES = ("n_train", "layers")


def study_fields(metric: str = "acc") -> tuple[str, ...]:
    """study.csv's columns when the runs report ``metric`` ("acc", "mse" or "rmse"; the smoke forecasts' also
    have their test-domain split's)."""
    m = metric
    extra = tuple(f"{p}{t}_{m}_projected" for t in EXTRA_TESTS.get(m, ()) for p in ("", "best_"))
    return ("run", "method", "lr", "seed", "axes", "status", "failed", f"test_{m}_projected", "best_epoch",
            f"best_test_{m}_projected", *extra, f"val_{m}_projected", f"best_val_{m}_projected", f"mid_train_{m}",
            f"final_train_{m}", "mid_projection_error", "seconds", "run_dir")



class StudyError(ValueError):
    """A bad grid or study directory; the message is one line naming the cause."""


@dataclass(frozen=True)
class Run:
    method: str
    lr: float
    seed: int
    axes: tuple[tuple[str, str], ...]  # (config field, value as given)

    @property
    def name(self) -> str:
        parts = [self.method, f"lr{self.lr:g}", f"s{self.seed}"] + [f"{k}={v}" for k, v in self.axes]
        return "-".join(parts).replace("/", "_").replace(",", "+")

    @property
    def group(self) -> tuple:
        """Runs that differ only in the seed."""
        return (self.method, self.lr, self.axes)

    def argv(self, common: list[str], run_dir: str, threads: int) -> list[str]:
        out = list(common) + ["--seed", str(self.seed), "--lr", repr(self.lr), "--run-dir", run_dir,
                              "--no-progress", "--threads", str(threads)]
        if self.method == "plain":
            out.append("--plain")
        for key, value in self.axes:
            flag = "--" + key.replace("_", "-")
            if key == "theta_scaled_lambda":
                out.append(flag if _truthy(value) else "--no-" + flag[2:])
            else:
                out += [flag, value]
        return out


def _truthy(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise StudyError(f"--axis theta_scaled_lambda takes true/false values, got {value!r}")


def _split_list(text: str, what: str, cast):
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise StudyError(f"{what} is empty")
    try:
        return [cast(t) for t in items]
    except ValueError:
        raise StudyError(f"{what} must be a comma list of {cast.__name__} values, got {text!r}") from None


def parse_axes(specs: list[str]) -> list[tuple[str, list[str]]]:
    """['theta_schedule=triangle,hold_linear', ...] → [(field, values)], checked against TrainConfig."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    axes, seen = [], set()
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if not sep:
            raise StudyError(f"--axis {spec!r}: expected name=v1,v2,...")
        if name not in fields or name in NOT_AXES:
            allowed = sorted(fields - set(NOT_AXES))
            raise StudyError(f"--axis {name!r} is not an ablation axis; one of {allowed}")
        if name in seen:
            raise StudyError(f"--axis {name} given twice")
        seen.add(name)
        values = [v.strip() for v in values.split(",") if v.strip()] if name not in ("augment", "augment_rotated") \
            else [v.strip() for v in values.split(";") if v.strip()]  # augment values are comma lists: ';' separates
        if not values:
            raise StudyError(f"--axis {name} has no values")
        if name == "theta_scaled_lambda":
            for v in values:
                _truthy(v)
        axes.append((name, values))
    return axes


def make_grid(seeds: list[int], lrs: list[float], methods: list[str], axes) -> list[Run]:
    for m in methods:
        if m not in METHODS:
            raise StudyError(f"--methods takes {list(METHODS)}, got {m!r}")
    runs = []
    # seed-major: a study stopped part-way has whole seeds of every method and lr to compare
    for seed in seeds:
        for lr in lrs:
            for method in methods:
                # plain runs ignore the relaxation axes
                used = [(k, v) for k, v in axes if not (method == "plain" and k in RELAXATION_AXES)]
                for combo in itertools.product(*[[(k, x) for x in v] for k, v in used]):
                    runs.append(Run(method, lr, seed, tuple(combo)))
    return runs


def _intended_config(run: Run, common: list[str]) -> dict:
    cfg, _, _ = parse_args(run.argv(common, "x", 1))
    out = dataclasses.asdict(cfg.resolved())
    return {k: v for k, v in out.items() if k not in RUN_CONTROL}


def run_state(run_dir: str) -> str:
    """'new', 'finished', 'diverged' or 'interrupted' (has a checkpoint to resume from)."""
    if os.path.isfile(os.path.join(run_dir, "diverged.txt")):
        return "diverged"
    summary = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary):
        with open(summary) as f:
            if json.load(f).get("finished"):
                return "finished"
    return "interrupted" if os.path.isfile(os.path.join(run_dir, "checkpoint.pt")) else "new"


def check_run_dir(run: Run, run_dir: str, common: list[str]) -> None:
    """A run directory that already holds a config must hold this run's."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        have = {k: v for k, v in json.load(f).items() if k not in RUN_CONTROL}
    want = _intended_config(run, common)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
        k = diff[0]
        raise StudyError(f"{run_dir} holds a different run ({k}: {have.get(k)!r} there, {want.get(k)!r} wanted); "
                         "use another --out or remove it")


def _execute(run: Run, run_dir: str, common: list[str], threads: int) -> tuple[str, str]:
    """Run (or resume) one training in a subprocess; returns (state, last error line)."""
    state = run_state(run_dir)
    if state in ("finished", "diverged"):
        return state, ""
    if state == "interrupted":
        argv = ["--resume", run_dir, "--no-progress"]
    else:
        argv = run.argv(common, run_dir, threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", "relaxeq_fast.train", *argv], capture_output=True, text=True,
                          env=env)
    err = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode == 1 and "non-finite loss" in proc.stderr:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "diverged.txt"), "w") as f:
            f.write(err + "\n")
        return "diverged", err
    if proc.returncode != 0:
        raise StudyError(f"{run.name}: relaxeq-train exited {proc.returncode}: {err}")
    return run_state(run_dir), ""


def _read_run(run: Run, run_dir: str) -> dict:
    state = run_state(run_dir)
    row = dict(run=run.name, method=run.method, lr=run.lr, seed=run.seed,
               axes=";".join(f"{k}={v}" for k, v in run.axes), status=state, run_dir=run_dir)
    if state != "finished":
        return {**row, "failed": state == "diverged"}
    with open(os.path.join(run_dir, "summary.json")) as f:
        s = json.load(f)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        history = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    m = summary_metric(s)
    test = s[f"test_{m}_projected"]
    if m == "acc":
        failed = test < 2 / s["num_classes"]  # below twice chance
    else:  # no better than predicting that nothing moves / that the last field persists (or not finite)
        failed = not test < s.get("test_mse_static", s.get("test_rmse_persistence", math.inf))
    # θ peaks at mid-training (triangle) or holds its peak until then (hold_linear): the epoch where the
    # relaxation can help or hinder optimisation most
    mid = history[(len(history) - 1) // 2]
    row.update({"metric": m, f"test_{m}_projected": test, "best_epoch": s.get("best_epoch"),
                f"best_test_{m}_projected": s.get(f"best_test_{m}_projected"),
                f"best_val_{m}_projected": s.get(f"best_val_{m}_projected"),
                f"val_{m}_projected": history[-1].get(f"val_{m}_projected", float("nan")),
                f"mid_train_{m}": mid[f"train_{m}"],
                # ‖f_θ − f_projected‖ / ‖f_projected‖ there: how much the model leans on the relaxation
                "mid_projection_error": mid["projection_error"],
                f"final_train_{m}": history[-1][f"train_{m}"], "seconds": s["seconds"], "failed": failed})
    for t in EXTRA_TESTS.get(m, ()):
        row.update({f"{t}_{m}_projected": s.get(f"{t}_{m}_projected"),
                    f"best_{t}_{m}_projected": s.get(f"best_{t}_{m}_projected")})
    row["curve"] = [h[f"test_{m}_projected"] for h in history]
    row["projection_curve"] = [h["projection_error"] for h in history]
    return row


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


def _fmt(m: float, s: float, metric: str = "acc") -> str:
    if math.isnan(m):
        return "—"
    return f"{format_metric(metric, m)} ± " + (f"{s:.3f}" if metric == "acc" else f"{s:.1e}")


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
                            + ")", "gap", lambda a, b: "—" if math.isnan(a) else f"{a:+.3g} ± {b:.2g}")):
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relaxeq-study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="study directory (runs/ and the study.* files)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: 0,1,2)")
    p.add_argument("--lrs", default="1e-3", help="comma list of learning rates (default: 1e-3)")
    p.add_argument("--methods", default="relaxed,plain", help="comma list of relaxed, plain (default: relaxed,plain)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="an ablation axis over a relaxeq-train setting (repeatable; augment values separated by ';') "
                        "(default: none)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads) (default: 1)")
    p.add_argument("--title", default=None,
                   help="title of study.md and study.png (default: 'relaxeq-study:' and the relaxeq-train arguments)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then relaxeq-train arguments common to every run")
    return p


def run_study(argv=None) -> dict:
    a = _parser().parse_args(argv)
    common = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    for bad in ("--seed", "--lr", "--plain", "--run-dir", "--resume", "--threads"):
        if any(t == bad or t.startswith(bad + "=") for t in common):
            raise StudyError(f"{bad} is set by the study per run; remove it from the relaxeq-train arguments")
    seeds = _split_list(a.seeds, "--seeds", int)
    lrs = _split_list(a.lrs, "--lrs", float)
    methods = _split_list(a.methods, "--methods", str)
    if not isinstance(a.jobs, int) or a.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {a.jobs}")
    runs = make_grid(seeds, lrs, methods, parse_axes(a.axis))
    try:  # every run's training arguments are checked before anything runs (axes: sizes, depths)
        from .train.cli import require_for
        from .train.config import validate
        first = parse_args(runs[0].argv(common, "x", 1))[0].resolved()
        require_for(first)
        for r in runs:
            try:
                validate(parse_args(r.argv(common, "x", 1))[0].resolved())
            except ConfigError as e:
                where = f"{r.name}: " if r.axes else ""
                raise ConfigError(f"{where}{e}") from None
    except ConfigError as e:
        raise StudyError(f"training arguments: {e}") from None
    except MissingDependency as e:
        raise StudyError(str(e)) from None
    run_root = os.path.join(a.out, "runs")
    dirs = {r: os.path.join(run_root, r.name) for r in runs}
    for r in runs:
        check_run_dir(r, dirs[r], common)
    os.makedirs(run_root, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    todo = [r for r in runs if run_state(dirs[r]) not in ("finished", "diverged")]
    print(f"[relaxeq-study] {len(runs)} runs, {len(runs) - len(todo)} already done; {len(todo)} to run, "
          f"{a.jobs} at a time, {threads} thread(s) each", flush=True)
    bar = None
    if not a.no_progress and todo:
        from .progress import progress, stderr_is_terminal
        # on a terminal an overall bar; in a log the per-run lines below already say it all
        bar = progress(total=len(todo), desc="study") if stderr_is_terminal() else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(_execute, r, dirs[r], common, threads): r for r in todo}
        for fut in as_completed(futures):
            r = futures[fut]
            state, err = fut.result()
            row = _read_run(r, dirs[r])
            if state == "finished":
                m = row["metric"]
                score = f"projected test {m} {format_metric(m, row[f'test_{m}_projected'])}"
            else:
                score = err
            line = f"[relaxeq-study] {r.name}: {state}, {score} ({time.perf_counter() - t0:.0f} s)"
            (bar.write(line) if bar else print(line, flush=True))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    rows = [_read_run(r, dirs[r]) for r in runs]
    title = a.title or f"relaxeq-study: {' '.join(common) or 'defaults'}"
    paths = write_outputs(a.out, rows, title)
    return dict(rows=rows, groups=aggregate(rows), paths=paths)


def main(argv=None) -> int:
    try:
        result = run_study(argv)
    except StudyError as e:
        print(f"relaxeq-study: error: {e}", file=sys.stderr)
        return 2
    print(open(result["paths"][1]).read())
    print("[relaxeq-study] " + ", ".join(p for p in result["paths"] if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
