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

# one module per concern: the grid and its runs, the report (tables, plots, curves), the command line
from .grid import (CURVE_AXES, METHODS, NOT_AXES, RELAXATION_AXES, RUN_CONTROL, Run, StudyError, check_run_dir,
                   make_grid, parse_axes, run_state, study_fields)
from .report import aggregate, curve_axes, curves, mean_std, study_metric, write_outputs
from .cli import main, run_study

__all__ = ["CURVE_AXES", "METHODS", "NOT_AXES", "RELAXATION_AXES", "RUN_CONTROL", "Run", "StudyError",
           "check_run_dir", "make_grid", "parse_axes", "run_state", "study_fields", "aggregate", "curve_axes",
           "curves", "mean_std", "study_metric", "write_outputs", "main", "run_study"]
