"""relaxeq-train --theta-schedule dual (issue 28): per-layer θ_ℓ learnt under the constraint θ_ℓ = 0. A tiny run
logs θ_ℓ and μ_ℓ per layer, the multipliers grow every epoch and the θ_ℓ fall; the run ends with θ_ℓ := 0 (the
projection error before that in summary.json) and an exactly invariant model (float64); resume reproduces the
uninterrupted run, θ_ℓ and μ_ℓ included; the combinations that need one global θ are refused. --theta-schedule
elastic: the final model keeps its relaxation, saved as such, with its per-layer equivariance errors. A dual step
dispatches at most 1.1× the ops of a triangle step (counted)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relaxeq_fast import train as T
from relaxeq_fast.relaxation import DualTheta, ThetaScheduler, make_schedule
from relaxeq_fast.train.loop import forward_loss, train_step
from relaxeq_fast.vn import relaxed_layers

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
    # the reported loss is task + regulariser, without the penalty Σ μ_ℓ θ_ℓ² (larger than any task loss here)
    for row, th, mu in zip(rows, thetas, mus):
        assert float(row["train_loss"]) < 10 < sum(m * t * t for m, t in zip(mu, th))
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
    (["--theta-schedule", "elastic", "--dual-lr", "1", "--slack-cost", "0"], "--slack-cost must be a finite number > 0"),
    (["--theta-schedule", "elastic", "--dual-lr", "2", "--slack-cost", "1"], "needs --dual-lr < 2 × --slack-cost"),
    (["--theta-schedule", "elastic", "--dual-lr", "1", "--relax-lr", "theta"], "--theta-schedule elastic learns one"),
    (["--theta-lr", "0"], "--theta-lr must be a finite number > 0"),
    (["--theta-schedule", "triangle", "--theta-lr", "0.1"], "--theta-lr is the learning rate of learnt θ_ℓ"),
])
def test_dual_config_errors(argv, message):
    cfg, _, _ = T.parse_args(TINY + argv)
    with pytest.raises(T.ConfigError, match=message):
        T.validate(cfg.resolved())


ELASTIC = [a for a in TINY if a not in ("dual", "--dual-lr", "5")] + ["--dual-lr", "0.5", "--slack-cost", "0.5"]
ELASTIC[ELASTIC.index("--theta-schedule") + 1:ELASTIC.index("--theta-schedule") + 1] = ["elastic"]


def test_elastic_run_keeps_its_relaxation_and_reports_per_layer_errors(tmp_path):
    run_dir = str(tmp_path / "run")
    summary = _run(ELASTIC + ["--run-dir", run_dir])
    rows = _metrics(run_dir)
    layers = summary["relaxed_layers"]
    assert summary["kept_relaxation"] is True
    for i in range(layers):  # the allowed |θ_ℓ| is √(μ_ℓ/α)
        assert float(rows[-1][f"u_l{i}"]) == pytest.approx((float(rows[-1][f"mu_l{i}"]) / 0.5) ** 0.5, rel=1e-9)
    # no projection: the final scores are the relaxed model's own, and it is not invariant (float64)
    assert float(rows[-1]["test_acc_projected"]) == float(rows[-1]["test_acc"]) == summary["test_acc_projected"]
    assert summary["equivariance_error"] > 1e-6 and summary["theta_final"] != 0.0
    assert summary["thetas_final"] == pytest.approx([float(rows[-1][f"theta_l{i}"]) for i in range(layers)], rel=1e-12)
    errors = summary["layer_equivariance_errors"]
    assert len(errors) == layers and all(0 < e["error"] < 10 for e in errors)
    assert [e["theta"] for e in errors] == pytest.approx(summary["thetas_final"], rel=1e-12)
    # saved as the relaxed model: it loads strictly into the relaxed model class, θ_ℓ included
    assert summary["model_file"] == os.path.join(run_dir, "model_relaxed.pt")
    assert not os.path.exists(os.path.join(run_dir, "model_projected.pt"))
    saved = torch.load(summary["model_file"], weights_only=False)
    relaxed = T.build_model(T.TrainConfig(**saved["config"]).resolved(), num_classes=16).double()
    relaxed.load_state_dict(saved["model"])
    assert [float(m.theta) for m in relaxed_layers(relaxed)] == pytest.approx(summary["thetas_final"], rel=1e-12)
    assert "relaxed, kept (elastic)" in T.format_summary(summary)


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(schedule: str) -> int:
    """Ops one warm trainer step dispatches (train_step as the trainer calls it) at VN-PointNet's demo-like size."""
    cfg, _, _ = T.parse_args(["--model", "vn_pointnet", "--dataset", "shapes", "--num-points", "64", "--k", "10",
                              "--width", "0.25", "--batch-size", "8", "--theta-schedule", schedule])
    cfg = cfg.resolved()
    torch.manual_seed(0)
    model = T.build_model(cfg, num_classes=16)
    if schedule == "dual":
        theta, dual = DualTheta(model, cfg.theta_init, cfg.dual_lr), None
        dual = theta
    else:
        theta, dual = ThetaScheduler(model, make_schedule(schedule, 10, theta_max=cfg.theta_max)), None
        theta.step()  # θ > 0
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    x, y = torch.randn(8, 64, 3), torch.randint(0, 16, (8,))
    theta_buffer = next(iter(relaxed_layers(model))).theta

    def step():
        train_step(model, model, x, y, cfg, opt, theta_buffer, None, 0.0, forward_loss, None, dual)

    step()
    with _CountOps() as count:
        step()
    return count.n


