"""torch.use_deterministic_algorithms(True) and the launch context of the ops (issue 13, items 2-4).

Native CPU ops are deterministic for a given thread count: under the flag they run and repeat bit for
bit. Triton ops whose partial sums meet in atomics (G and s, dM and dc, the conv's S, the batch-norm
sums) raise PyTorch's error (or warn with warn_only) and run as usual without the flag; here they run in
the interpreter, where the alert logic is the same as on a GPU. CUDA paths are checked where a GPU exists.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import relaxeq_fast
from relaxeq_fast import VN, InputStats, use_backend
from relaxeq_fast import functional as F
from relaxeq_fast.backend import cuda_fused_max_dim
from relaxeq_fast.regularizer import relaxation_regularizers

from testing import CUDA_SKIP_REASON, has_cuda, skip_module_unless_triton_runs

pytestmark = pytest.mark.skipif(not relaxeq_fast.build_info()["extension_loaded"],
                                reason="the native extension is not built")


@contextlib.contextmanager
def deterministic(warn_only=False):
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _native_training_step(seed=0):
    """Every native op forward and backward (linear with stats, VN leaky ReLU and batch norm, conv with
    its defect, the regulariser), float32 at 2 threads; returns everything it produced."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 8, 3, generator=g, requires_grad=True)
    M = torch.randn(6 * 3, 8 * 3, generator=g, requires_grad=True)
    y, (G, s, n) = F.relaxed_linear(x.reshape(300, 24), M, None, stats=True)
    y = y.reshape(300, 6, 3)
    d = torch.randn(300, 6, 3, generator=g, requires_grad=True)
    z = F.vn_leaky_relu(F.vn_batch_norm(y, None, None, training=True), d, 0.2)
    W_r = torch.randn(6 * 3, 8 * 3, generator=g, requires_grad=True)
    terms = relaxation_regularizers(W_r, None, VN(8), VN(6), InputStats(G, s, n))
    img = torch.randn(4, 3, 9, 9, generator=g, requires_grad=True)
    K = torch.randn(5, 3, 3, 3, generator=g, requires_grad=True)
    D = torch.randn(2, 3, 3, 3, generator=g, requires_grad=True)
    out, r = F.relaxed_conv2d(img, K, None, D, padding=1)
    loss = z.square().sum() + terms.lie_derivative + terms.projection + out.square().sum() + r
    grads = torch.autograd.grad(loss, (x, M, d, W_r, img, K, D))
    return (loss.detach(), G, s) + grads


@pytest.mark.parametrize("threads", [1, 2])
def test_native_cpu_ops_run_under_the_flag_and_repeat_bit_for_bit(threads):
    torch.set_num_threads(threads)
    with use_backend("native"), deterministic():
        first = _native_training_step()
        again = _native_training_step()
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_cuda_fused_max_dim_sets_and_restores():
    before = torch.ops.relaxeq.cuda_fused_max_dim(-1)
    with cuda_fused_max_dim(7):
        assert torch.ops.relaxeq.cuda_fused_max_dim(-1) == 7
        with cuda_fused_max_dim(0):
            assert torch.ops.relaxeq.cuda_fused_max_dim(-1) == 0
        assert torch.ops.relaxeq.cuda_fused_max_dim(-1) == 7
    assert torch.ops.relaxeq.cuda_fused_max_dim(-1) == before
    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="value must be an int >= 0"):
            with cuda_fused_max_dim(bad):
                pass
    with pytest.raises(RuntimeError, match="value must be >= 0"):
        torch.ops.relaxeq.cuda_fused_max_dim(-2)


def test_environment_is_read_once():
    """RELAXEQ_CUDA_FUSED_MAX_DIM is read at the first use, not at every call: a later change of the
    environment (which another thread might be making) does not reach the extension."""
    code = ("import os, torch, relaxeq_fast\n"
            "first = torch.ops.relaxeq.cuda_fused_max_dim(-1)\n"
            "os.environ['RELAXEQ_CUDA_FUSED_MAX_DIM'] = '5'\n"
            "print(first, torch.ops.relaxeq.cuda_fused_max_dim(-1))\n")
    env = dict(os.environ, RELAXEQ_CUDA_FUSED_MAX_DIM="77")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["77", "77"]


