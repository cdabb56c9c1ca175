"""relaxeq-study: a tiny grid end to end (files, aggregation against statistics.mean/stdev, resume of an
interrupted run, finished runs skipped), the aggregation arithmetic on hand-made rows, bad grids."""
import csv
import json
import math
import os
import statistics

import pytest

from relaxeq_fast import study as S
from relaxeq_fast import train as T

TRAIN = ["--dataset", "shapes", "--n-train", "64", "--n-test", "24", "--num-points", "32", "--k", "6",
         "--width", "0.2", "--batch-size", "16", "--epochs", "2", "--val-fraction", "0.25",
         "--theta-schedule", "hold_linear", "--theta-unit", "step"]
GRID = ["--seeds", "0,1", "--lrs", "1e-3,3e-3", "--jobs", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("study"))
    # one run interrupted after its first epoch, as if the study had been killed: the study resumes it
    interrupted = S.Run("relaxed", 1e-3, 1, ())
    run_dir = os.path.join(out, "runs", interrupted.name)
    cfg, _, _ = T.parse_args(interrupted.argv(TRAIN, run_dir, 1))
    T.train(cfg, stop_after=1)
    assert S.run_state(run_dir) == "interrupted"
    rc = S.main(["--out", out, *GRID, "--", *TRAIN])
    assert rc == 0
    return out


def _rows(out):
    with open(os.path.join(out, "study.csv")) as f:
        return list(csv.DictReader(f))


