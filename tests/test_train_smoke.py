"""relaxeq-train on the smoke plumes (--dataset smoke, --model cnn / equiv / rsteer): a relaxed run ends projected
and exactly equivariant with the RMSEs of its saved model (recomputed here by rolling it out by hand), RSteer's
projection is RSteer, exact resume, the forecast plot, a study aggregating both test splits against
statistics.mean / stdev, and the configuration errors."""
import csv
import json
import math
import os
import statistics

import pytest
import torch

pytest.importorskip("phi", reason="the smoke plumes are simulated with PhiFlow: pip install 'relaxeq_fast[flow]'")

from relaxeq_fast import train as T  # noqa: E402
from relaxeq_fast.data.smoke import load_smoke, rotate_fields  # noqa: E402
from relaxeq_fast.steerable import RSteerConv  # noqa: E402
from testing import run_metrics as _metrics, train_run as _run  # noqa: E402

TINY = ["--dataset", "smoke", "--smoke-preset", "tiny", "--width", "0.05", "--batch-size", "8", "--epochs", "3",
        "--n-train", "24", "--n-test", "6", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def equiv_run(smoke_cache, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("equiv") / "run")
    summary = _run(TINY + ["--model", "equiv", "--data-root", smoke_cache, "--run-dir", run_dir, "--dtype", "float64"])
    return run_dir, summary


def _rmse_by_hand(model, split, n_pick):
    """√(mean over windows of the window's MSE over its rolled-out steps), the windows chosen as the trainer's
    --n-test picks them (a seeded permutation, sorted)."""
    pick = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(104729))[:n_pick].sort().values
    x, y = split.x[pick].double(), split.y[pick].double()
    with torch.no_grad():
        window, preds = x.flatten(1, 2), []
        for _ in range(y.shape[1]):
            p = model.step(window)
            preds.append(p)
            window = torch.cat((window[:, 2:], p), 1)
    pred = torch.stack(preds, 1)
    return (pred - y).square().flatten(1).mean(1).mean().sqrt().item()


def test_relaxed_equiv_run_ends_projected_with_the_rmse_of_its_saved_model(equiv_run, smoke_cache):
    run_dir, summary = equiv_run
    rows = _metrics(run_dir)
    assert list(rows[0])[:6] == ["epoch", "step", "lr", "theta", "train_loss", "train_rmse"]
    assert "test_domain_rmse_projected" in rows[0]
    assert float(rows[0]["theta"]) > 0 and float(rows[-1]["theta"]) == 0.0
    assert float(rows[0]["projection_error"]) > 1e-6 and float(rows[-1]["projection_error"]) == 0.0
    assert summary["finished"] and summary["metric"] == "rmse" and summary["relaxed_layers"] == 5
    assert summary["equivariance_error"] < 1e-10  # float64: the projected model turns with the grid
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    cfg = T.TrainConfig(**{**saved["config"], "plain": True}).resolved()
    plain = T.build_model(cfg).to(torch.float64)
    plain.load_state_dict(saved["model"])
    data = load_smoke("tiny", cache_dir=smoke_cache, progress=False)
    for name, split in (("test", data.test_future), ("test_domain", data.test_domain)):
        rmse = _rmse_by_hand(plain, split, 6)
        assert summary[f"{name}_rmse_projected"] == pytest.approx(rmse, rel=1e-10)
        assert float(rows[-1][f"{name}_rmse_projected"]) == pytest.approx(rmse, rel=1e-10)
        # the persistence floor: the last input field repeated
        pick = torch.randperm(len(split.y), generator=torch.Generator().manual_seed(104729))[:6].sort().values
        last = split.x[pick][:, -1:].double()
        floor = (split.y[pick].double() - last).square().flatten(1).mean(1).mean().sqrt().item()
        assert summary[f"{name}_rmse_persistence"] == pytest.approx(floor, rel=1e-10)
    best = int(summary["best_epoch"])
    assert summary["best_test_domain_rmse_projected"] == pytest.approx(float(rows[best - 1]["test_domain_rmse_projected"]))
    assert float(rows[-1]["train_rmse"]) < float(rows[0]["train_rmse"])
    assert os.path.isfile(summary["forecast_plot"]) and os.path.isfile(summary["plot"])


def test_smoke_resume_is_exact(smoke_cache, equiv_run, tmp_path):
    run_dir, _ = equiv_run
    split = str(tmp_path / "split")
    argv = TINY + ["--model", "equiv", "--data-root", smoke_cache, "--run-dir", split, "--dtype", "float64"]
    assert not _run(argv + ["--stop-after", "1"])["finished"]
    _run(["--resume", split, "--no-progress"])
    assert _metrics(split) == _metrics(run_dir)


def test_relaxed_rsteer_run_projects_to_rsteer(smoke_cache, tmp_path):
    run_dir = str(tmp_path / "rsteer")
    summary = _run(TINY + ["--model", "rsteer", "--data-root", smoke_cache, "--run-dir", run_dir, "--epochs", "2",
                           "--rsteer-alpha", "0.1"])
    assert summary["finished"] and summary["relaxed_layers"] == 5
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    plain = T.build_model(T.TrainConfig(**{**saved["config"], "plain": True}).resolved())
    plain.load_state_dict(saved["model"])
    assert [type(m) for m in plain.modules() if isinstance(m, RSteerConv)] == [RSteerConv] * 5
    # RSteer is only approximately equivariant: its coefficients differ over the kernel positions
    assert summary["equivariance_error"] > 1e-4 and plain.auxiliary_loss().item() > 0


def test_plain_cnn_run(smoke_cache, tmp_path):
    summary = _run(TINY + ["--model", "cnn", "--plain", "--data-root", smoke_cache, "--run-dir",
                           str(tmp_path / "cnn"), "--epochs", "1"])
    assert summary["finished"] and summary["relaxed_layers"] == 0 and math.isfinite(summary["test_rmse_projected"])


