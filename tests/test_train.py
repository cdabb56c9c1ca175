"""relaxeq-train end to end: a run's outputs and that it ends projected, what every training step uses (the lr and
θ schedules, --relax-lr theta, label smoothing, gradient clipping, --amp) and that it reads nothing back to the host,
progress in a log file, projected accuracy per epoch and the validation-selected best epoch, the projection modes,
complement relaxation, the validation split, the paper's relaxed maps, the relaxation report script, compare_runs,
and a steerable CNN on RotMNIST. Checkpoints and resume: test_train_checkpoint.py; configuration errors and
--print-config: test_train_config.py; torchrun: test_train_distributed.py."""
import dataclasses
import json
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from relaxeq_fast import train as T
from relaxeq_fast.train import loop
from relaxeq_fast.relaxation import make_schedule
from relaxeq_fast.vn import relaxed_layers
from testing import FULL, TINY, run_metrics as _metrics, train_run as _run


def test_run_writes_everything_and_ends_projected(full_run):
    run_dir, summary = full_run
    for name in ("config.json", "metrics.csv", "checkpoint.pt", "model_projected.pt", "training.png", "summary.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    rows = _metrics(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert len({r["lr"] for r in rows}) == 3  # the lr changed inside the run (resume must restore it)
    assert float(rows[0]["theta"]) > 0 and float(rows[-1]["theta"]) == 0.0
    # the relaxation was really used (W_r moved) and its distance to the projection closed at θ = 0
    assert float(rows[0]["projection_error"]) > 1e-6 and float(rows[-1]["projection_error"]) == 0.0
    assert float(rows[0]["r_n"]) > 0
    assert summary["finished"] and summary["theta_final"] == 0.0
    # float32 invariance of the projected model under random rotations
    assert summary["equivariance_error"] < 1e-4
    assert 0.0 <= summary["test_acc_projected"] <= 1.0


def test_lr_column_follows_the_cosine_schedule(full_run):
    """lr of epoch e (1-based, the lr its steps used) = η_min + (η − η_min)(1 + cos(π(e − 1)/E))/2, η_min = η/100."""
    run_dir, _ = full_run
    lr0, epochs = 1e-3, 3  # VN-PointNet's paper lr; TINY's epochs
    want = [lr0 / 100 + (lr0 - lr0 / 100) * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)]
    assert [float(r["lr"]) for r in _metrics(run_dir)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("unit, schedule, scaled", [
    ("step", "hold_linear", False), ("step", "triangle", True),
    ("epoch", "triangle", False), ("epoch", "hold_linear", True)])
def test_theta_used_by_every_step_is_the_schedules(unit, schedule, scaled, tmp_path, monkeypatch):
    """θ on every relaxed layer during each optimisation step, the θ given to the regulariser, and the
    metrics' theta/step columns equal the schedule's values, computed here from the run's size: a
    trainer that steps θ twice, or builds the schedule over a different length, fails."""
    epochs, n_train, batch = 3, 48, 16
    steps_per_epoch = n_train // batch
    total = epochs * steps_per_epoch if unit == "step" else epochs
    sched = make_schedule(schedule, total)
    seen_layers, seen_reg = [], []
    real_regs, real_combine = loop.model_regularizers, loop.combine_regularizers

    def spy_regs(model):
        seen_layers.append({float(m.theta) for m in relaxed_layers(model)})
        return real_regs(model)

    def spy_combine(*args, theta=None, **kwargs):
        seen_reg.append(None if theta is None else float(theta))  # the θ buffer, read at the call
        return real_combine(*args, theta=theta, **kwargs)

    monkeypatch.setattr(loop, "model_regularizers", spy_regs)
    monkeypatch.setattr(loop, "combine_regularizers", spy_combine)
    run_dir = str(tmp_path / "theta")
    _run(TINY + ["--n-train", str(n_train), "--batch-size", str(batch), "--epochs", str(epochs), "--width", "0.1",
                 "--theta-unit", unit, "--theta-schedule", schedule, "--run-dir", run_dir]
         + (["--theta-scaled-lambda"] if scaled else []))
    unit_of_step = [j if unit == "step" else j // steps_per_epoch for j in range(epochs * steps_per_epoch)]
    want = [sched(u) for u in unit_of_step]
    assert seen_layers == [{float(torch.tensor(w, dtype=torch.float32))} for w in want]  # θ buffers are float32
    want32 = [float(torch.tensor(w, dtype=torch.float32)) for w in want]
    assert seen_reg == (want32 if scaled else [None] * len(want))
    assert len(set(want)) >= 2  # the schedule really moved within the run
    rows = _metrics(run_dir)
    assert [int(r["step"]) for r in rows] == [steps_per_epoch * (e + 1) for e in range(epochs)]
    # θ at the end of epoch e: the value for the next unit (θ(total − 1) = 0, and later)
    assert [float(r["theta"]) for r in rows] == \
        [sched(steps_per_epoch * (e + 1) if unit == "step" else e + 1) for e in range(epochs)]


def test_relax_lr_theta_scales_only_the_relaxation_step(tmp_path, monkeypatch):
    """--relax-lr theta: in every step the relaxation parameters' group has lr × θ (θ of that step) and
    the rest the scheduled lr; the lr schedule itself (metrics' lr column) is untouched."""
    seen = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        names = [[id(p) for p in g["params"]] for g in self.param_groups]
        seen.append(([g["lr"] for g in self.param_groups], names))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    real_regs, thetas = loop.model_regularizers, []

    def spy_regs(model):
        thetas.append(float(next(relaxed_layers(model)).theta))
        ids = {id(p) for m in relaxed_layers(model) for n, p in m.named_parameters() if n.endswith("_relax")}
        spy_regs.relax_ids = ids
        return real_regs(model)

    monkeypatch.setattr(loop, "model_regularizers", spy_regs)
    args = TINY + ["--epochs", "2", "--n-train", "48", "--theta-schedule", "hold_linear", "--theta-unit", "step",
                   "--lr-schedule", "cosine"]
    _run(args + ["--relax-lr", "theta", "--run-dir", str(tmp_path / "theta")])
    assert len(seen) == len(thetas) == 6
    for (lrs, ids), th in zip(seen, thetas):
        assert len(lrs) == 2 and set(ids[1]) == spy_regs.relax_ids and not set(ids[0]) & spy_regs.relax_ids
        assert lrs[1] == pytest.approx(lrs[0] * th, rel=1e-6)  # θ buffers are float32
    assert len({th for th in thetas}) > 1
    _run(args + ["--run-dir", str(tmp_path / "same")])
    assert [r["lr"] for r in _metrics(str(tmp_path / "theta"))] == [r["lr"] for r in _metrics(str(tmp_path / "same"))]


class _HostReads(TorchDispatchMode):
    """Records every tensor → Python number read (aten._local_scalar_dense: .item(), bool(), int(), float())
    outside torch.optim (its non-capturable step counters are host tensors by design)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            stack = traceback.extract_stack()
            if not any(os.sep + os.path.join("torch", "optim") + os.sep in f.filename for f in stack):
                self.reads.append("".join(traceback.format_list(stack[-6:-1])))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model, extra", [("vn_pointnet", {}), ("vn_pointnet", {"plain": True}),
                                          ("steerable_cnn", {})])
def test_train_step_never_reads_a_tensor_back_to_the_host(model, extra):
    """The whole relaxed step (forward, loss, regulariser with θ-scaled λ, backward, clipping, Adam with
    --relax-lr theta) leaves its numbers on the device: no host sync to forbid CUDA graphs."""
    images = model == "steerable_cnn"
    cfg = T.TrainConfig(model=model, dataset="rotmnist" if images else "shapes", num_points=32, k=6, width=0.25,
                        group=4, batch_size=8, theta_scaled_lambda=True, clip_grad_norm=1.0, relax_lr="theta",
                        **extra).resolved()
    net = T.build_model(cfg, num_classes=5)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=gen) if images else torch.randn(8, 32, 3, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    relaxed = list(relaxed_layers(net))
    relax_ids = {id(p) for m in relaxed for n, p in m.named_parameters() if n.endswith("_relax") or n == "B"}
    opt = torch.optim.Adam([{"params": [p for p in net.parameters() if id(p) not in relax_ids]},
                            {"params": [p for p in net.parameters() if id(p) in relax_ids]}])
    theta_buffer = relaxed[0].theta if relaxed else None
    loop.train_step(net, net, x, y, cfg, opt, theta_buffer, opt.param_groups[1], 1.0)  # warm-up (lazy state)
    with _HostReads() as mode:
        stats = loop.train_step(net, net, x, y, cfg, opt, theta_buffer, opt.param_groups[1], 1.0)
    assert mode.reads == [], "host reads in the step:\n" + "\n---\n".join(mode.reads)
    assert stats.shape == (6,) and stats.dtype == torch.float64
    with _HostReads() as mode:  # the check can fail
        stats[0].item()
    assert len(mode.reads) == 1


def test_amp_step_runs_the_relaxed_maps_in_bfloat16_without_host_reads():
    """--amp bf16 on CPU: the relaxed linear maps run in bfloat16 (their statistics and the regulariser in
    float32), the parameters stay float32, the step stays free of host reads, and its loss is within
    bfloat16 rounding of the float32 step's (measured 3.1e-2 relative at this tiny size; bound 6e-2)."""
    from testing import RecordOps
    losses = {}
    for amp in (None, "bf16"):
        torch.manual_seed(0)
        cfg = T.TrainConfig(model="vn_pointnet", dataset="shapes", num_points=32, k=6, width=0.25, batch_size=8,
                            amp=amp).resolved()
        net = T.build_model(cfg, num_classes=5)
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randn(8, 32, 3, generator=gen), torch.randint(0, 5, (8,), generator=gen)
        opt = torch.optim.Adam(net.parameters(), fused=True)
        theta_buffer = relaxed_layers(net).__next__().theta
        with _HostReads() as mode, RecordOps() as record:
            stats = loop.train_step(net, net, x, y, cfg, opt, theta_buffer, None, 1.0)
        assert mode.reads == [], "host reads in the step:\n" + "\n---\n".join(mode.reads)
        assert record.first_output_dtypes["relaxeq.relaxed_linear"] == ({torch.bfloat16} if amp else {torch.float32})
        assert record.first_output_dtypes["relaxeq.relaxation_regularizer"] == {torch.float32}
        assert all(p.dtype == torch.float32 for p in net.parameters())
        losses[amp] = stats[0].item()
    assert abs(losses["bf16"] - losses[None]) <= 6e-2 * abs(losses[None]), losses
    assert losses["bf16"] != losses[None]  # non-vacuous: the bf16 step did compute something else


def test_progress_in_a_log_file_is_lines_not_bar_frames(tmp_path, capsys):
    """stderr not a terminal (pytest captures it): no carriage-return frames, one line per epoch."""
    with_progress = [a for a in TINY if a != "--no-progress"]
    _run(with_progress + ["--epochs", "2", "--n-train", "32", "--run-dir", str(tmp_path / "log")])
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line.split(":")[0].strip() for line in lines] == ["epoch 1", "epoch 2"], lines


def test_projected_accuracy_every_epoch_and_best_epoch_on_validation(tmp_path):
    run_dir = str(tmp_path / "val")
    summary = _run(TINY + FULL + ["--val-fraction", "0.25", "--run-dir", run_dir])
    rows = [{k: float(v) for k, v in r.items()} for r in _metrics(run_dir)]
    for r in rows:
        for key in ("val_acc", "val_acc_projected", "test_acc", "test_acc_projected"):
            assert 0 <= r[key] <= 1, key
    # θ = 0 at the end: the model is its projection
    assert rows[-1]["test_acc_projected"] == rows[-1]["test_acc"] == summary["test_acc_projected"]
    # and before the end it is not (θ > 0 and W_r moved), in some epoch
    assert rows[0]["projection_error"] > 1e-6
    best = max(range(len(rows)), key=lambda i: (rows[i]["val_acc_projected"], -i))
    assert summary["best_epoch"] == best + 1
    assert summary["best_val_acc_projected"] == rows[best]["val_acc_projected"]
    assert summary["best_test_acc_projected"] == rows[best]["test_acc_projected"]


def test_projection_mode_changes_the_projected_scores_not_the_training(tmp_path):
    """--projection only decides how the model is projected (per-epoch projected scores, projection error, the
    final model): the training itself is bit-identical, and at θ = 0 (the end) both projections agree."""
    rows, summaries = {}, {}
    for mode in ("drop", "nearest"):
        run_dir = str(tmp_path / mode)
        summaries[mode] = _run(TINY + FULL + ["--relax-init", "default", "--val-fraction", "0.25",
                                              "--projection", mode, "--run-dir", run_dir])
        rows[mode] = _metrics(run_dir)
    for a, b in zip(rows["drop"], rows["nearest"]):
        for key in ("train_loss", "train_acc", "reg_loss", "r_ld", "r_n", "val_acc", "test_acc", "theta"):
            assert a[key] == b[key], key
    errors = {m: [float(r["projection_error"]) for r in rows[m]] for m in rows}
    # nearest folds θ P_eq(W_r) in: a different (here smaller) distance while θ > 0, the same 0 at the end
    assert errors["nearest"][0] != errors["drop"][0] and errors["nearest"][-1] == errors["drop"][-1] == 0.0
    assert summaries["nearest"]["test_acc_projected"] == summaries["drop"]["test_acc_projected"]
    assert summaries["nearest"]["equivariance_error"] < 1e-4


def test_complement_relaxation_with_layer_mean_trains_and_ends_projected(tmp_path):
    run_dir = str(tmp_path / "complement")
    summary = _run(TINY + FULL + ["--relax-init", "default", "--relax-space", "complement", "--reduction",
                                  "layer_mean", "--projection", "nearest", "--run-dir", run_dir])
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    assert (cfg["relax_space"], cfg["reduction"], cfg["projection"]) == ("complement", "layer_mean", "nearest")
    rows = _metrics(run_dir)
    assert float(rows[0]["r_n"]) > 0 and float(rows[0]["projection_error"]) > 1e-6
    assert summary["finished"] and summary["theta_final"] == 0.0 and summary["equivariance_error"] < 1e-4
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    plain = T.build_model(T.TrainConfig(**{**saved["config"], "plain": True}), num_classes=len(saved["class_names"]))
    plain.load_state_dict(saved["model"], strict=True)


def test_relaxation_report_script_on_a_run(full_run):
    """scripts/relaxation_report.py: the equivariant share of each VN layer's W_r in the last checkpoint, against
    block traces computed here."""
    run_dir, _ = full_run
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "scripts", "relaxation_report.py"), run_dir],
                         capture_output=True, text=True, check=True).stdout
    state = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=False)["model"]
    total = share = 0.0
    for name, W in state.items():
        if name.endswith("weight_relax"):
            W = W.double()
            blocks = W.reshape(W.shape[0] // 3, 3, W.shape[1] // 3, 3)
            traces = blocks.diagonal(dim1=1, dim2=3).sum(-1)  # P_eq keeps (tr / 3) I per block: energy tr² / 3
            total += float((W * W).sum())
            share += float((traces ** 2).sum() / 3)
            layer = name[:-len(".weight_relax")]
            row = next(x for x in out.splitlines() if x.startswith(f"| {layer} |"))
            assert float(row.split("|")[3]) == pytest.approx(float((traces ** 2).sum() / 3 / (W * W).sum()), abs=1e-3)
    assert total > 0
    assert f"(energy-weighted): {share / total:.3f}" in out


def test_validation_split_is_carved_from_training_data():
    from relaxeq_fast.train.build import _load_data
    cfg = T.TrainConfig(n_train=64, n_test=28, num_points=32, k=6, val_fraction=0.25).resolved()
    train, val, test, _ = _load_data(cfg)
    full, _, _, _ = _load_data(dataclasses.replace(cfg, val_fraction=0.0))
    assert len(train.y) == 48 and len(val.y) == 16 and len(full.y) == 64
    # the training samples are a subset of the full training set, and none of them is held out
    full_rows = {tuple(x.flatten().tolist()) for x in full.x}
    train_rows = {tuple(x.flatten().tolist()) for x in train.x}
    assert train_rows <= full_rows and len(train_rows) == 48
    assert sorted(train.y.tolist() + val.y.tolist()) == sorted(full.y.tolist())
    assert _load_data(cfg)[1].x.equal(val.x)  # seeded


def test_paper_relaxed_maps(tmp_path):
    from relaxeq_fast.models import VNPointNet
    from relaxeq_fast.nn import RelaxedLinear
    from relaxeq_fast.vn import VNStdFeature

    def count(model):
        rel = [m for m in model.modules() if isinstance(m, RelaxedLinear)]
        dirs = [m.map_to_dir for m in model.modules() if isinstance(getattr(m, "map_to_dir", None), RelaxedLinear)]
        std = [m for m in model.modules() if isinstance(m, VNStdFeature)]
        return len(rel), sum(d.bias_relax is None for d in dirs), len(dirs), isinstance(std[0].vn_lin, RelaxedLinear)

    n_all, nobias_all, n_dirs, std_all = count(VNPointNet(num_classes=5, k=4, relaxed=True, width=0.1,
                                                          relaxed_maps="all"))
    n_paper, nobias_paper, n_dirs_paper, std_paper = count(
        VNPointNet(num_classes=5, k=4, relaxed=True, width=0.1, relaxed_maps="paper"))
    assert count(VNPointNet(num_classes=5, k=4, relaxed=True, width=0.1)) == (n_paper, nobias_paper, n_dirs_paper,
                                                                               std_paper), "the default is 'paper'"
    assert std_all and not std_paper and n_paper == n_all - 1
    assert nobias_all == 0 and nobias_paper == n_dirs_paper == n_dirs > 0
    with pytest.raises(ValueError, match="relaxed_maps must be one of"):
        VNPointNet(num_classes=5, relaxed=True, relaxed_maps="most")


def test_label_smoothing_reaches_the_loss(tmp_path, monkeypatch):
    seen = []
    real = torch.nn.functional.cross_entropy

    def spy(out, y, **kwargs):
        seen.append(kwargs.get("label_smoothing"))
        return real(out, y, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    _run(TINY + ["--epochs", "1", "--n-train", "32", "--label-smoothing", "0.3", "--run-dir", str(tmp_path / "ls")])
    assert seen and set(seen) == {0.3}


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
    (see relaxeq_fast.train.build._augment_batch); clipping keeps the relaxation, and so R_LD, small."""
    args = TINY + ["--n-train", "32", "--epochs", "1", "--dropout", "0", "--augment", "dropout",
                   "--augment-rotated", "none", "--theta-schedule", "hold_linear", "--theta-unit", "step",
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
