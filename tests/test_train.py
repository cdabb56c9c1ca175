"""The training CLI: run outputs, exact resume, non-finite loss handling, config errors, torchrun DDP."""
import csv
import hashlib
import os
import subprocess
import sys

import pytest
import torch

from relaxeq_fast import train as T

# tiny but complete: every layer of VN-PointNet runs, θ goes through its schedule to 0
TINY = ["--dataset", "shapes", "--n-train", "64", "--n-test", "28", "--num-points", "32", "--k", "6",
        "--width", "0.2", "--batch-size", "16", "--epochs", "3", "--no-progress", "--threads", "1"]


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("epoch_seconds")  # wall time: the only column that may differ between runs
    return rows


def _run(argv):
    cfg, resume, stop_after = T.parse_args(argv)
    return T.train(cfg, resume=resume, stop_after=stop_after)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("full") / "run")
    summary = _run(TINY + ["--run-dir", run_dir, "--augment", "scale,shift,jitter"])
    return run_dir, summary


def test_run_writes_everything_and_ends_projected(full_run):
    run_dir, summary = full_run
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "model_projected.pt", "training.png", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert float(rows[0]["theta"]) > 0 and float(rows[-1]["theta"]) == 0.0
    # the relaxation was really used (W_r moved) and its distance to the projection closed at θ = 0
    assert float(rows[0]["projection_error"]) > 1e-6 and float(rows[-1]["projection_error"]) == 0.0
    assert float(rows[0]["r_n"]) > 0
    assert summary["finished"] and summary["theta_final"] == 0.0
    # float32 invariance of the projected model under random rotations
    assert summary["equivariance_error"] < 1e-4
    assert 0.0 <= summary["test_acc_projected"] <= 1.0


def test_projected_model_loads_into_the_plain_class(full_run):
    run_dir, summary = full_run
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    cfg = T.TrainConfig(**{**saved["config"], "plain": True})
    plain = T.build_model(cfg, num_classes=len(saved["class_names"]))
    plain.load_state_dict(saved["model"], strict=True)