def test_training_loss_is_the_sum_of_the_steps_mse_plus_rsteers_penalty():
    """forward_loss on a forecast batch: Σ_t MSE(step t) over the rolled-out steps (the public code's loss) plus
    alpha × RSteer's coefficient penalty; the metric sum is Σ over windows of each window's MSE."""
    from relaxeq_fast.train import loop
    cfg = T.TrainConfig(model="rsteer", dataset="smoke", plain=True, rsteer_alpha=0.5, width=0.05).resolved()
    torch.manual_seed(0)
    model = T.build_model(cfg).double()
    x = torch.randn(3, 10, 2, 8, 8, dtype=torch.float64)
    y = torch.randn(3, 4, 2, 8, 8, dtype=torch.float64)
    loss, reg, _r_ld, _r_n, metric_sum = loop.forward_loss(model, model, x, y, cfg, None)
    with torch.no_grad():
        pred = model(x, 4)
    per_step = [((pred[:, t] - y[:, t]) ** 2).mean() for t in range(4)]
    penalty = sum(m.coefficient_penalty() for m in model.modules() if isinstance(m, RSteerConv))
    assert penalty > 0 and reg.item() == 0.0
    assert loss.item() == pytest.approx((sum(per_step) + 0.5 * penalty).item(), rel=1e-12)
    per_window = ((pred - y) ** 2).flatten(1).mean(1)
    assert metric_sum.item() == pytest.approx(per_window.sum().item(), rel=1e-12)


def test_final_check_sees_a_model_that_ignores_the_turn():
    x = torch.randn(2, 3, 2, 6, 6, dtype=torch.float64)
    from relaxeq_fast.train.task import flow_equivariance_error
    keep_last = lambda frames, steps: frames[:, -1:].repeat(1, steps, 1, 1, 1)  # noqa: E731  (equivariant)
    assert flow_equivariance_error(keep_last, x) < 1e-15
    push_right = lambda frames, steps: keep_last(frames, steps) + torch.tensor([1.0, 0.0]).view(1, 1, 2, 1, 1)  # noqa: E731
    assert flow_equivariance_error(push_right, x) > 0.1
    assert torch.equal(rotate_fields(keep_last(x, 1)), keep_last(rotate_fields(x), 1))


def test_study_of_smoke_runs_aggregates_both_test_splits(smoke_cache, tmp_path):
    from relaxeq_fast import study as S
    out = str(tmp_path / "study")
    common = TINY[:-3] + ["--data-root", smoke_cache, "--epochs", "2"]
    assert S.main(["--out", out, "--seeds", "0,1", "--methods", "relaxed", "--no-progress", "--",
                   "--model", "equiv", *common]) == 0
    with open(os.path.join(out, "study.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and {r["status"] for r in rows} == {"finished"}
    summaries = []
    for r in rows:
        with open(os.path.join(r["run_dir"], "summary.json")) as f:
            summaries.append(json.load(f))
    group = S.aggregate([S.grid._read_run(S.Run("relaxed", 1e-3, seed, ()),
                                     os.path.join(out, "runs", S.Run("relaxed", 1e-3, seed, ()).name)) for seed in (0, 1)])[0]
    for key, field in (("final", "test_rmse_projected"), ("test_domain_final", "test_domain_rmse_projected"),
                       ("test_domain_best", "best_test_domain_rmse_projected")):
        values = [s[field] for s in summaries]
        assert group[f"{key}_mean"] == pytest.approx(statistics.mean(values), rel=1e-12)
        assert group[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-12)
    for r, s in zip(rows, summaries):
        assert r["failed"] == str(not s["test_rmse_projected"] < s["test_rmse_persistence"])
    with open(os.path.join(out, "study.md")) as f:
        table = f.read()
    assert "final test_domain rmse" in table and "the last input field persists" in table


@pytest.mark.parametrize("argv, message", [
    (["--model", "equiv", "--dataset", "shapes"], "do not go together"),
    (["--model", "vn_pointnet", "--dataset", "smoke"], "do not go together"),
    (["--model", "cnn", "--dataset", "smoke"], "--model cnn has no symmetry to relax: add --plain"),
    (["--model", "equiv", "--dataset", "smoke", "--val-fraction", "0.1"], "own validation frames"),
    (["--model", "equiv", "--dataset", "smoke", "--train-rotation", "so3"], "are not rotated"),
    (["--model", "equiv", "--dataset", "smoke", "--smoke-preset", "huge"], r"--smoke-preset must be one of"),
    (["--model", "rsteer", "--dataset", "smoke", "--rsteer-alpha", "-1"], "--rsteer-alpha must be a finite number >= 0"),
    (["--model", "equiv", "--dataset", "smoke", "--group", "1"], "--group must be an int N >= 2"),
    (["--model", "equiv", "--dataset", "smoke", "--defect", "both"], "--defect must be one of"),
    (["--model", "equiv", "--dataset", "smoke", "--lr-gamma", "0"], r"--lr-gamma must be in \(0, 1\]"),
])
def test_config_errors_name_the_argument(argv, message):
    cfg, _, _ = T.parse_args(argv + ["--no-progress"])
    with pytest.raises(T.ConfigError, match=message) as e:
        T.validate(cfg.resolved())
    assert "\n" not in str(e.value)


def test_too_many_windows_asked_for(smoke_cache):
    cfg, _, _ = T.parse_args(["--model", "equiv", "--dataset", "smoke", "--data-root", smoke_cache, "--n-train",
                              "1000", "--no-progress"])
    with pytest.raises(T.ConfigError, match="--n-train 1000 must be between 1 and the 72 windows"):
        T.train(cfg)
