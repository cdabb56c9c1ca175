"""relaxeq-train --compile: the compiled forward + loss + regulariser against eager, recompiles, resume."""
import functools
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from relaxeq_fast import train as T
from relaxeq_fast.train import loop
from relaxeq_fast.vn import relaxed_layers

from testing import FULL, TINY, run_metrics as _metrics, train_run as _run


def _setup(model):
    images = model == "steerable_cnn"
    # θ-scaled λ: θ enters the regulariser too, so a θ baked into the graph would show in the loss
    cfg = T.TrainConfig(model=model, dataset="rotmnist" if images else "shapes", num_points=32, k=6, width=0.25,
                        group=4, batch_size=8, theta_scaled_lambda=True, relax_init="default",
                        compile="auto").resolved()  # W_r ≠ 0: a regulariser to compare
    torch.manual_seed(0)
    net = T.build_model(cfg, num_classes=5)
    for m in net.modules():
        if isinstance(m, torch.nn.Dropout):  # eager and compiled draw different dropout masks
            m.p = 0.0
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 28, 28, generator=gen) if images else torch.randn(8, 32, 3, generator=gen)
    y = torch.randint(0, 5, (8,), generator=gen)
    return cfg, net, x, y


def _loss_and_grads(fn, net, x, y, cfg, theta_buffer):
    net.zero_grad(set_to_none=True)
    loss, reg, r_ld, r_n, correct = fn(net, net, x, y, cfg, theta_buffer)
    loss.backward()
    return [loss, reg, r_ld, r_n, correct.double()], [p.grad.clone() for p in net.parameters()]


# aot_eager: what is tested is the tracing (graph breaks, guards on θ, the regulariser's side state read
# inside the graph); float32 on both sides, agreeing to rounding. Inductor's numerics: see the test below
@pytest.mark.parametrize("model, rtol, atol", [("vn_pointnet", 1e-4, 1e-5), ("steerable_cnn", 1e-4, 1e-5)])
def test_compiled_forward_loss_matches_eager_and_theta_never_recompiles(model, rtol, atol):
    cfg, net, x, y = _setup(model)
    layers = list(relaxed_layers(net))
    theta_buffer = layers[0].theta
    torch._dynamo.reset()
    counters.clear()
    compiled = loop.compiled_forward_loss(cfg, torch.device("cpu"), compiler="aot_eager")
    regularisers = []
    for theta in (1.0, 0.37, 0.0):  # θ changes as it does every step
        with torch.no_grad():
            for m in layers:
                m.theta.fill_(theta)
        want_vals, want_grads = _loss_and_grads(loop.forward_loss, net, x, y, cfg, theta_buffer)
        got_vals, got_grads = _loss_and_grads(compiled, net, x, y, cfg, theta_buffer)
        for name, g, w in zip(("loss", "regulariser", "R_LD", "R_N", "correct"), got_vals, want_vals):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"θ={theta} {name}: {m}")
        for (pname, _), g, w in zip(net.named_parameters(), got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m: f"θ={theta} grad {pname}: {m}")
        regularisers.append(got_vals[1].item())
    # the compiled regulariser followed θ (θ-scaled λ): θ is read from the buffer, not baked in
    assert regularisers[0] != regularisers[1] and abs(regularisers[2]) < 1e-12, regularisers
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compiled_run_resumes_exactly_and_follows_eager(tmp_path, monkeypatch):
    """A whole tiny run with --compile, uninterrupted and split in two, against the same run in eager.

    Compiled with aot_eager, as above: what is tested is the trainer around the compiled step (θ updates,
    state, resume); inductor's numerics are the next test's."""
    monkeypatch.setattr(loop, "compiled_forward_loss",
                        functools.partial(loop.compiled_forward_loss, compiler="aot_eager"))
    argv = TINY + FULL + ["--compile"]
    torch._dynamo.reset()
    counters.clear()
    whole = str(tmp_path / "whole")
    _run(argv + ["--run-dir", whole])
    # one graph for the whole run: θ changed every step (hold_linear per step) without a recompile
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    split = str(tmp_path / "split")
    _run(argv + ["--run-dir", split, "--stop-after", "1"])
    _run(["--resume", split, "--no-progress"])
    assert _metrics(split) == _metrics(whole)
    a = torch.load(os.path.join(whole, "model_projected.pt"), weights_only=False)["model"]
    b = torch.load(os.path.join(split, "model_projected.pt"), weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    eager = str(tmp_path / "eager")
    _run(TINY + FULL + ["--run-dir", eager])
    # first epoch (4 steps): compiled and eager differ only by float32 reordering
    got, want = _metrics(whole)[0], _metrics(eager)[0]
    for key in ("train_loss", "reg_loss", "r_ld", "r_n"):
        assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-4), key


def _relative_error(got, want):
    """‖got − want‖ / ‖want‖ over all parameters' gradients at once: per parameter, a gradient near 0 (a bias
    before a batch norm) makes the ratio meaningless."""
    num = torch.sqrt(sum((g.double() - w).square().sum() for g, w in zip(got, want)))
    return float(num / torch.sqrt(sum(w.square().sum() for w in want)))


# Inductor reorders and fuses float32 arithmetic, so it cannot match eager bit for bit; the question is
# whether it is as accurate. Both are measured against float64 eager. These tiny float32 models are
# themselves ill-conditioned (eager float32 vs float64, whole gradient, at θ = 1 / 0.37 / 0: VN-PointNet
# 0.24 % / 3 % / 1.8 %, steerable CNN 2.5e-6 / 3.9e-6 / 1 %, measured; the cause was not pinned down), so
# inductor is held to no fixed rtol: it may be at most 1.5× as far from float64 as eager is (measured:
# 0.3–1.03×), + 1e-4 for a case where eager happens to land very close
@pytest.mark.parametrize("model", ["vn_pointnet", "steerable_cnn"])
def test_inductor_is_as_accurate_as_eager_against_float64(model):
    import copy
    cfg, net, x, y = _setup(model)
    net64 = copy.deepcopy(net).double()
    layers, layers64 = list(relaxed_layers(net)), list(relaxed_layers(net64))
    torch._dynamo.reset()
    counters.clear()
    compiled = loop.compiled_forward_loss(cfg, torch.device("cpu"))
    for theta in (1.0, 0.37, 0.0):
        with torch.no_grad():
            for m in layers + layers64:
                m.theta.fill_(theta)
        ref_vals, ref_grads = _loss_and_grads(loop.forward_loss, net64, x.double(), y, cfg, layers64[0].theta)
        eager_vals, eager_grads = _loss_and_grads(loop.forward_loss, net, x, y, cfg, layers[0].theta)
        got_vals, got_grads = _loss_and_grads(compiled, net, x, y, cfg, layers[0].theta)
        eager_err = _relative_error(eager_grads, ref_grads)
        got_err = _relative_error(got_grads, ref_grads)
        assert got_err <= 1.5 * eager_err + 1e-4, (theta, got_err, eager_err)
        for name, g, w in zip(("loss", "regulariser", "R_LD", "R_N"), got_vals, ref_vals):
            torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-6, msg=lambda m: f"θ={theta} {name}: {m}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_mode_and_torchrun_errors(capsys):
    assert T.main(TINY + ["--compile", "fastest"]) == 2
    assert "--compile must be one of" in capsys.readouterr().err
    with pytest.raises(T.ConfigError, match="--compile is single-process"):
        T.validate(T.TrainConfig(compile="auto").resolved(), world=2)
