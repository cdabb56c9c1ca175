"""relaxeq-train's configuration: every bad setting is one line naming the cause (exit 2), --device cuda without a
GPU, a global batch that does not split over the ranks, --print-config against the public code's setups, and the
paper setups filling only what is unset."""
import json
import re

import pytest
import torch

from relaxeq_fast import train as T
from testing import TINY


@pytest.mark.parametrize("extra, cause", [
    (["--model", "resnet"], "--model must be one of"),
    (["--dataset", "modelnet40"], "needs --data-root"),
    (["--dataset", "modelnet40", "--data-root", "/no/such/dir"], "/no/such/dir does not exist"),
    (["--batch-size", "100"], "--n-train 64 leaves 64 training samples after the validation split, fewer than one batch"),
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
    (["--dataset", "imagenet"], "--dataset must be one of"),
    (["--model", "steerable_cnn", "--dataset", "rotmnist", "--group", "0"], "--group must be an int N >= 1"),
    (["--test-rotation", "y"], "--test-rotation must be one of"),
    (["--epochs", "0"], "--epochs must be a positive integer, got 0"),
    (["--num-points", "0"], "--num-points must be a positive integer, got 0"),
    (["--k", "0"], "--k must be a positive integer, got 0"),
    (["--width", "0"], "--width must be positive, got 0.0"),
    (["--dropout", "1"], "--dropout must be in [0, 1), got 1.0"),
    (["--dropout", "-0.1"], "--dropout must be in [0, 1), got -0.1"),
    (["--optimizer", "lbfgs"], "--optimizer must be 'adam' or 'sgd', got 'lbfgs'"),
    (["--lr-schedule", "exp"], "--lr-schedule must be 'step', 'cosine' or 'none', got 'exp'"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--weight-decay", "-1"], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--lambda-ld", "inf"], "--lambda-ld must be a finite number >= 0, got inf"),
    (["--lambda-n=-1e-3"], "--lambda-n must be a finite number >= 0"),
    (["--theta-max", "nan"], "--theta-max must be a finite number >= 0, got nan"),
    (["--theta-unit", "batch"], "--theta-unit must be 'step' or 'epoch', got 'batch'"),
    (["--reduction", "max"], "--reduction must be one of"),
    (["--relax-init", "ones"], "--relax-init must be 'zeros' or 'default', got 'ones'"),
    (["--relax-space", "half"], "--relax-space must be one of ['full', 'complement'], got 'half'"),
    (["--projection", "closest"], "--projection must be one of ['drop', 'nearest'], got 'closest'"),
    (["--device", "tpu"], "--device must be 'cpu' or 'cuda[:i]', got 'tpu'"),
    (["--clip-grad-norm", "0"], "--clip-grad-norm must be a finite number > 0, got 0.0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--n-train", "0"], "--n-train must be a positive integer, got 0"),
    (["--augment-rotated", "flip"], "--augment-rotated takes"),
    (["--label-smoothing", "1"], "--label-smoothing must be in [0, 1), got 1.0"),
    (["--val-fraction", "-0.5"], "--val-fraction must be in [0, 1), got -0.5"),
    (["--val-fraction", "0.9"], "--n-train 64 leaves 6 training samples after the validation split, fewer than one "
                                "batch (--batch-size 16)"),
    (["--relaxed-maps", "most"], "--relaxed-maps must be one of"),
    (["--relax-lr", "half"], "--relax-lr must be 'same' or 'theta', got 'half'"),
    (["--amp", "fp8"], "--amp must be one of ['bf16', 'fp16'], got 'fp8'"),
    (["--amp", "fp16"], "--amp fp16 needs --device cuda"),
    (["--amp", "--dtype", "float64"], "--amp needs --dtype float32"),
])
def test_bad_configuration_is_one_line_naming_the_cause(extra, cause, tmp_path, capsys):
    rc = T.main(TINY + ["--run-dir", str(tmp_path / "bad")] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("relaxeq-train: error:") and cause in err[0], err[0]


@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_device_without_a_gpu_is_a_config_error(device, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    rc = T.main(TINY + ["--run-dir", str(tmp_path / "bad"), "--device", device])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"relaxeq-train: error: --device {device}: torch sees no CUDA GPU on this machine"]


@pytest.mark.parametrize("batch, world, cause", [
    (15, 2, "--batch-size 15 (global) must divide evenly over 2 processes"),
    (6, 4, "--batch-size 6 (global) must divide evenly over 4 processes"),
    (4, 4, "--batch-size 4 gives 1 sample(s) per process; batch norm needs at least 2"),
])
def test_batch_that_does_not_split_over_ranks_is_a_config_error(batch, world, cause):
    cfg = T.TrainConfig(batch_size=batch).resolved()
    with pytest.raises(T.ConfigError, match=re.escape(cause)):
        T.validate(cfg, world)
    T.validate(T.TrainConfig(batch_size=2 * world).resolved(), world)  # and the smallest that works passes


# The public code's setups (github StefanosPert/Equivariant_Optimization_CR, PCClassification/), written
# out here from that code and the paper, not from our defaults.
PUBLIC_CODE = {
    "vn_pointnet": dict(optimizer="adam", lr=1e-3, weight_decay=1e-4, lr_schedule="step", lr_step=20, lr_gamma=0.7,
                        batch_size=24, num_points=300, dropout=0.4, theta_schedule="triangle", theta_unit="epoch",
                        lambda_ld=0.01, lambda_n=0.01, reduction="paper", theta_scaled_lambda=False,
                        relax_init="zeros", relaxed_maps="paper", augment="scale,shift",
                        augment_rotated="dropout,scale,shift", label_smoothing=0.0),
    "vn_dgcnn": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, lr_schedule="cosine", batch_size=32,
                     num_points=300, dropout=0.5, theta_schedule="triangle", theta_unit="epoch", lambda_ld=5e-4,
                     lambda_n=5e-4, reduction="paper", theta_scaled_lambda=True, relax_init="default",
                     relaxed_maps="paper", augment="scale,shift", augment_rotated="dropout,scale,shift",
                     label_smoothing=0.2),
}


