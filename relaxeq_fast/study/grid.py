"""The study grid: runs (method × lr × seed × axis values), their directories, running and reading one."""
from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass

from ..train.cli import parse_args
from ..train.config import EXTRA_TESTS, TrainConfig
from ..train.report import summary_metric

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
