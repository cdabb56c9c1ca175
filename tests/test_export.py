"""torch.export of relaxed and projected models (eval mode: what is deployed): the exported program equals the
eager model, survives torch.export.save / load in a fresh process that imports only relaxeq_fast (which
registers the ops and their fake kernels), and a projected model exports with no relaxation op at all."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from relaxeq_fast import _ops
from relaxeq_fast.models import SteerableCNN, VNPointNet
from relaxeq_fast.vn import project

pytestmark = pytest.mark.skipif(not _ops.EXTENSION_LOADED, reason="the native extension is not built")

# the ops that exist for the relaxation only: a projected model must contain none of them
RELAXATION_OPS = ("relaxed_linear", "relaxed_params", "relaxed_conv2d", "relaxation_regularizer")


def _model(name: str, relaxed: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "vn_pointnet":
        net = VNPointNet(num_classes=4, k=4, width=0.125, relaxed=relaxed)
    else:
        net = SteerableCNN(num_classes=4, group=4, width=0.25, relaxed=relaxed)
    if relaxed:  # W_r ≠ 0 and θ ≠ 0, so the relaxation changes the output the export must reproduce
        with torch.no_grad():
            for n, p in net.named_parameters():
                if "relax" in n:
                    p.normal_(0, 0.1)
    return net.eval()


def _input(name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, 3, generator=g) if name == "vn_pointnet" else torch.randn(3, 1, 28, 28, generator=g)


def _relaxeq_ops(ep) -> set:
    return {str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "relaxeq" in str(n.target)}


@pytest.mark.parametrize("name", ["vn_pointnet", "steerable_cnn"])
@pytest.mark.parametrize("stage", ["relaxed", "projected"])
def test_export_matches_eager_and_reloads_in_a_fresh_process(name, stage, tmp_path):
    net = _model(name, relaxed=True)
    if stage == "projected":
        net = project(net).eval()
    x = _input(name)
    with torch.no_grad():
        want = net(x)
    ep = torch.export.export(net, (x,))
    ops = _relaxeq_ops(ep)
    if stage == "projected":
        assert not any(op in o for o in ops for op in RELAXATION_OPS), ops
    else:
        assert any("relaxed_" in o for o in ops), ops  # the fused ops are in the graph, not decomposed
    torch.testing.assert_close(ep.module()(x), want, rtol=1e-5, atol=1e-6)
    path, x_path, y_path = tmp_path / "model.pt2", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.export.save(ep, str(path))
    torch.save(x, x_path)
    script = textwrap.dedent(f"""
        import torch
        import relaxeq_fast  # registers the relaxeq ops and their fake kernels
        ep = torch.export.load({str(path)!r})
        torch.save(ep.module()(torch.load({str(x_path)!r})), {str(y_path)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    torch.testing.assert_close(torch.load(y_path), want, rtol=1e-5, atol=1e-6)


def test_export_with_a_dynamic_batch():
    """One exported program for any batch size: the ops' fake kernels follow a symbolic batch."""
    net = project(_model("vn_pointnet", relaxed=True)).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    ep = torch.export.export(net, (_input("vn_pointnet"),), dynamic_shapes=({0: batch},))
    for b in (2, 5):
        x = torch.randn(b, 16, 3)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(x), net(x), rtol=1e-5, atol=1e-6)
