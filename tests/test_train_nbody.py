"""relaxeq-train on the charged N-body task (--model egnn / segnn --dataset nbody): MSE runs end projected and
E(3)-equivariant, the reported MSE is the saved model's (recomputed here by hand), exact resume, model selection
by the lowest validation MSE, rotations of the systems with their targets, and the configuration errors."""
import csv
import json
import math
import os

import pytest
import torch

from relaxeq_fast import train as T
from relaxeq_fast.data import nbody
from relaxeq_fast.reps import random_rotation
from relaxeq_fast.train import build, loop, task
from testing import run_metrics as _metrics, train_run as _run

# a tiny simulated task: 48 / 16 / 16 systems, frames 2 → 4 (200 integration steps), so generation is fast
SMALL_SIZES = {"train": 48, "val": 16, "test": 16}
REAL_TASK = dict(SIZES=nbody.SIZES, INPUT_FRAME=nbody.INPUT_FRAME, TARGET_FRAME=nbody.TARGET_FRAME)
TINY = ["--dataset", "nbody", "--width", "0.25", "--batch-size", "16", "--epochs", "3", "--no-progress",
        "--threads", "1", "--theta-schedule", "hold_linear", "--theta-unit", "step", "--relax-init", "default"]


@pytest.fixture(scope="module")
def small_task(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("nbody_cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nbody, "SIZES", SMALL_SIZES)
        mp.setattr(nbody, "INPUT_FRAME", 2)
        mp.setattr(nbody, "TARGET_FRAME", 4)
        yield cache


@pytest.fixture(scope="module")
def subprocess_cache(small_task, tmp_path_factory):
    """A cache directory holding the small task under the file name a fresh process (with the real task's
    parameters) looks for: for the study's runs and torchrun's ranks."""
    splits = nbody.load_nbody(seed=0, cache_dir=small_task)
    cache = str(tmp_path_factory.mktemp("subprocess_cache"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in REAL_TASK.items():
            mp.setattr(nbody, name, value)
        path = nbody.cache_path(0, cache)
    torch.save({name: s._asdict() for name, s in zip(("train", "val", "test"), splits)}, path)
    return cache, splits


@pytest.fixture(scope="module")
def egnn_run(small_task, tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("egnn") / "run")
    summary = _run(TINY + ["--model", "egnn", "--data-root", small_task, "--run-dir", run_dir, "--dtype", "float64"])
    return run_dir, summary


def test_egnn_run_ends_projected_with_the_mse_of_its_saved_model(egnn_run, small_task):
    run_dir, summary = egnn_run
    rows = _metrics(run_dir)
    assert list(rows[0])[:6] == ["epoch", "step", "lr", "theta", "train_loss", "train_mse"]
    assert float(rows[0]["theta"]) > 0 and float(rows[-1]["theta"]) == 0.0
    assert float(rows[0]["projection_error"]) > 1e-6 and float(rows[-1]["projection_error"]) == 0.0
    assert summary["finished"] and summary["metric"] == "mse" and summary["relaxed_layers"] == 4
    assert summary["equivariance_error"] < 1e-10  # float64 E(3) equivariance of the projected model
    # the saved projected model loads into the plain EGNN; its test MSE, computed here from the split
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    cfg = T.TrainConfig(**{**saved["config"], "plain": True}).resolved()
    plain = T.build_model(cfg).to(torch.float64)
    plain.load_state_dict(saved["model"])
    _train, _val, test = nbody.load_nbody(seed=0, cache_dir=small_task)
    with torch.no_grad():
        pred = plain(test.loc.double(), test.vel.double(), test.charges.double())
    mse = (pred - test.target.double()).square().mean().item()
    assert summary["test_mse_projected"] == pytest.approx(mse, rel=1e-10)
    assert float(rows[-1]["test_mse_projected"]) == pytest.approx(mse, rel=1e-10)
    # the training loss went down (MSE from the first epoch's mean to the last)
    assert float(rows[-1]["train_mse"]) < float(rows[0]["train_mse"])


def test_egnn_resume_is_exact(small_task, egnn_run, tmp_path):
    run_dir, _ = egnn_run
    split = str(tmp_path / "split")
    argv = TINY + ["--model", "egnn", "--data-root", small_task, "--run-dir", split, "--dtype", "float64"]
    first = _run(argv + ["--stop-after", "1"])
    assert not first["finished"]
    _run(["--resume", split, "--no-progress"])
    assert _metrics(split) == _metrics(run_dir)


def test_best_epoch_takes_the_lowest_validation_mse():
    hist = [dict(epoch=1, val_mse_projected=0.5, test_mse_projected=0.6),
            dict(epoch=2, val_mse_projected=0.2, test_mse_projected=0.9),
            dict(epoch=3, val_mse_projected=0.2, test_mse_projected=0.1),
            dict(epoch=4, val_mse_projected=math.nan, test_mse_projected=0.0)]
    assert loop.best_epoch(hist, task.REGRESSION) == dict(best_epoch=2, best_val_mse_projected=0.2,
                                                          best_test_mse_projected=0.9)
    acc = [dict(epoch=1, val_acc_projected=0.5, test_acc_projected=0.6),
           dict(epoch=2, val_acc_projected=0.7, test_acc_projected=0.1)]
    assert loop.best_epoch(acc)["best_epoch"] == 2


def test_rotated_batches_move_targets_with_inputs():
    """--train-rotation so3 on N-body: every system and its target turn by the same rotation; the charges do
    not; pairwise distances, speeds and the displacement lengths are kept."""
    g = torch.Generator().manual_seed(0)
    loc, vel, q = torch.randn(4, 5, 3, generator=g), torch.randn(4, 5, 3, generator=g), torch.ones(4, 5, 1)
    target = loc + torch.randn(4, 5, 3, generator=g)
    x = task.pack_nbody(loc, vel, q)
    cfg = T.TrainConfig(model="egnn", dataset="nbody", train_rotation="so3").resolved()
    x2, y2 = build.augment_batch(x, target, cfg, torch.Generator().manual_seed(1))
    loc2, vel2, q2 = task.unpack_nbody(x2)
    assert torch.equal(q2, q) and not torch.allclose(loc2, loc)
    assert torch.allclose(torch.cdist(loc2, loc2), torch.cdist(loc, loc), atol=1e-5)
    assert torch.allclose(vel2.norm(dim=-1), vel.norm(dim=-1), atol=1e-5)
    assert torch.allclose((y2 - loc2).norm(dim=-1), (target - loc).norm(dim=-1), atol=1e-5)
    # the same rotation for inputs and target: solve it from the positions and apply it to the target
    R = torch.linalg.lstsq(loc[0], loc2[0]).solution.T
    assert torch.allclose(y2[0], target[0] @ R.T, atol=1e-4)
    aligned = T.TrainConfig(model="egnn", dataset="nbody").resolved()
    assert aligned.train_rotation == "aligned"
    same_x, same_y = build.augment_batch(x, target, aligned, g)
    assert same_x is x and same_y is target


def test_nbody_equivariance_error_sees_a_broken_model():
    """The final check: 0 for an E(3)-equivariant map, not 0 for one that ignores rotations."""
    x = task.pack_nbody(torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 3, dtype=torch.float64),
                        torch.ones(3, 5, 1, dtype=torch.float64))
    step = lambda loc, vel, q: loc + 0.3 * vel  # noqa: E731
    assert task.nbody_equivariance_error(step, x) < 1e-14
    shift_x = lambda loc, vel, q: loc + torch.tensor([1.0, 0, 0], dtype=loc.dtype)  # noqa: E731
    assert task.nbody_equivariance_error(shift_x, x) > 0.1
    R = random_rotation(generator=torch.Generator().manual_seed(3))
    y = torch.randn(3, 5, 3, dtype=torch.float64)
    x2, y2 = task.move_nbody(x, y, R, torch.zeros(3, dtype=torch.float64))
    assert torch.allclose(y2, y @ R.T) and torch.allclose(x2[..., 3:6], x[..., 3:6] @ R.T)


@pytest.mark.parametrize("argv, message", [
    (["--model", "egnn", "--dataset", "shapes"], "do not go together"),
    (["--model", "vn_pointnet", "--dataset", "nbody"], "do not go together"),
    (["--model", "egnn", "--dataset", "nbody", "--val-fraction", "0.1"], "own validation split"),
    (["--model", "egnn", "--dataset", "nbody", "--augment", "jitter"], "apply to point clouds"),
    (["--model", "segnn", "--dataset", "nbody", "--norm-diff"], "--norm-diff is an egnn setting"),
])
def test_config_errors_name_the_argument(argv, message):
    cfg, _, _ = T.parse_args(argv + ["--no-progress"])
    with pytest.raises(T.ConfigError, match=message):
        T.validate(cfg.resolved())


@pytest.mark.parametrize("flag", [[], ["--norm-diff"]])
def test_norm_diff_and_layers_reach_every_egnn_layer(flag):
    cfg, _, _ = T.parse_args(["--model", "egnn", "--dataset", "nbody", "--layers", "3", "--no-progress", *flag])
    cfg = cfg.resolved()
    T.validate(cfg)
    model = build.build_model(cfg)
    assert len(model.layers) == 3 and all(layer.norm_diff == bool(flag) for layer in model.layers)


def test_segnn_runs_through_the_trainer(small_task, tmp_path):
    pytest.importorskip("e3nn", reason="SEGNN needs e3nn (pip install 'relaxeq_fast[e3nn]'; setup.sh installs it)")
    run_dir = str(tmp_path / "segnn")
    summary = _run(TINY + ["--model", "segnn", "--data-root", small_task, "--run-dir", run_dir, "--epochs", "2",
                           "--width", "0.125"])
    rows = _metrics(run_dir)
    assert summary["finished"] and summary["relaxed_layers"] == 4 and float(rows[-1]["theta"]) == 0.0
    assert float(rows[0]["projection_error"]) > 1e-6
    assert summary["equivariance_error"] < 1e-4  # float32
    assert math.isfinite(summary["test_mse_projected"])
    with open(os.path.join(run_dir, "summary.json")) as f:
        assert json.load(f)["metric"] == "mse"


def test_se3_transformer_runs_through_the_trainer_and_resumes_exactly(small_task, tmp_path):
    """--model se3_transformer: every LinearSE3 relaxed, θ to 0, the projected model SE(3)-equivariant as the library
    makes it (float64 ~1e-9: its cached bases are float32 numbers), its reported MSE that of the saved model, and a
    run stopped after one epoch and resumed matches the uninterrupted one exactly."""
    pytest.importorskip("se3_transformer_pytorch", reason="the SE(3)-Transformer needs se3-transformer-pytorch "
                        "(pip install 'relaxeq_fast[se3t]'; setup.sh installs it)")
    argv = TINY + ["--model", "se3_transformer", "--data-root", small_task, "--epochs", "2", "--width", "0.25",
                   "--dtype", "float64"]
    run_dir = str(tmp_path / "se3t")
    summary = _run(argv + ["--run-dir", run_dir])
    rows = _metrics(run_dir)
    plain = T.build_model(T.TrainConfig(model="se3_transformer", dataset="nbody", width=0.25, plain=True).resolved())
    n_linear = sum(type(m).__name__ == "LinearSE3" for m in plain.modules())
    assert summary["finished"] and summary["relaxed_layers"] == n_linear > 0 and float(rows[-1]["theta"]) == 0.0
    assert float(rows[0]["projection_error"]) > 1e-6
    assert summary["equivariance_error"] < 1e-7
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    plain = T.build_model(T.TrainConfig(**{**saved["config"], "plain": True}).resolved()).to(torch.float64)
    plain.load_state_dict(saved["model"])
    _train, _val, test = nbody.load_nbody(seed=0, cache_dir=small_task)
    with torch.no_grad():
        mse = (plain(test.loc.double(), test.vel.double(), test.charges.double()) - test.target.double()).square()
    assert summary["test_mse_projected"] == pytest.approx(mse.mean().item(), rel=1e-10)
    split = str(tmp_path / "split")
    assert not _run(argv + ["--run-dir", split, "--stop-after", "1"])["finished"]
    _run(["--resume", split, "--no-progress"])
    assert _metrics(split) == rows


def test_study_of_nbody_runs_aggregates_mse(subprocess_cache, tmp_path):
    """relaxeq-study over egnn runs: the table and study.csv hold MSEs, the mean ± std of the final projected
    test MSE is statistics.mean / stdev of the runs' summaries, and no run counts as failed (each beats the
    no-motion baseline, also checked here)."""
    import statistics

    from relaxeq_fast import study as S
    cache, splits = subprocess_cache
    out = str(tmp_path / "study")
    train_args = ["--model", "egnn", "--dataset", "nbody", "--data-root", cache, "--width", "0.25",
                  "--batch-size", "16", "--epochs", "4", "--theta-schedule", "hold_linear", "--theta-unit", "step"]
    assert S.main(["--out", out, "--seeds", "0,1", "--lrs", "3e-3", "--no-progress", "--", *train_args]) == 0
    with open(os.path.join(out, "study.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"finished"}
    assert "test_mse_projected" in rows[0] and "test_acc_projected" not in rows[0]
    static = (splits[2].loc - splits[2].target).double().square().mean().item()
    for method in ("relaxed", "plain"):
        finals = []
        for r in rows:
            if r["method"] == method:
                with open(os.path.join(r["run_dir"], "summary.json")) as f:
                    s = json.load(f)
                assert s["test_mse_static"] == pytest.approx(static, rel=1e-6)
                assert s["test_mse_projected"] < static and r["failed"] == "False"
                finals.append(s["test_mse_projected"])
        group = next(g for g in S.aggregate([S.grid._read_run(S.Run(method, 3e-3, seed, ()),
                                                          os.path.join(out, "runs", S.Run(method, 3e-3, seed, ()).name))
                                             for seed in (0, 1)]))
        assert group["final_mean"] == pytest.approx(statistics.mean(finals), rel=1e-12)
        assert group["final_std"] == pytest.approx(statistics.stdev(finals), rel=1e-12)
    with open(os.path.join(out, "study.md")) as f:
        table = f.read()
    assert "final mse" in table and "no better than predicting that nothing moves" in table


@pytest.mark.parametrize("model, width", [("egnn", "0.25"), ("segnn", "0.125")])
def test_torchrun_two_processes_match_one_process(model, width, subprocess_cache, tmp_path):
    """EGNN and SEGNN under DDP (2 gloo ranks, each on half of every global batch) against one process, float64:
    the relaxed layers' input statistics are all-reduced, so the regulariser is the global batch's."""
    if model == "segnn":
        pytest.importorskip("e3nn", reason="SEGNN needs e3nn (pip install 'relaxeq_fast[e3nn]')")
    from testing import torchrun_train
    cache, _ = subprocess_cache
    args = ["--model", model, "--dataset", "nbody", "--data-root", cache, "--width", width, "--batch-size", "16",
            "--n-train", "32", "--epochs", "2", "--dtype", "float64", "--theta-schedule", "hold_linear",
            "--theta-unit", "step", "--relax-init", "default", "--no-progress", "--threads", "1"]
    single, ddp = str(tmp_path / "single"), str(tmp_path / "ddp")
    _run(args + ["--run-dir", single])
    torchrun_train(args + ["--run-dir", ddp])
    a, b = _metrics(single), _metrics(ddp)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("theta", "lr", "step", "epoch"):
            assert float(ra[key]) == float(rb[key]), key
        for key in ("train_loss", "train_mse", "reg_loss", "r_ld", "r_n", "val_mse", "test_mse_projected",
                    "projection_error"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-9, abs=1e-15), key
    assert float(a[0]["r_ld"]) > 0  # the relaxation was on: the all-reduced statistics were compared