def test_a_dual_step_dispatches_at_most_1_1_times_a_triangle_steps_ops():
    triangle, dual = ops_per_step("triangle"), ops_per_step("dual")
    print(f"ops per step: triangle {triangle}, dual {dual} ({dual / triangle:.3f}×)")
    assert dual <= 1.1 * triangle


def test_theta_lr_is_the_learnt_thetas_own_step(tmp_path):
    # Adam's bias-corrected steps move a parameter by at most about its lr each: 4 steps (64 / 16) at --theta-lr 0.05
    # move θ_ℓ by up to 0.2, and further than the 4 × 1e-3 that --lr 1e-3 (VN-PointNet's) would allow
    argv = TINY + ["--epochs", "1", "--dual-lr", "0", "--theta-lr", "0.05", "--run-dir", str(tmp_path / "run")]
    summary = _run(argv)
    moved = [abs(t - 0.8) for t in summary["thetas_final"]]
    assert max(moved) <= 4 * 0.05 * 1.001 and max(moved) > 4 * 1e-3 * 1.5, moved
    with open(os.path.join(summary["run_dir"], "config.json")) as f:
        assert json.load(f)["lr"] == 1e-3


def test_relaxation_persistence_orders_layers_by_how_long_they_kept_theta(tmp_path, dual_run):
    run_dir, summary = dual_run
    names = summary["relaxed_layer_names"]
    assert len(names) == summary["relaxed_layers"] and "conv_pos.map_to_feat" in names
    # a hand-made history: layer 1 falls below 10 % of its start at epoch 2, layer 0 at epoch 4, layer 2 never
    thetas = [[1.0, -0.5, 0.3], [0.5, -0.01, 0.3], [0.2, 0.02, 0.2], [0.05, 0.0, 0.1]]
    d = tmp_path / "synthetic"
    d.mkdir()
    with open(d / "summary.json", "w") as f:
        json.dump({"relaxed_layer_names": ["a", "b", "c"]}, f)
    with open(d / "metrics.csv", "w") as f:
        f.write("epoch,theta_l0,theta_l1,theta_l2\n")
        for epoch, row in enumerate(thetas, 1):
            f.write(f"{epoch},{','.join(map(str, row))}\n")
    got = T.relaxation_persistence(str(d))
    assert [(g["name"], g["last_epoch"]) for g in got] == [("c", 4), ("a", 3), ("b", 1)]
    assert got[0]["theta_start"] == 0.3 and got[2]["theta_final"] == 0.0
    assert len(T.relaxation_persistence(run_dir)) == summary["relaxed_layers"]
    with pytest.raises(ValueError, match="no per-layer θ_ℓ"):
        (d / "metrics.csv").write_text("epoch,theta\n1,0.5\n")
        T.relaxation_persistence(str(d))


def test_relaxation_report_script_shows_each_layers_theta_and_multiplier(dual_run):
    run_dir, summary = dual_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", "relaxation_report.py"), run_dir],
                         capture_output=True, text=True, check=True).stdout
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| ") and "layer" not in line]
    assert [r[1].strip() for r in rows] == summary["relaxed_layer_names"]
    # the checkpoint's θ_ℓ (after the last epoch, before θ_ℓ := 0) and μ_ℓ, in relaxed_layers order
    for r, name, mu in zip(rows, summary["relaxed_layer_names"], ck["theta"]["multipliers"].tolist()):
        assert float(r[4]) == pytest.approx(float(ck["model"][f"{name}.theta"]), rel=1e-3)
        assert float(r[5]) == pytest.approx(mu, rel=1e-3)