def test_tiny_grid_runs_every_run_and_writes_the_study_files(tiny_study):
    out = tiny_study
    for name in ("study.csv", "study.md", "study.png"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "study.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = _rows(out)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"finished"}
    assert sorted((r["method"], float(r["lr"]), int(r["seed"])) for r in rows) == sorted(
        (m, lr, s) for m in ("relaxed", "plain") for lr in (1e-3, 3e-3) for s in (0, 1))
    for r in rows:  # every run is an ordinary relaxeq-train run with the study's seed, lr and method
        with open(os.path.join(r["run_dir"], "config.json")) as f:
            cfg = json.load(f)
        assert (cfg["seed"], cfg["lr"], cfg["plain"], cfg["epochs"]) == (int(r["seed"]), float(r["lr"]),
                                                                          r["method"] == "plain", 2)
        with open(os.path.join(r["run_dir"], "metrics.csv")) as f:
            assert len(list(csv.DictReader(f))) == 2


def test_interrupted_run_was_resumed_not_restarted(tiny_study):
    run_dir = os.path.join(tiny_study, "runs", S.Run("relaxed", 1e-3, 1, ()).name)
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    assert epochs == [1, 2]
    # and it equals the same run done in one go (exact resume)
    whole = os.path.join(tiny_study, "whole")
    cfg, _, _ = T.parse_args(S.Run("relaxed", 1e-3, 1, ()).argv(TRAIN, whole, 1))
    summary = T.train(cfg)
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["test_acc_projected"] == summary["test_acc_projected"]


def test_aggregation_matches_statistics_module(tiny_study):
    rows = _rows(tiny_study)
    with open(os.path.join(tiny_study, "study.md")) as f:
        md = f.read()
    for method in ("relaxed", "plain"):
        for lr in ("0.001", "0.003"):
            accs = [float(r["test_acc_projected"]) for r in rows if r["method"] == method and r["lr"] == lr]
            best = [float(r["best_test_acc_projected"]) for r in rows if r["method"] == method and r["lr"] == lr]
            line = next(x for x in md.splitlines() if x.startswith(f"| {method} | {float(lr):g} |"))
            assert f"{statistics.mean(accs):.3f} ± {statistics.stdev(accs):.3f}" in line
            assert f"{statistics.mean(best):.3f} ± {statistics.stdev(best):.3f}" in line
            # the validation and mid-training columns come from each run's own metrics.csv
            val, mid, err = [], [], []
            for r in rows:
                if r["method"] == method and r["lr"] == lr:
                    with open(os.path.join(r["run_dir"], "metrics.csv")) as f:
                        history = list(csv.DictReader(f))
                    val.append(float(history[-1]["val_acc_projected"]))
                    mid.append(float(history[(len(history) - 1) // 2]["train_acc"]))
                    err.append(float(history[(len(history) - 1) // 2]["projection_error"]))
                    assert float(r["val_acc_projected"]) == val[-1] and float(r["mid_train_acc"]) == mid[-1]
                    assert float(r["mid_projection_error"]) == err[-1]
            assert f"{statistics.mean(val):.3f} ± {statistics.stdev(val):.3f}" in line
            assert f"{statistics.mean(mid):.3f} ± {statistics.stdev(mid):.3f}" in line
            if method == "relaxed":
                assert min(err) > 0
                assert f"{statistics.mean(err):.2g} ± {statistics.stdev(err):.1g}" in line
            else:
                assert err == [0.0, 0.0] and line.split(" | ")[-2] == "—"


def test_second_invocation_skips_finished_runs(tiny_study, capsys):
    stamps = {r["run_dir"]: os.path.getmtime(os.path.join(r["run_dir"], "summary.json")) for r in _rows(tiny_study)}
    assert S.main(["--out", tiny_study, *GRID, "--", *TRAIN]) == 0
    assert "8 runs, 8 already done; 0 to run" in capsys.readouterr().out
    assert stamps == {d: os.path.getmtime(os.path.join(d, "summary.json")) for d in stamps}


def test_diverged_run_is_marked_failed_and_not_repeated(tmp_path, capsys):
    args = ["--out", str(tmp_path), "--seeds", "0", "--lrs", "1e30", "--methods", "plain", "--no-progress",
            "--", *TRAIN, "--optimizer", "sgd"]  # SGD at lr 1e30: a non-finite loss in the first epoch
    assert S.main(args) == 0
    out = capsys.readouterr().out
    row = _rows(str(tmp_path))[0]
    assert (row["status"], row["failed"]) == ("diverged", "True"), row
    assert "| plain | 1e+30 | — | 0/1 (0) | — | — | — | — | — | 100% |" in out
    assert S.main(args) == 0 and "1 runs, 1 already done; 0 to run" in capsys.readouterr().out


def test_aggregate_by_hand():
    def row(method, seed, acc, status="finished", failed=False, best=None):
        return dict(method=method, lr=1e-3, seed=seed, axes="", status=status, failed=failed,
                    test_acc_projected=acc, best_test_acc_projected=best,
                    val_acc_projected=None if acc is None else acc - 0.1, mid_train_acc=best)
    rows = [row("relaxed", 0, 0.5, best=0.6), row("relaxed", 1, 0.7, best=0.8),
            row("relaxed", 2, None, status="diverged", failed=True),
            row("plain", 0, 0.1, failed=True, best=0.1), row("plain", 1, 0.4, best=0.5), row("plain", 2, 0.7, best=0.6)]
    groups = {g["method"]: g for g in S.aggregate(rows)}
    r, p = groups["relaxed"], groups["plain"]
    assert (r["runs"], r["finished"], r["failure_rate"]) == (3, 2, pytest.approx(1 / 3))
    assert r["final_mean"] == pytest.approx(0.6) and r["final_std"] == pytest.approx(math.sqrt(0.02))
    assert r["best_mean"] == pytest.approx(0.7) and r["best_std"] == pytest.approx(math.sqrt(0.02))
    assert r["val_mean"] == pytest.approx(0.5) and r["val_std"] == pytest.approx(math.sqrt(0.02))
    assert r["mid_train_mean"] == pytest.approx(0.7)
    assert p["final_mean"] == pytest.approx(0.4) and p["final_std"] == pytest.approx(0.3)
    assert p["failure_rate"] == pytest.approx(1 / 3)
    assert S.mean_std([0.25]) == (0.25, 0.0)


def test_relaxation_axes_are_not_crossed_with_plain_runs():
    runs = S.make_grid([0], [1e-3], ["relaxed", "plain"],
                       S.parse_axes(["lambda_n=1e-2,1e-3", "epochs=5,10", "augment=none;scale,shift"]))
    relaxed = [r for r in runs if r.method == "relaxed"]
    plain = [r for r in runs if r.method == "plain"]
    assert len(relaxed) == 8 and len(plain) == 4
    assert all(dict(r.axes).keys() == {"epochs", "augment"} for r in plain)
    argv = relaxed[-1].argv([], "d", 1)
    assert argv[argv.index("--augment") + 1] == "scale,shift"


@pytest.mark.parametrize("args, cause", [
    (["--axis", "colour=red"], "--axis 'colour' is not an ablation axis"),
    (["--axis", "seed=1,2"], "--axis 'seed' is not an ablation axis"),
    (["--axis", "lambda_n="], "--axis lambda_n has no values"),
    (["--axis", "lambda_n"], "expected name=v1,v2"),
    (["--axis", "lambda_n=1", "--axis", "lambda-n=2"], "--axis lambda_n given twice"),
    (["--seeds", ""], "--seeds is empty"),
    (["--lrs", "fast"], "--lrs must be a comma list of float values"),
    (["--methods", "relaxed,frozen"], "--methods takes"),
    (["--jobs", "0"], "--jobs must be >= 1"),
    (["--", "--lr", "1e-2"], "--lr is set by the study per run"),
    (["--", "--theta-schedule", "zigzag"], "training arguments: --theta-schedule must be one of"),
])
def test_bad_grid_is_one_line_naming_the_cause(args, cause, tmp_path, capsys):
    rc = S.main(["--out", str(tmp_path), "--no-progress"] + args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("relaxeq-study: error:") and cause in err[0], err


def test_run_directory_with_another_config_is_refused(tmp_path, capsys):
    run = S.Run("relaxed", 1e-3, 0, ())
    run_dir = tmp_path / "runs" / run.name
    run_dir.mkdir(parents=True)
    cfg, _, _ = T.parse_args(run.argv(TRAIN + ["--lambda-n", "0.5"], str(run_dir), 1))
    (run_dir / "config.json").write_text(json.dumps(__import__("dataclasses").asdict(cfg.resolved())))
    rc = S.main(["--out", str(tmp_path), "--seeds", "0", "--lrs", "1e-3", "--methods", "relaxed", "--no-progress",
                 "--", *TRAIN])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "holds a different run (lambda_n: 0.5 there, 0.01 wanted)" in err[0], err


def _curve_row(method, seed, n_train, test, train, status="finished"):
    return dict(method=method, lr=1e-3, seed=seed, axes=f"n_train={n_train}", status=status, failed=False,
                test_acc_projected=test, final_train_acc=train, best_test_acc_projected=None,
                val_acc_projected=None, mid_train_acc=None)


def test_size_axis_is_crossed_with_both_methods_and_its_runs_are_distinct():
    runs = S.make_grid([0, 1], [1e-3], ["relaxed", "plain"], S.parse_axes(["n_train=96,192,480", "layers=4,8"]))
    assert len(runs) == 2 * 2 * 3 * 2 and len({r.name for r in runs}) == len(runs)
    assert {dict(r.axes)["n_train"] for r in runs if r.method == "plain"} == {"96", "192", "480"}
    argv = runs[0].argv([], "d", 1)
    assert argv[argv.index("--n-train") + 1] == "96" and argv[argv.index("--layers") + 1] == "4"


def test_curves_aggregate_per_axis_value_as_the_statistics_module(tmp_path):
    """Per method and n_train value: the final test accuracy and the train–test gap as statistics.mean / stdev
    of the runs; study.md's curve tables hold them; study_n_train.png is written."""
    data = {("relaxed", 96): [(0.5, 0.9), (0.6, 0.8), (0.4, 0.95)], ("relaxed", 480): [(0.7, 0.75), (0.72, 0.8)],
            ("plain", 96): [(0.55, 0.99), (0.45, 0.97)], ("plain", 480): [(0.8, 0.82), (0.78, 0.9), (0.75, 0.8)]}
    rows = [_curve_row(m, seed, n, test, train) for (m, n), runs in data.items() for seed, (test, train) in enumerate(runs)]
    rows.append(_curve_row("plain", 9, 480, None, None, status="diverged"))
    groups = S.aggregate(rows)
    assert [g["axes"] for g in groups] == ["n_train=96"] * 2 + ["n_train=480"] * 2  # by value, not as strings
    assert S.curve_axes(groups) == ["n_train"]
    by_curve = S.curves(groups, "n_train")
    assert set(by_curve) == {("relaxed", 1e-3, ""), ("plain", 1e-3, "")}
    for (method, n), runs in data.items():
        g = by_curve[(method, 1e-3, "")][n]
        tests, gaps = [t for t, _ in runs], [tr - t for t, tr in runs]
        assert g["final_mean"] == pytest.approx(statistics.mean(tests))
        assert g["final_std"] == pytest.approx(statistics.stdev(tests))
        assert g["gap_mean"] == pytest.approx(statistics.mean(gaps))
        assert g["gap_std"] == pytest.approx(statistics.stdev(gaps))
    assert by_curve[("plain", 1e-3, "")][480]["runs"] == 4 and by_curve[("plain", 1e-3, "")][480]["finished"] == 3
    _, md_path, _ = S.write_outputs(str(tmp_path), rows, "curves")
    md = open(md_path).read()
    assert "## final projected test acc against n_train" in md and "## train–test gap" in md
    relaxed_line = next(l for l in md.splitlines() if l.startswith("| relaxed | 0.001 | — | 0.500"))
    assert f"{statistics.mean([0.7, 0.72]):.3f} ± {statistics.stdev([0.7, 0.72]):.3f}" in relaxed_line
    gap_line = [l for l in md.splitlines() if l.startswith("| relaxed | 0.001 | — |")][1]
    gaps_96 = [0.9 - 0.5, 0.8 - 0.6, 0.95 - 0.4]  # one format per column: 3 decimals, sign always shown
    assert gap_line.split(" | ")[3] == f"+{statistics.mean(gaps_96):.3f} ± {statistics.stdev(gaps_96):.3f}"
    if __import__("importlib").util.find_spec("matplotlib"):
        assert os.path.isfile(os.path.join(str(tmp_path), "study_n_train.png"))


def test_a_size_axis_study_runs_resumes_and_skips(tmp_path, capsys):
    """Two n_train values end to end: distinct run directories, a second invocation finds both done."""
    out = str(tmp_path)
    grid = ["--out", out, "--seeds", "0", "--methods", "relaxed", "--axis", "n_train=32,48", "--no-progress"]
    train = [a for a in TRAIN if a not in ()]
    train[train.index("--n-train") + 1:train.index("--n-train") + 2] = []
    train.remove("--n-train")
    train[train.index("--epochs") + 1] = "1"
    assert S.main(grid + ["--", *train]) == 0
    names = sorted(os.listdir(os.path.join(out, "runs")))
    assert len(names) == 2 and all(S.run_state(os.path.join(out, "runs", n)) == "finished" for n in names)
    for n, size in zip(names, ("32", "48")):
        with open(os.path.join(out, "runs", n, "config.json")) as f:
            assert json.load(f)["n_train"] == int(size)
    capsys.readouterr()
    assert S.main(grid + ["--", *train]) == 0
    assert "2 runs, 2 already done" in capsys.readouterr().out


@pytest.mark.parametrize("axis, train, cause", [
    ("n_train=100,5000", ["--model", "egnn", "--dataset", "nbody"],
     "n_train=5000: --n-train 5000 is larger than the nbody training set (3000 samples)"),
    ("n_train=160,32", ["--batch-size", "40"], "n_train=32: --n-train 32 leaves 32 training samples after the "
     "validation split, fewer than one batch (--batch-size 40)"),
    ("layers=4,0", ["--model", "egnn", "--dataset", "nbody"], "--layers must be a positive integer, got 0"),
    ("layers=2", [], "--layers 2: --model vn_pointnet has no depth setting"),
])
def test_sizes_and_depths_that_cannot_run_are_refused_naming_the_value(axis, train, cause, tmp_path, capsys):
    rc = S.main(["--out", str(tmp_path), "--no-progress", "--seeds", "0", "--axis", axis, "--", *train])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and cause in err[0], err
    assert not os.path.isdir(os.path.join(str(tmp_path), "runs"))