def test_resume_reproduces_the_uninterrupted_run_exactly(full_run, tmp_path):
    run_dir, _ = full_run
    split_dir = str(tmp_path / "split")
    argv = TINY + ["--run-dir", split_dir, "--augment", "scale,shift,jitter"]
    first = _run(argv + ["--stop-after", "1"])
    assert not first["finished"] and len(_metrics(split_dir)) == 1
    second = _run(["--resume", split_dir, "--no-progress", "--stop-after", "1"])
    assert second["epochs_done"] == 2
    _run(["--resume", split_dir, "--no-progress"])
    assert _metrics(split_dir) == _metrics(run_dir)
    a = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(split_dir, "model_projected.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_loss_stops_without_touching_the_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "nan")
    _run(TINY + ["--run-dir", run_dir, "--stop-after", "1"])
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    real = T.TF.cross_entropy
    calls = {"n": 0}

    def poisoned(out, y):
        calls["n"] += 1
        loss = real(out, y)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(T.TF, "cross_entropy", poisoned)
    rc = T.main(["--resume", run_dir, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "non-finite loss at epoch 2, step 2" in err[0]
    with open(ckpt, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before
    assert len(_metrics(run_dir)) == 1


@pytest.mark.parametrize("extra, cause", [
    (["--model", "resnet"], "--model must be one of"),
    (["--dataset", "modelnet40"], "needs --data-root"),
    (["--dataset", "modelnet40", "--data-root", "/no/such/dir"], "/no/such/dir does not exist"),
    (["--batch-size", "100"], "larger than the training set (64 samples)"),
    (["--k", "40"], "--k 40 neighbours needs at least as many points"),
    (["--train-rotation", "x"], "--train-rotation must be one of"),
    (["--theta-schedule", "linear"], "--theta-schedule must be one of"),
    (["--augment", "flip"], "--augment takes"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--batch-size", "1"], "batch norm needs at least 2"),
    (["--dataset", "rotmnist"], "rotmnist is an image dataset"),
    (["--model", "steerable_cnn"], "takes images; shapes is a point-cloud dataset"),
    (["--model", "steerable_cnn", "--dataset", "rotmnist", "--augment", "jitter"], "applies to point clouds"),
    (["--backend", "cudnn"], "--backend must be one of"),
    (["--dtype", "float16"], "--dtype must be"),
    (["--resume", "/no/such/run"], "--resume /no/such/run: no config.json there"),
])
def test_bad_configuration_is_one_line_naming_the_cause(extra, cause, tmp_path, capsys):
    rc = T.main(TINY + ["--run-dir", str(tmp_path / "bad")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("relaxeq-train: error:") and cause in err[0], err[0]


def test_paper_setups_fill_only_what_is_unset():
    cfg = T.TrainConfig(model="vn_dgcnn", lr=0.05).resolved()
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.batch_size, cfg.momentum) == ("sgd", 0.05, "cosine", 32, 0.9)
    cfg = T.TrainConfig(model="vn_pointnet").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size, cfg.num_points) == \
        ("adam", 1e-3, 1e-4, 20, 0.7, 24, 300)


def _single_vs_torchrun(args, tmp_path):
    """Run ``args`` in one process and under torchrun with 2 gloo ranks; compare metrics and weights."""
    single = str(tmp_path / "single")
    _run(args + ["--run-dir", single])
    ddp = str(tmp_path / "ddp")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "relaxeq_fast.train", *args, "--run-dir", ddp],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[relaxeq-train]") == 1  # only rank 0 reports
    a, b = _metrics(single), _metrics(ddp)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("theta", "lr", "step", "epoch", "train_acc", "test_acc"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-12), key
        for key in ("train_loss", "reg_loss", "r_ld", "r_n", "projection_error"):
            assert float(rb[key]) == pytest.approx(float(ra[key]), rel=1e-6, abs=1e-12), key
    ma = torch.load(os.path.join(single, "checkpoint.pt"), weights_only=False)["model"]
    mb = torch.load(os.path.join(ddp, "checkpoint.pt"), weights_only=False)["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        if ma[k].is_floating_point():
            # absolute floor: a bias in front of a batch norm has a true gradient of 0 and holds
            # rounding noise only (exactly 0 in one run, ~1e-12 in the other)
            torch.testing.assert_close(mb[k], ma[k], rtol=1e-4, atol=1e-8 + 1e-4 * ma[k].abs().max().item(),
                                       msg=lambda m, k=k: f"{k}: {m}")


def test_torchrun_two_processes_match_one_process(tmp_path):
    """2 gloo ranks, each on half of every global batch, against one process on the whole batch.

    float64, two optimisation steps (one per epoch, so the per-epoch machinery runs twice). Per-rank
    partial sums change the rounding only (gradients agree to ~1e-9), but this small batch-normed net
    amplifies any rounding difference ~1e3× per Adam step — one process with 1 vs 2 threads drifts the
    same way — so the comparison is kept to two steps, where we measured ≤ 3e-6.
    """
    _single_vs_torchrun(TINY + ["--n-train", "16", "--epochs", "2", "--dtype", "float64",
                                "--dropout", "0",  # dropout masks are drawn per rank
                                "--augment", "shift,jitter"], tmp_path)


def test_torchrun_steerable_cnn_matches_one_process(tmp_path):
    """The image path under DDP: field batch norm moments and the conv defect r all-reduced."""
    _single_vs_torchrun(["--model", "steerable_cnn", "--dataset", "rotmnist", "--group", "4", "--width", "0.25",
                         "--n-train", "16", "--n-test", "24", "--batch-size", "16", "--epochs", "2",
                         "--dtype", "float64", "--dropout", "0", "--no-progress", "--threads", "1"], tmp_path)


def test_compare_runs_tabulates_and_plots(full_run, tmp_path):
    run_dir, summary = full_run
    png = str(tmp_path / "cmp.png")
    table = T.compare_runs([run_dir, run_dir], png)
    lines = table.splitlines()
    assert len(lines) == 4 and f"{summary['test_acc_projected']:.3f}" in lines[2]
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_clip_grad_norm_bounds_the_point_dropout_blow_up(tmp_path):
    """Point dropout's exact duplicates make the relaxed weights' task gradient ~1e6× too large
    (see train._augment_batch); clipping keeps the relaxation, and so R_LD, small."""
    args = TINY + ["--n-train", "32", "--epochs", "1", "--dropout", "0", "--augment", "dropout",
                   "--dtype", "float64", "--optimizer", "sgd", "--lr", "1e-5"]
    _run(args + ["--run-dir", str(tmp_path / "raw")])
    _run(args + ["--run-dir", str(tmp_path / "clipped"), "--clip-grad-norm", "10"])
    raw, clipped = _metrics(str(tmp_path / "raw"))[0], _metrics(str(tmp_path / "clipped"))[0]
    assert float(raw["r_ld"]) > 1e6
    assert float(clipped["r_ld"]) < 1.0


def test_steerable_cnn_on_rotmnist_ends_projected_and_quarter_turn_invariant(tmp_path):
    """A tiny relaxed C_4 steerable CNN on RotMNIST-5k: θ reaches 0, the outputs are written, the
    projected model is invariant to exact quarter turns (float32) and loads into the plain class."""
    run_dir = str(tmp_path / "scnn")
    summary = _run(["--model", "steerable_cnn", "--dataset", "rotmnist", "--group", "4", "--width", "0.25",
                    "--n-train", "96", "--n-test", "48", "--batch-size", "16", "--epochs", "2", "--no-progress",
                    "--threads", "1", "--run-dir", run_dir])
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "model_projected.pt", "training.png", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    rows = _metrics(run_dir)
    assert float(rows[0]["theta"]) > 0 and float(rows[-1]["theta"]) == 0.0
    assert float(rows[0]["r_ld"]) > 0 and float(rows[0]["projection_error"]) > 1e-6
    assert float(rows[-1]["projection_error"]) == 0.0
    print(f"tiny steerable_cnn: projected test accuracy {summary['test_acc_projected']:.3f}, "
          f"rot90 invariance error {summary['equivariance_error']:.1e}")
    assert summary["finished"] and summary["theta_final"] == 0.0 and summary["relaxed_layers"] == 4
    assert summary["equivariance_error"] < 1e-5
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    plain = T.build_model(T.TrainConfig(**{**saved["config"], "plain": True}).resolved(), num_classes=10)
    plain.load_state_dict(saved["model"], strict=True)
