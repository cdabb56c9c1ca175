"""NaN and Inf in the inputs of every op, on every backend that runs here: the op returns (no crash, no
hang), the non-finite value reaches the outputs it feeds (never silently dropped), and the backward
runs too. Rows without a bad value stay as the reference computes them where the op is row-wise.
"""
import pytest
import torch

import relaxeq_fast  # noqa: F401  (registers the ops)
from relaxeq_fast import functional as F

from testing import TRITON_DEVICE

# the Triton interpreter computes in numpy, which warns on the very values this file feeds it
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

BACKENDS = ["reference", "native",
            pytest.param("triton", marks=pytest.mark.skipif(
                not relaxeq_fast.triton_available(), reason="triton is not installed"))]
BAD = [float("nan"), float("inf")]


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _poison(t, value, index):
    t = t.clone()
    t[index] = value
    return t.requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
def test_relaxed_linear(backend, bad):
    dev = _device(backend)
    g = torch.Generator().manual_seed(0)
    x = _poison(torch.randn(9, 6, generator=g).to(dev), bad, (4, 2))
    M = torch.randn(5, 6, generator=g).to(dev).requires_grad_()
    y, st = F.relaxed_linear(x, M, stats=True, backend=backend)
    assert not torch.isfinite(y[4]).all() and torch.isfinite(y[[0, 1, 2, 3, 5, 6, 7, 8]]).all()
    clean = x.detach()[[0, 1, 2, 3, 5, 6, 7, 8]] @ M.detach().T
    torch.testing.assert_close(y.detach()[[0, 1, 2, 3, 5, 6, 7, 8]], clean, rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(st.G).all() and not torch.isfinite(st.s).all()
    y.sum().backward()
    assert not torch.isfinite(M.grad).all()  # dM = dyᵀ x sees the bad row


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("where", ["x", "d"])
def test_vn_leaky_relu(backend, bad, where):
    dev = _device(backend)
    g = torch.Generator().manual_seed(1)
    x, d = torch.randn(7, 4, 3, generator=g).to(dev), torch.randn(7, 4, 3, generator=g).to(dev)
    x = _poison(x, bad, (3, 1, 0)) if where == "x" else x.requires_grad_()
    d = _poison(d, bad, (3, 1, 0)) if where == "d" else d.requires_grad_()
    out = F.vn_leaky_relu(x, d, 0.2, 1e-6, backend=backend)
    assert not torch.isfinite(out[3, 1]).all()
    others = torch.ones(7, 4, dtype=torch.bool)
    others[3, 1] = False
    assert torch.isfinite(out[others.to(dev)]).all()  # per-vector op: nothing else is touched
    out.sum().backward()
    assert x.grad is not None and d.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_vn_batch_norm(backend, bad, training):
    dev = _device(backend)
    g = torch.Generator().manual_seed(2)
    x = _poison(torch.randn(12, 3, 3, generator=g).to(dev), bad, (5, 0, 1))
    rm, rv = torch.zeros(3, device=dev), torch.ones(3, device=dev)
    out = F.vn_batch_norm(x, rm, rv, torch.ones(3, device=dev), torch.zeros(3, device=dev), training=training,
                          backend=backend)
    if training:  # the batch statistics of channel 0 are non-finite: all of channel 0 is
        assert not torch.isfinite(out[:, 0]).any() and torch.isfinite(out[:, 1:]).all()
        assert not torch.isfinite(rm[0]) and torch.isfinite(rm[1:]).all()
    else:  # running statistics: only the bad vector
        assert not torch.isfinite(out[5, 0]).all() and torch.isfinite(out[:5]).all()
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", BAD, ids=["nan", "inf"])
def test_relaxed_conv2d(backend, bad):
    dev = _device(backend)
    g = torch.Generator().manual_seed(3)
    x = _poison(torch.randn(2, 2, 7, 7, generator=g).to(dev), bad, (1, 0, 3, 3))
    M = torch.randn(3, 2, 3, 3, generator=g).to(dev).requires_grad_()
    D = torch.randn(2, 2, 3, 3, generator=g).to(dev).requires_grad_()
    y, r = F.relaxed_conv2d(x, M, None, D, 1, backend=backend)
    assert not torch.isfinite(y[1]).all() and torch.isfinite(y[0]).all()  # sample 0 is clean
    assert not torch.isfinite(r)
    (y.sum() + r).backward()
    assert not torch.isfinite(M.grad).all() and not torch.isfinite(D.grad).all()