@pytest.mark.parametrize("model", sorted(PUBLIC_CODE))
def test_print_config_is_the_public_codes_setup(model, capsys):
    assert T.main(["--model", model, "--print-config", "--dataset", "modelnet40", "--data-root", "."]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {k: printed[k] for k in PUBLIC_CODE[model]} == PUBLIC_CODE[model]
    # every value can still be set on the command line
    assert T.main(["--model", model, "--print-config", "--theta-schedule", "cosine", "--lambda-n", "0.5",
                   "--no-theta-scaled-lambda", "--relaxed-maps", "all", "--augment-rotated", "none"]) == 0
    printed = json.loads(capsys.readouterr().out)
    # the embedded shapes differ by axis ratios: the anisotropic loader scale would change their class
    assert (printed["augment"], printed["augment_rotated"]) == ("none", "none")
    assert (printed["theta_schedule"], printed["lambda_n"], printed["theta_scaled_lambda"], printed["relaxed_maps"],
            printed["augment_rotated"]) == ("cosine", 0.5, False, "all", "none")


def test_print_config_refuses_a_bad_config(capsys):
    assert T.main(["--print-config", "--relaxed-maps", "some"]) == 2
    assert "--relaxed-maps must be one of" in capsys.readouterr().err


def test_paper_setups_fill_only_what_is_unset():
    cfg = T.TrainConfig(model="vn_dgcnn", lr=0.05).resolved()
    assert (cfg.optimizer, cfg.lr, cfg.lr_schedule, cfg.batch_size, cfg.momentum) == ("sgd", 0.05, "cosine", 32, 0.9)
    cfg = T.TrainConfig(model="vn_pointnet").resolved()
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.lr_step, cfg.lr_gamma, cfg.batch_size, cfg.num_points) == \
        ("adam", 1e-3, 1e-4, 20, 0.7, 24, 300)