@pytest.mark.skipif(not has_cuda(), reason=CUDA_SKIP_REASON)
def test_cuda_ops_under_the_flag():
    """relaxed_linear takes its cuBLAS route (bitwise repeatable); the conv's S and the batch-norm sums,
    summed with atomics, raise PyTorch's error."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, 24, generator=g).cuda()
    M = torch.randn(18, 24, generator=g).cuda()
    with deterministic(), cuda_fused_max_dim(100000):  # the tiled kernel would be chosen without the flag
        a = torch.ops.relaxeq.relaxed_linear(x, M, None, True)
        b = torch.ops.relaxeq.relaxed_linear(x, M, None, True)
        assert all(torch.equal(u, v) for u, v in zip(a, b))
        img, K, D = torch.randn(2, 3, 8, 8).cuda(), torch.randn(4, 3, 3, 3).cuda(), torch.randn(2, 3, 3, 3).cuda()
        with pytest.raises(RuntimeError, match="relaxed_conv2d.*deterministic"):
            torch.ops.relaxeq.relaxed_conv2d(img, K, None, D, 1, True)
        torch.ops.relaxeq.relaxed_conv2d(img, K, None, D, 1, False)  # no S: no atomics


# ---- Triton (interpreter here) --------------------------------------------------------------------

@pytest.fixture(scope="module")
def triton_modules():
    skip_module_unless_triton_runs()
    from relaxeq_fast.triton_kernels import relaxed_conv2d, relaxed_linear, vn_batch_norm, vn_leaky_relu
    return dict(relaxed_linear=relaxed_linear, relaxed_conv2d=relaxed_conv2d, vn_batch_norm=vn_batch_norm,
                vn_leaky_relu=vn_leaky_relu)


def _triton_calls(t, device):
    g = torch.Generator().manual_seed(0)
    x, M = torch.randn(9, 5, generator=g).to(device), torch.randn(4, 5, generator=g).to(device)
    dy = torch.randn(9, 4, generator=g).to(device)
    v = torch.randn(6, 3, 3, generator=g).to(device)
    mean, invstd = torch.rand(3).to(device) + 0.5, torch.rand(3).to(device) + 0.5
    img, K, D = (torch.randn(1, 2, 5, 5).to(device), torch.randn(3, 2, 3, 3).to(device),
                 torch.randn(2, 2, 3, 3).to(device))
    rl, rc, bn = t["relaxed_linear"], t["relaxed_conv2d"], t["vn_batch_norm"]
    # (what, call with atomics, the same op without them or None)
    return [
        ("relaxed_linear_triton with stats", lambda: rl.op()(x, M, None, True), lambda: rl.op()(x, M, None, False)),
        ("relaxed_linear_backward_triton", lambda: rl.backward_op()(dy, x, M, [False, True, True]),
         lambda: rl.backward_op()(dy, x, M, [True, False, False])),
        ("relaxed_conv2d_triton with need_S", lambda: rc.op()(img, K, None, D, 1, True),
         lambda: rc.op()(img, K, None, D, 1, False)),
        ("vn_batch_norm_apply_backward_triton", lambda: bn.backward_op()(v, v, mean, invstd, None, None, 1e-6,
                                                                          [True, True, True, False, False]),
         lambda: bn.backward_op()(v, v, mean, invstd, None, None, 1e-6, [True, False, False, False, False])),
    ]


@pytest.mark.parametrize("index", range(4), ids=["linear_stats", "linear_backward", "conv_S", "batch_norm_backward"])
def test_triton_ops_with_atomics_alert(triton_modules, index):
    from testing import TRITON_DEVICE
    what, with_atomics, without = _triton_calls(triton_modules, TRITON_DEVICE)[index]
    expected = with_atomics()  # no flag: runs
    with deterministic():
        with pytest.raises(RuntimeError, match=f"relaxeq::{what}.*does not have a deterministic implementation"):
            with_atomics()
        without()  # the same op on a path without atomics runs
    with deterministic(warn_only=True):
        with pytest.warns(UserWarning, match=f"relaxeq::{what}"):
            got = with_atomics()
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_triton_launches_under_the_input_device(triton_modules, monkeypatch):
    from relaxeq_fast.triton_kernels import _common
    from testing import TRITON_DEVICE
    assert isinstance(_common.device_guard(torch.device("cpu")), contextlib.nullcontext)
    guard = _common.device_guard(torch.device("cuda", 1))  # built only: entering needs a GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    real = _common.device_guard
    monkeypatch.setattr(_common, "device_guard", lambda device: seen.append(device) or real(device))
    for _what, with_atomics, without in _triton_calls(triton_modules, TRITON_DEVICE):
        with_atomics()
        without()
    x = torch.randn(4, 2, 3).to(TRITON_DEVICE)
    triton_modules["vn_leaky_relu"].op()(x, x, 0.2, 1e-6)
    triton_modules["vn_batch_norm"].stats_op()(x, 0.0)
    assert len(seen) == 10 and all(d == torch.device(TRITON_DEVICE) for d in seen)


@pytest.mark.skipif(not has_cuda() or torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_triton_on_the_second_gpu(triton_modules):
    torch.cuda.set_device(0)
    x, M = torch.randn(40, 6, device="cuda:1"), torch.randn(5, 6, device="cuda:1")
    y, G, s = triton_modules["relaxed_linear"].op()(x, M, None, True)
    assert y.device == torch.device("cuda:1")
    torch.testing.assert_close(y, x @ M.T, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(G, x.T @ x, rtol=1e-3, atol=1e-3)


def test_float64_triton_scalars_are_made_once(triton_modules):
    vl = triton_modules["vn_leaky_relu"]
    from testing import TRITON_DEVICE
    x = torch.randn(5, 2, 3, dtype=torch.float64).to(TRITON_DEVICE)
    vl.op()(x, x, 0.3, 1e-7)
    before = vl._float64_scalars.cache_info()
    for _ in range(3):
        vl.op()(x, x, 0.3, 1e-7)
    after = vl._float64_scalars.cache_info()
    assert after.misses == before.misses and after.hits == before.hits + 3
