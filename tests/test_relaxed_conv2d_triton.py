"""relaxeq::relaxed_conv2d_triton (and its backward) against the float64 reference.

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py
before triton is imported): shapes are tiny because the interpreter executes programs in numpy.
"""
import pytest
import torch

from testing import (CUDA_SKIP_REASON, TRITON_BFLOAT16_MARKS, TRITON_DEVICE as DEVICE,  # noqa: F401
                     TRITON_FLOAT16_MARKS, assert_close_scaled, conv2d_im2col_ref, has_cuda, ieee_fp32,
                     record_need_S, skip_module_unless_triton_runs)

skip_module_unless_triton_runs()

from relaxeq_fast.functional import relaxed_conv2d  # noqa: E402
from relaxeq_fast.reference import relaxed_conv2d_ref  # noqa: E402
from relaxeq_fast.triton_kernels import relaxed_conv2d as triton_rc  # noqa: E402

# (dtype, tolerances): max|got - ref| <= tol * max(1, max|ref|), scaled once (assert_close_scaled), the
# reference being float64 on the same (rounded) inputs. r (a sum of squares, >> 1) is thus relative to r.
# S and the gradients sum over every pixel of the batch (atomics / torch's conv backward, in any order).
DTYPES = [
    # fp32 accumulators, blocked dot order differs from the reference: ~1e-6 here; TF32 off (testing.ieee_fp32).
    pytest.param(torch.float32, {"y": 1e-5, "r": 1e-5, "S": 5e-5, "grad": 5e-5}, id="float32"),
    # Same algorithm in float64: rounding of a few hundred terms.
    pytest.param(torch.float64, {"y": 1e-12, "r": 1e-12, "S": 5e-12, "grad": 5e-12}, id="float64"),
    # y rounded once to the input dtype (fp32 accumulate): 2^-11 and 2^-8 relative. r and S stay in fp32,
    # accumulated from the (exact) products of the rounded inputs: fp32 summation error only.
    pytest.param(torch.float16, {"y": 5e-3, "r": 1e-5, "S": 1e-4, "grad": 2.5e-2}, id="float16",
                 marks=TRITON_FLOAT16_MARKS),
    pytest.param(torch.bfloat16, {"y": 3e-2, "r": 1e-5, "S": 1e-4, "grad": 1.5e-1}, id="bfloat16",
                 marks=TRITON_BFLOAT16_MARKS),
]
# (B, C_in, C_out, C_d, H, W, k, padding); (2, 5, 17, 20, ...) gives two channel blocks of 16,
# with C_d > C_out so one program has z channels but no y channels.
SHAPES = [(1, 1, 1, 1, 5, 5, 1, 0), (2, 3, 4, 5, 9, 7, 3, 1), (1, 2, 3, 2, 6, 11, 3, 0),
          (2, 5, 17, 20, 8, 6, 5, 2)]


@pytest.fixture(scope="module")
def op():
    return triton_rc.op()


def _inputs(b, c_in, c_out, c_d, h, w, k, dtype, with_c=True, with_d=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)  # noqa: E731
    return (rnd(b, c_in, h, w), rnd(c_out, c_in, k, k), rnd(c_out) if with_c else None,
            rnd(c_d, c_in, k, k) if with_d else None)


