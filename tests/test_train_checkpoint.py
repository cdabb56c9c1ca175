"""relaxeq-train's run directory across epochs, interruptions and resumes: bit-exact resume, an amp run resumed,
a truncated / corrupt / foreign checkpoint, a failed checkpoint write, settings given with --resume, --resume into
a directory without a checkpoint, a non-finite loss that leaves the checkpoint alone, the saved projected model
loading into the plain class, and the throttled training plot."""
import dataclasses
import hashlib
import json
import math
import os

import pytest
import torch

from relaxeq_fast import train as T
from relaxeq_fast.train import loop
from testing import FULL, TINY, run_metrics as _metrics, train_run as _run


def test_amp_run_trains_and_resumes(tmp_path):
    run = str(tmp_path / "amp")
    _run(TINY + ["--amp", "--epochs", "2", "--stop-after", "1", "--run-dir", run])
    _run(["--resume", run, "--no-progress"])
    rows = _metrics(run)
    assert len(rows) == 2 and all(math.isfinite(float(r["train_loss"])) for r in rows)
    with open(os.path.join(run, "config.json")) as f:
        assert json.load(f)["amp"] == "bf16"


def _tree_digest(run_dir):
    out = {}
    for name in sorted(os.listdir(run_dir)):
        with open(os.path.join(run_dir, name), "rb") as f:
            out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_a_checkpoint"])
def test_broken_checkpoint_is_one_line_and_leaves_the_run_alone(damage, tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    _run(TINY + ["--epochs", "2", "--n-train", "32", "--run-dir", run_dir, "--stop-after", "1"])
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        data = f.read()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = b"\x00not a zip file" * 100
    else:
        buf = __import__("io").BytesIO()
        torch.save({"model": {}}, buf)
        data = buf.getvalue()
    with open(ckpt, "wb") as f:
        f.write(data)
    before = _tree_digest(run_dir)
    rc = T.main(["--resume", run_dir, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("relaxeq-train: error:") and f"{ckpt} cannot be read" in err[0], err[0]
    assert _tree_digest(run_dir) == before


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from relaxeq_fast.train import checkpoint
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.atomic_save({"epoch": 1}, path)

    def dies_half_way(obj, f):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # a kill during the write

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"epoch": 2}, path)
    assert torch.load(path, weights_only=False) == {"epoch": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary left behind


def test_resume_with_other_settings_names_them(tmp_path, capsys):
    run_dir = str(tmp_path / "run")
    _run(TINY + ["--epochs", "2", "--n-train", "32", "--run-dir", run_dir, "--stop-after", "1"])
    rc = T.main(["--resume", run_dir, "--no-progress", "--lr", "0.5", "--lambda-n", "0.25"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "lambda_n: 0.01 there, 0.25 asked" in err[0] and "lr: 0.001 there, 0.5 asked" in err[0], err[0]
    # the same values as the run's are no conflict
    assert T.main(["--resume", run_dir, "--no-progress", "--epochs", "2", "--width", "0.2"]) == 0


def test_projected_model_loads_into_the_plain_class(full_run):
    run_dir, summary = full_run
    saved = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)
    cfg = T.TrainConfig(**{**saved["config"], "plain": True})
    plain = T.build_model(cfg, num_classes=len(saved["class_names"]))
    plain.load_state_dict(saved["model"], strict=True)


def test_resume_reproduces_the_uninterrupted_run_exactly(full_run, tmp_path):
    run_dir, _ = full_run
    split_dir = str(tmp_path / "split")
    argv = TINY + FULL + ["--run-dir", split_dir]
    first = _run(argv + ["--stop-after", "1"])
    assert not first["finished"] and len(_metrics(split_dir)) == 1
    second = _run(["--resume", split_dir, "--no-progress", "--stop-after", "1"])
    assert second["epochs_done"] == 2
    _run(["--resume", split_dir, "--no-progress"])
    assert _metrics(split_dir) == _metrics(run_dir)
    a = torch.load(os.path.join(run_dir, "model_projected.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(split_dir, "model_projected.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("every, drawn_at", [(1e9, [1, 3]), (0.0, [1, 2, 3])])
def test_training_plot_is_throttled_and_ends_at_the_last_epoch(every, drawn_at, tmp_path, monkeypatch):
    """training.png is drawn after the first epoch, then at most every PLOT_EVERY_S, and after the last one."""
    drawn, real = [], loop.plot_history

    def spy(history, *args, **kwargs):
        drawn.append(len(history))
        return real(history, *args, **kwargs)

    monkeypatch.setattr(loop, "PLOT_EVERY_S", every)
    monkeypatch.setattr(loop, "plot_history", spy)
    _run(TINY + ["--run-dir", str(tmp_path / "run")])
    assert drawn == drawn_at


def test_non_finite_loss_stops_without_touching_the_checkpoint(tmp_path, monkeypatch, capsys):
    run_dir = str(tmp_path / "nan")
    _run(TINY + ["--run-dir", run_dir, "--stop-after", "1"])
    ckpt = os.path.join(run_dir, "checkpoint.pt")
    with open(ckpt, "rb") as f:
        before = hashlib.sha256(f.read()).hexdigest()
    real = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def poisoned(out, y, **kwargs):
        calls["n"] += 1
        loss = real(out, y, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    drawn, real_plot = [], loop.plot_history
    monkeypatch.setattr(loop, "plot_history", lambda history, *a, **k: (drawn.append(len(history)),
                                                                         real_plot(history, *a, **k)))
    rc = T.main(["--resume", run_dir, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "non-finite loss at epoch 2, step 2" in err[0]
    assert drawn == [1]  # training.png ends where the checkpoint does
    with open(ckpt, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == before
    assert len(_metrics(run_dir)) == 1


def test_resume_into_a_directory_without_a_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "no_ckpt"
    run_dir.mkdir()
    cfg, _, _ = T.parse_args(TINY + ["--run-dir", str(run_dir)])
    (run_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    rc = T.main(["--resume", str(run_dir), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"relaxeq-train: error: --resume {run_dir}: no checkpoint.pt there"]
