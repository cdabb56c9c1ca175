"""relaxeq-train under torchrun (2 gloo ranks) against one process on the whole batch: VN-PointNet, and a steerable
CNN whose torchrun run is interrupted and resumed under torchrun. The data-parallel helpers themselves are in
test_distributed.py."""
import os

import pytest
import torch

from testing import TINY, run_metrics as _metrics, torchrun_train, train_run as _run


def _single_vs_torchrun(args, tmp_path, resume_under_torchrun=False):
    """Run ``args`` in one process and under torchrun with 2 gloo ranks; compare metrics and weights.
    resume_under_torchrun: the torchrun run stops after its first epoch and is resumed by a second torchrun."""
    single = str(tmp_path / "single")
    _run(args + ["--run-dir", single])
    last = {flag: int(args[len(args) - 1 - args[::-1].index(flag) + 1]) for flag in ("--n-train", "--n-test")}
    n_train, n_test = last["--n-train"], last["--n-test"]
    ddp = str(tmp_path / "ddp")
    if resume_under_torchrun:
        torchrun_train(args + ["--run-dir", ddp, "--stop-after", "1"])
        assert len(_metrics(ddp)) == 1
        torchrun_train(["--resume", ddp, "--no-progress"])
    else:
        torchrun_train(args + ["--run-dir", ddp])
    a, b = _metrics(single), _metrics(ddp)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b):
        for key in ("theta", "lr", "step", "epoch"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), abs=1e-12), key
        # accuracies are argmaxes of logits that agree to ~1e-9: a near-tie may flip one sample (seen once
        # in ~10 runs of the steerable case); more than one sample is a real difference
        for key, n in (("train_acc", n_train), ("test_acc", n_test)):
            assert abs(float(ra[key]) - float(rb[key])) <= 1 / n + 1e-12, key
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


def test_torchrun_steerable_cnn_resumed_matches_one_process(tmp_path):
    """The image path under DDP: field batch norm moments and the conv defect r all-reduced; the
    torchrun run is interrupted after epoch 1 and resumed under torchrun (cosine lr: its state matters)."""
    _single_vs_torchrun(["--model", "steerable_cnn", "--dataset", "rotmnist", "--group", "4", "--width", "0.25",
                         "--n-train", "16", "--n-test", "24", "--batch-size", "16", "--epochs", "2",
                         "--dtype", "float64", "--dropout", "0", "--no-progress", "--threads", "1"], tmp_path,
                        resume_under_torchrun=True)