def _f64(*ts):
    return [None if t is None else t.detach().double() for t in ts]


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_c", [True, False], ids=["c", "no_c"])
@pytest.mark.parametrize("with_d", [True, False], ids=["D", "no_D"])
def test_forward(op, dtype, tol, shape, with_c, with_d):
    *dims, padding = shape
    x, M, c, D = _inputs(*dims, dtype, with_c, with_d)
    y, r, S = op(x, M, c, D, padding, True)
    y_ref, r_ref, S_ref = relaxed_conv2d_ref(*_f64(x, M, c, D), padding)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and r.dtype == sdt and S.dtype == sdt
    assert_close_scaled(y, y_ref, tol["y"], "y")
    if with_d:
        assert r.shape == () and S.shape == D.shape
        assert_close_scaled(r, r_ref, tol["r"], "r")
        assert_close_scaled(S, S_ref, tol["S"], "S")
    else:
        assert r.shape == (0,) and S.shape == (0,)


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_d", [True, False], ids=["D", "no_D"])
def test_need_S_false_skips_only_S(op, dtype, tol, shape, with_d):
    # Skipping S must leave the y and r computation alone: exactly the same values.
    *dims, padding = shape
    x, M, c, D = _inputs(*dims, dtype, with_d=with_d)
    y, r, S = op(x, M, c, D, padding, True)
    y0, r0, S0 = op(x, M, c, D, padding, False)
    assert torch.equal(y0, y) and torch.equal(r0, r)
    assert S0.shape == (0,) and S0.dtype == S.dtype


def test_D_gradient_without_S_raises(op):
    x, M, c, D = _inputs(1, 2, 3, 2, 5, 5, 3, torch.float64)
    _, r, _ = op(x, M, c, D.requires_grad_(), 1, False)
    with pytest.raises(RuntimeError, match="need_S=False"):
        torch.autograd.grad(r, (D,))


@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
def test_functional_asks_for_S_only_when_D_needs_a_gradient(monkeypatch, dtype, tol):
    seen = record_need_S(monkeypatch)
    x, M, c, D = _inputs(2, 3, 4, 5, 7, 6, 3, dtype)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    y64, r64, _ = relaxed_conv2d_ref(*leaves64, 1)
    with torch.no_grad():
        y, r = relaxed_conv2d(*leaves, 1, backend="triton")
    assert seen == [False]
    assert_close_scaled(y, y64, tol["y"], "y (no_grad)")
    assert_close_scaled(r, r64, tol["r"], "r (no_grad)")
    dy = torch.randn_like(y)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum() + 0.7 * r64, leaves64)
    y, r = relaxed_conv2d(*leaves, 1, backend="triton")
    assert seen == [False, True]
    grads = torch.autograd.grad((y * dy).sum() + 0.7 * r, leaves)
    for name, g, g64 in zip(("dx", "dM", "dc", "dD"), grads, grads64):
        assert_close_scaled(g, g64, tol["grad"], name)


def test_forward_noncontiguous(op):
    x = torch.randn(2, 3, 14, 9, dtype=torch.float64, device=DEVICE)[:, :, ::2].transpose(2, 3)  # [2, 3, 9, 7]
    M = torch.randn(4, 3, 3, 3, dtype=torch.float64, device=DEVICE).transpose(2, 3)
    D = torch.randn(3, 5, 3, 3, dtype=torch.float64, device=DEVICE).transpose(0, 1)
    c = torch.randn(8, dtype=torch.float64, device=DEVICE)[::2]
    assert not (x.is_contiguous() or M.is_contiguous() or D.is_contiguous() or c.is_contiguous())
    y, r, S = op(x, M, c, D, 1, True)
    y_ref, r_ref, S_ref = relaxed_conv2d_ref(*_f64(x, M, c, D), 1)
    assert_close_scaled(y, y_ref, 1e-12, "y")
    assert_close_scaled(r, r_ref, 1e-12, "r")
    assert_close_scaled(S, S_ref, 1e-12, "S")


@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
def test_backward(op, dtype, tol):
    x, M, c, D = _inputs(2, 3, 4, 5, 7, 6, 3, dtype)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    y, r, _ = op(*leaves, 1, True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad((y * dy).sum() + 0.7 * r, leaves)
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    y64, r64, _ = relaxed_conv2d_ref(*leaves64, 1)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum() + 0.7 * r64, leaves64)
    for name, g, g64 in zip(("dx", "dM", "dc", "dD"), grads, grads64):
        assert_close_scaled(g, g64, tol["grad"], name)


