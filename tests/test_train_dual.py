"""relaxeq-train --theta-schedule dual (issue 28): per-layer θ_ℓ learnt under the constraint θ_ℓ = 0. A tiny run
logs θ_ℓ and μ_ℓ per layer, the multipliers grow every epoch and the θ_ℓ fall; the run ends with θ_ℓ := 0 (the
projection error before that in summary.json) and an exactly invariant model (float64); resume reproduces the
uninterrupted run, θ_ℓ and μ_ℓ included; the combinations that need one global θ are refused."""
import json
import os

import pytest
import torch

from relaxeq_fast import train as T

from testing import run_metrics as _metrics, train_run as _run

TINY = ["--model", "vn_pointnet", "--dataset", "shapes", "--n-train", "64", "--n-test", "24", "--num-points", "32",
        "--k", "6", "--width", "0.2", "--batch-size", "16", "--epochs", "3", "--no-progress", "--threads", "1",
        "--theta-schedule", "dual", "--dual-lr", "5", "--theta-init", "0.8", "--dtype", "float64"]


@pytest.fixture(scope="module")
def dual_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("dual") / "run")
    return run_dir, _run(TINY + ["--run-dir", run_dir])


def test_dual_run_logs_per_layer_theta_and_multipliers_and_ends_projected(dual_run):
    run_dir, summary = dual_run
    rows = _metrics(run_dir)
    layers = summary["relaxed_layers"]
    assert layers > 1
    thetas = [[float(r[f"theta_l{i}"]) for i in range(layers)] for r in rows]
    mus = [[float(r[f"mu_l{i}"]) for i in range(layers)] for r in rows]
    assert f"theta_l{layers}" not in rows[0]
    for before, after in zip(mus, mus[1:]):
        assert all(b < a for b, a in zip(before, after))  # every multiplier grows while its θ_ℓ ≠ 0
    for before, after in zip(thetas, thetas[1:]):
        assert all(abs(a) < abs(b) for b, a in zip(before, after))  # and every θ_ℓ falls
    assert all(abs(t) < 0.8 for t in thetas[0])  # from --theta-init
    # the row's θ is the mean θ_ℓ
    assert float(rows[-1]["theta"]) == pytest.approx(sum(thetas[-1]) / layers, rel=1e-6)
    # the end: the learnt θ_ℓ and how far the model was from its projection, then θ_ℓ := 0 and projection
    assert summary["thetas_final"] == pytest.approx(thetas[-1], rel=1e-12)
    assert summary["projection_error_final"] == pytest.approx(float(rows[-1]["projection_error"]), rel=1e-9)
    assert summary["projection_error_final"] > 0 and summary["theta_final"] == 0.0
    assert summary["equivariance_error"] < 1e-10  # float64: the projected model is exactly invariant
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    plain = T.build_model(T.TrainConfig(**{**saved["config"], "plain": True}).resolved(), num_classes=16)
    plain.load_state_dict(saved["model"])  # strictly: no θ_ℓ, no relaxation left


def test_dual_resume_is_exact(dual_run, tmp_path):
    run_dir, _ = dual_run
    split = str(tmp_path / "split")
    assert not _run(TINY + ["--run-dir", split, "--stop-after", "1"])["finished"]
    _run(["--resume", split, "--no-progress"])
    assert _metrics(split) == _metrics(run_dir)
    with open(os.path.join(split, "summary.json")) as f, open(os.path.join(run_dir, "summary.json")) as g:
        a, b = json.load(f), json.load(g)
    assert a["multipliers_final"] == b["multipliers_final"] and a["thetas_final"] == b["thetas_final"]


@pytest.mark.parametrize("argv, message", [
    (["--relax-lr", "theta"], "--relax-lr theta scales the relaxation's lr by one global θ"),
    (["--theta-scaled-lambda"], "--theta-scaled-lambda scales λ by one global θ"),
    (["--dual-lr", "-1"], "--dual-lr must be a finite number >= 0"),
    (["--theta-init", "nan"], "--theta-init must be a finite number"),
])
def test_dual_config_errors(argv, message):
    cfg, _, _ = T.parse_args(TINY + argv)
    with pytest.raises(T.ConfigError, match=message):
        T.validate(cfg.resolved())