# Against the float64 im2col reference (testing.conv2d_im2col_ref): this op's backward is torch's
# aten.convolution_backward and relaxed_conv2d_ref's gradients come from autograd of F.conv2d, the same
# routine; the im2col reference shares no convolution code with either.
@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_im2col_reference(op, dtype, tol, shape):
    *dims, padding = shape
    x, M, c, D = _inputs(*dims, dtype, seed=11)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    y, r, S = op(*leaves, padding, True)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(12)).to(dtype).to(DEVICE)
    grads = torch.autograd.grad((y * dy).sum() + 0.7 * r, leaves)
    want = conv2d_im2col_ref(x, M, c, D, padding, dy, 0.7)
    for name, got in (("y", y), ("r", r), ("S", S)):
        assert_close_scaled(got, want[name], tol[name], name)
    for name, got in zip(("dx", "dM", "dc", "dD"), grads):
        assert_close_scaled(got, want[name], tol["grad"], name)


# Every GPU tile configuration of the kernel (_block_sizes on a CUDA device: one per dtype), forced onto
# this device: compiled on a GPU (scripts/gpu_check.sh), in the interpreter elsewhere (index and mask
# logic only; warps and shared memory are the GPU's). The shape gives several pixel programs, channel
# blocks and reduction slices of every config, each with a partial last tile; C_d > C_out.
GPU_TILE_CONFIGS = [pytest.param(p.values[0], p.values[1], id=f"{p.id}-" + "x".join(
    map(str, triton_rc._block_sizes(p.values[0], torch.device("cuda")))), marks=p.marks) for p in DTYPES]


@pytest.mark.parametrize("dtype, tol", GPU_TILE_CONFIGS)
def test_gpu_tile_config(op, monkeypatch, dtype, tol):
    config = triton_rc._block_sizes(dtype, torch.device("cuda"))
    monkeypatch.setattr(triton_rc, "_block_sizes", lambda *_: config)
    shape = (2, 5, 40, 70, 11, 13, 3, 1)  # 286 pixels, 45 = 5 * 3^2 reduction indices
    *dims, padding = shape
    x, M, c, D = _inputs(*dims, dtype, seed=13)
    block_p, block_k, block_co, block_cd, _ = config
    assert 2 * 11 * 13 > 3 * block_p and 45 > block_k and 70 > 2 * block_cd and 40 > block_co
    y, r, S = op(x, M, c, D, padding, True)
    y_ref, r_ref, S_ref = relaxed_conv2d_ref(*_f64(x, M, c, D), padding)
    assert_close_scaled(y, y_ref, tol["y"], "y")
    assert_close_scaled(r, r_ref, tol["r"], "r")
    assert_close_scaled(S, S_ref, tol["S"], "S")


class TestDefaultTF32:
    """The default float32 path on a GPU: torch allows TF32 in cuDNN convolutions unless told otherwise,
    and the Triton kernel follows that switch (tl.dot in tf32), as does its backward (cuDNN)."""

    @pytest.fixture(autouse=True)
    def ieee_fp32(self):  # noqa: F811
        # Overrides the module's autouse testing.ieee_fp32: torch's own switches for this class.
        yield

    @pytest.mark.cuda
    @pytest.mark.skipif(not has_cuda(), reason="TF32 exists only on a GPU; " + CUDA_SKIP_REASON)
    def test_tf32_default_conv_path_cuda(self, op):
        assert torch.backends.cudnn.allow_tf32, "torch's default (cudnn.allow_tf32 = True) expected here"
        assert triton_rc._dot_precision(torch.float32, torch.device("cuda")) == "tf32"
        # TF32 rounds each product's inputs to 10-bit mantissas (2^-11 relative): y, r, S and the
        # gradients sum tens to thousands of such products, so ~10 * 2^-11 of the scale.
        tol = 5e-3
        x, M, c, D = _inputs(2, 5, 17, 20, 11, 13, 3, torch.float32, seed=14)
        leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
        y, r, S = op(*leaves, 1, True)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
        grads = torch.autograd.grad((y * dy.to(y)).sum() + 0.7 * r, leaves)
        want = conv2d_im2col_ref(x, M, c, D, 1, dy, 0.7)
        for name, got in (("y", y), ("r", r), ("S", S)) + tuple(zip(("dx", "dM", "dc", "dD"), grads)):
            assert_close_scaled(got, want[name], tol, name + " (TF32)")


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bfloat16 refusal; a GPU runs bfloat16")
def test_bfloat16_refused_in_the_interpreter(op):
    # The interpreter computes garbage in bfloat16 (testing.TRITON_BFLOAT16_MARKS): a clear error instead.
    x, M, c, D = _inputs(1, 2, 3, 2, 5, 5, 3, torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16"):
        op(x, M, c, D, 1, True)


def test_functional_backend_triton():
    x, M, c, D = _inputs(1, 2, 3, 2, 6, 6, 3, torch.float64)
    y, r = relaxed_conv2d(x, M, c, D, 1, backend="triton")
    y_ref, r_ref, _ = relaxed_conv2d_ref(x, M, c, D, 1)
    assert_close_scaled(y, y_ref, 1e-12, "y")
    assert_close_scaled(r, r_ref, 1e-12, "r")


def test_opcheck(op):
    x, M, c, D = _inputs(1, 2, 3, 2, 5, 5, 3, torch.float64)
    torch.library.opcheck(op, (x.requires_grad_(), M.requires_grad_(), c, D.requires_grad_(), 1, True))
    # Without S, D takes no gradient (as the functional layer arranges).
    torch.library.opcheck(op, (x, M, c, D.detach(), 1, False))
    dy = torch.randn(1, 3, 5, 5, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(triton_rc.backward_op(), (dy, x.detach(), M.detach(), 1, [True, True, True]))


def test_r_is_quadratic_in_D(op):
    # r = <D, S> and the D gradient is 2 dr S, against autograd of the pure-torch r = sum z^2.
    x, M, c, D = _inputs(2, 3, 4, 5, 7, 6, 3, torch.float64)
    D.requires_grad_()
    _, r, S = op(x, M, c, D, 1, True)
    assert_close_scaled(r, (D.detach() * S).sum(), 1e-12, "r = <D, S>")
    (dD,) = torch.autograd.grad(0.37 * r, (D,))
    assert_close_scaled(dD, 2 * 0.37 * S, 1e-14, "dD = 2 dr S")
    D64 = D.detach().clone().requires_grad_()
    (dD64,) = torch.autograd.grad(0.37 * torch.nn.functional.conv2d(x, D64, padding=1).square().sum(), (D64,))
    assert_close_scaled(dD, dD64, 1e-12, "dD against autograd of sum z^2")


def test_gradcheck_r_to_D_float64(op):
    x, M, c, D = _inputs(1, 2, 3, 2, 5, 4, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda D: op(x, M, c, D, 1, True)[1], (D.requires_grad_(),))


def test_torch_compile_fullgraph(op):
    x, M, c, D = _inputs(1, 2, 3, 2, 6, 6, 3, torch.float64)

    def step(x, M, c, D):
        y, r, _S = op(x, M, c, D, 1, True)
        return y.square().sum() + 0.1 * r

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    M.requires_grad_(); D.requires_grad_()
    gc = torch.autograd.grad(compiled(x, M, c, D), (M, D))
    ge = torch.autograd.grad(step(x, M, c, D), (M, D))
    for a, b, name in zip(gc, ge, ("dM", "dD")):
        assert_close_scaled(a, b, 1e-12, name)


def test_bad_input_names_the_argument(op):
    x, M, c, D = _inputs(1, 2, 3, 2, 5, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="D must have shape"):
        op(x, M, c, D[:, :, :1, :1], 1, True)
    with pytest.raises(TypeError, match="M must have the dtype of x"):
        op(x, M.double(), c, D, 1, True)
    with pytest.raises(ValueError, match="dy must have shape"):
        triton_rc.backward_op()(x[:, :, :1], x, M, 1, [True, True, True])
    with pytest.raises(ValueError, match="output_mask must have 3 entries"):
        triton_rc.backward_op()(torch.zeros(1, 3, 5, 5, device=DEVICE), x, M, 1, [True, True, True, True])
