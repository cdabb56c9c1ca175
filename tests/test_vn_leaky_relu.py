"""vn_leaky_relu: native (CPU/CUDA) and Triton ops against the float64 pure-PyTorch reference.

The Triton cases run on a GPU, or on CPU tensors in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 on machines without one); the interpreter runs every program in numpy, so its
shapes are kept small.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relaxeq_fast
from relaxeq_fast import functional, random_rotation
from relaxeq_fast.backend import triton_available
from relaxeq_fast.reference import vn_leaky_relu_ref

from testing import (CUDA_SKIP_REASON, DEVICES, RecordOps, assert_close_scaled, contiguous64, has_cuda, layouts,
                     num_threads, with_layout)

_native_built = relaxeq_fast.build_info()["extension_loaded"]
needs_native = pytest.mark.skipif(not _native_built, reason="relaxeq_fast._C is not built")
_triton_runs = triton_available() and (has_cuda() or os.environ.get("TRITON_INTERPRET", "0") == "1")
needs_triton = pytest.mark.skipif(
    not _triton_runs, reason="Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
    "(the interpreter runs the kernels on CPU tensors)" + ("" if triton_available() else "; triton is not installed"))
TRITON_DEVICE = "cuda" if has_cuda() else "cpu"

SLOPE, EPS = 0.2, 1e-6


def _native_op():
    return torch.ops.relaxeq.vn_leaky_relu


def _native_backward_op():
    return torch.ops.relaxeq.vn_leaky_relu_backward


def _triton_module():
    from relaxeq_fast.triton_kernels import vn_leaky_relu as triton_vn
    return triton_vn


# (backend, device) pairs; the op under test is looked up lazily so collection never imports triton.
def _native_param(device):
    # tests/testing.DEVICES: "cpu", and a "cuda" param that skips itself with a reason where no GPU is visible.
    if isinstance(device, str):
        return pytest.param("native", device, marks=needs_native, id=f"native-{device}")
    (name,) = device.values
    return pytest.param("native", name, marks=[needs_native, *device.marks], id=f"native-{name}")


BACKENDS = [_native_param(dev) for dev in DEVICES] + [
    pytest.param("triton", TRITON_DEVICE, marks=needs_triton, id=f"triton-{TRITON_DEVICE}"),
]


def get_op(backend):
    return _native_op() if backend == "native" else _triton_module().op()


def get_backward_op(backend):
    return _native_backward_op() if backend == "native" else _triton_module().backward_op()


# rtol relative to max(1, largest reference entry) (see assert_close_scaled).
DTYPES = [
    # A handful of flops per entry (dot, |d|^2, one division, one fma per component): a few ulps of
    # float32 (6e-8) times the conditioning of dot / (|d|^2 + eps) for random inputs; gradients chain
    # two such terms (gd, dot) and grad_d for a shared d sums up to 33 channels.
    pytest.param(torch.float32, 1e-5, 5e-5, id="float32"),
    # Same arithmetic in float64: round-off only.
    pytest.param(torch.float64, 1e-12, 1e-12, id="float64"),
]
# Half types (GPU only; fp32 math inside, output rounded once): 2^-11 / 2^-8 relative, gradients of
# a shared d sum many rounded terms.
HALF_DTYPES = [
    pytest.param(torch.float16, 2e-3, 1e-2, id="float16"),
    pytest.param(torch.bfloat16, 2e-2, 5e-2, id="bfloat16"),
]

NS = [0, 1, 7, 300]
CS = [1, 5, 33]
# The interpreter executes programs one by one in numpy: fewer rows, same channel counts (C = 33 is
# wider than one interpreter channel block, so the in-kernel channel loop runs).
TRITON_NS = [0, 1, 7, 37]


def make_inputs(n, c, shared, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, 3, generator=g, dtype=torch.float64)
    d = torch.randn(n, 1 if shared else c, 3, generator=g, dtype=torch.float64)
    return x.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype)


def ref64(x, d, slope=SLOPE, eps=EPS):
    return vn_leaky_relu_ref(x.detach().double(), d.detach().double(), slope, eps)


def ref_grads64(x, d, grad_out, slope=SLOPE, eps=EPS):
    x64, d64 = (t.detach().double().requires_grad_() for t in (x, d))
    out = vn_leaky_relu_ref(x64, d64, slope, eps)
    return torch.autograd.grad(out, (x64, d64), grad_out.detach().double())


def _cases(ns):
    return [(n, c, shared) for n in ns for c in CS for shared in (False, True)]


def _case_id(case):
    n, c, shared = case
    return f"N{n}-C{c}-{'shared' if shared else 'perchannel'}"


def _params(backend_filter):
    """(backend, device, n, c, shared), with the interpreter's smaller N for Triton."""
    out = []
    for bp in BACKENDS:
        backend, device = bp.values
        if backend not in backend_filter:
            continue
        for case in _cases(TRITON_NS if backend == "triton" else NS):
            out.append(pytest.param(backend, device, *case, marks=bp.marks, id=f"{bp.id}-{_case_id(case)}"))
    return out


ALL_CASES = _params(("native", "triton"))


@pytest.mark.parametrize("dtype, tol, _gtol", DTYPES)
@pytest.mark.parametrize("backend, device, n, c, shared", ALL_CASES)
def test_forward_matches_reference(backend, device, n, c, shared, dtype, tol, _gtol):
    x, d = make_inputs(n, c, shared, dtype, device)
    out = get_op(backend)(x, d, SLOPE, EPS)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    assert_close_scaled(out, ref64(x, d), tol, "out")


@pytest.mark.parametrize("dtype, _tol, gtol", DTYPES)
@pytest.mark.parametrize("backend, device, n, c, shared", ALL_CASES)
def test_backward_matches_reference(backend, device, n, c, shared, dtype, _tol, gtol):
    x, d = make_inputs(n, c, shared, dtype, device, seed=1)
    x.requires_grad_()
    d.requires_grad_()
    out = get_op(backend)(x, d, SLOPE, EPS)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_out = grad_out.to(device=device, dtype=dtype)
    gx, gd = torch.autograd.grad(out, (x, d), grad_out)
    gx_ref, gd_ref = ref_grads64(x, d, grad_out)
    assert gx.dtype == dtype and gd.dtype == dtype and gd.shape == d.shape
    assert_close_scaled(gx, gx_ref, gtol, "grad_x")
    assert_close_scaled(gd, gd_ref, gtol, "grad_d")


# Non-default (negative_slope, eps): every case above runs at 0.2 / 1e-6, which a kernel hard-coding
# them would pass. Each case changes at least one of the two. 1.0 is not a case: it is rejected
# (negative_slope must be < 1; at 1 the op is the identity and cannot tell a wrong slope apart).
# 0.0 is the plain VN-ReLU (pure projection), 0.9 nearly the identity.
NONDEFAULT_SLOPE_EPS = [
    pytest.param(0.0, 1e-3, id="slope0-eps1e-3"),
    pytest.param(0.37, 0.25, id="slope0.37-eps0.25"),
    pytest.param(0.9, 1e-6, id="slope0.9-eps1e-6"),
]


def make_eps_sensitive_inputs(n, c, shared, eps, dtype, device, seed):
    """Like make_inputs, but every other row's d is scaled to |d|^2 ~ 3 eps, so eps is a quarter of
    the projection's denominator there and a wrong eps moves the result far beyond any tolerance."""
    x, d = make_inputs(n, c, shared, torch.float64, "cpu", seed=seed)
    scale = torch.where(torch.arange(n) % 2 == 1, eps ** 0.5, 1.0).to(torch.float64)
    d = d * scale.view(n, 1, 1)
    return x.to(device=device, dtype=dtype), d.to(device=device, dtype=dtype)


@pytest.mark.parametrize("dtype, tol, gtol", DTYPES)
@pytest.mark.parametrize("slope, eps", NONDEFAULT_SLOPE_EPS)
@pytest.mark.parametrize("shared", [False, True], ids=["perchannel", "shared"])
@pytest.mark.parametrize("backend, device", [pytest.param(*bp.values, marks=bp.marks, id=bp.id) for bp in BACKENDS])
def test_nondefault_slope_and_eps_match_reference(backend, device, shared, slope, eps, dtype, tol, gtol):
    n = 37 if backend == "triton" else 300  # the interpreter is slow; C = 33 still loops over channel blocks
    x, d = make_eps_sensitive_inputs(n, 33, shared, eps, dtype, device, seed=20)
    # The check can fail: on these inputs the default slope, or another eps, gives a far-off result.
    want = ref64(x, d, slope, eps)
    other_eps = 1e-5 if eps == EPS else EPS
    assert (want - ref64(x, d, SLOPE, eps)).abs().max() > 1e-2, "slope does not matter on these inputs"
    assert (want - ref64(x, d, slope, other_eps)).abs().max() > 1e-2, "eps does not matter on these inputs"
    x.requires_grad_()
    d.requires_grad_()
    out = get_op(backend)(x, d, slope, eps)
    assert_close_scaled(out, want, tol, "out")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(21), dtype=torch.float64)
    grad_out = grad_out.to(device=device, dtype=dtype)
    gx, gd = torch.autograd.grad(out, (x, d), grad_out)
    gx_ref, gd_ref = ref_grads64(x, d, grad_out, slope, eps)
    assert_close_scaled(gx, gx_ref, gtol, "grad_x")
    assert_close_scaled(gd, gd_ref, gtol, "grad_d")
    # and the public function hands both scalars through unchanged
    outf = functional.vn_leaky_relu(x.detach(), d.detach(), slope, eps, backend=backend)
    assert torch.equal(outf, out.detach()), "functional.vn_leaky_relu must pass negative_slope and eps to the op"


@pytest.mark.skipif(not has_cuda(), reason="float16/bfloat16 kernels are GPU-only; " + CUDA_SKIP_REASON)
@pytest.mark.parametrize("dtype, tol, gtol", HALF_DTYPES)
@pytest.mark.parametrize("backend", [pytest.param("native", marks=needs_native), pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shared", [False, True])
def test_half_precision_cuda(backend, dtype, tol, gtol, shared):
    if backend == "native" and not relaxeq_fast.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    x, d = make_inputs(300, 33, shared, dtype, "cuda", seed=3)
    x.requires_grad_()
    d.requires_grad_()
    out = get_op(backend)(x, d, SLOPE, EPS)
    assert_close_scaled(out, ref64(x, d), tol, "out (reference on the rounded inputs)")
    grad_out = torch.randn_like(out)
    gx, gd = torch.autograd.grad(out, (x, d), grad_out)
    gx_ref, gd_ref = ref_grads64(x, d, grad_out)
    assert_close_scaled(gx, gx_ref, gtol, "grad_x")
    assert_close_scaled(gd, gd_ref, gtol, "grad_d")


BACKEND_ONLY = [pytest.param(*bp.values, marks=bp.marks, id=bp.id) for bp in BACKENDS]


def _grads(backend, x, d, grad_out, slope=SLOPE, eps=EPS):
    x = x.detach().clone().requires_grad_()
    d = d.detach().clone().requires_grad_()
    out = get_op(backend)(x, d, slope, eps)
    gx, gd = torch.autograd.grad(out, (x, d), grad_out)
    return out, gx, gd


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_direction_and_eps_path(backend, device, dtype):
    # d = 0 exactly: <x, d> = 0 keeps x; the outputs and gradients must stay finite. Tiny d with
    # <x, d> < 0: |d|^2 << eps, so eps (not |d|^2) sets the projection's size.
    x, _ = make_inputs(7, 5, False, dtype, device, seed=4)
    tiny = -1e-6 * x  # antiparallel to x: <x, d> < 0 for every vector
    for name, d in (("d = 0", torch.zeros_like(x)), ("d = 0 shared", torch.zeros(7, 1, 3, dtype=dtype, device=device)),
                    ("tiny d", tiny)):
        grad_out = torch.ones_like(x)
        out, gx, gd = _grads(backend, x, d, grad_out)
        for t in (out, gx, gd):
            assert torch.isfinite(t).all(), f"{name}: non-finite output"
        assert_close_scaled(out, ref64(x, d), 1e-6, f"out ({name})")
        gx_ref, gd_ref = ref_grads64(x, d, grad_out)
        assert_close_scaled(gx, gx_ref, 1e-6, f"grad_x ({name})")
        assert_close_scaled(gd, gd_ref, 1e-6, f"grad_d ({name})")
    out = get_op(backend)(x, torch.zeros_like(x), SLOPE, EPS)
    assert torch.equal(out, x), "d = 0 must keep x unchanged"


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
def test_zero_input(backend, device):
    x = torch.zeros(5, 4, 3, dtype=torch.float64, device=device)
    _, d = make_inputs(5, 4, False, torch.float64, device, seed=5)
    grad_out = torch.randn_like(x)
    out, gx, gd = _grads(backend, x, d, grad_out)
    assert torch.equal(out, x)
    # x = 0 sits on the dot = 0 boundary: the identity branch, so grad_x = grad_out and grad_d = 0.
    assert torch.equal(gx, grad_out)
    assert torch.equal(gd, torch.zeros_like(d))


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("shared", [False, True])
def test_dot_exactly_zero_keeps_x(backend, device, shared):
    # d along the axes, x with zero components there: <x, d> is exactly 0 in floating point. The
    # forward is the same on both branches (k = 0); the backward tells them apart: dot >= 0 is the
    # identity branch (grad_d = 0), the projected one would give grad_d = -(b/s) <g, d> x != 0.
    g = torch.Generator().manual_seed(6)
    c = 4
    x = torch.randn(3, c, 3, generator=g, dtype=torch.float64)
    x[..., 0] = 0.0
    d = torch.zeros(3, 1 if shared else c, 3, dtype=torch.float64)
    d[..., 0] = torch.rand(d.shape[:-1], generator=g, dtype=torch.float64) + 0.5
    x, d = x.to(device), d.to(device)
    assert ((x * d).sum(-1) == 0).all()
    grad_out = torch.randn(x.shape, generator=g, dtype=torch.float64).to(device)
    out, gx, gd = _grads(backend, x, d, grad_out)
    assert torch.equal(out, x)
    assert torch.equal(gx, grad_out)
    assert torch.equal(gd, torch.zeros_like(d))
    gx_ref, gd_ref = ref_grads64(x, d, grad_out)
    assert_close_scaled(gd, gd_ref, 1e-15, "grad_d (reference: torch.where keeps x at dot = 0)")


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("shared", [False, True])
def test_non_contiguous_inputs(backend, device, shared):
    g = torch.Generator().manual_seed(7)
    n, c = 6, 5
    x = torch.randn(n, 3, c, generator=g, dtype=torch.float64).to(device).transpose(1, 2)  # [n, c, 3], xyz strided
    d = torch.randn(n, 2 * (1 if shared else c), 3, generator=g, dtype=torch.float64).to(device)[:, ::2]
    assert not x.is_contiguous() and (shared or not d.is_contiguous())
    grad_out = torch.randn(n, c, 3, generator=g, dtype=torch.float64).to(device)
    out, gx, gd = _grads(backend, x, d, grad_out)
    assert_close_scaled(out, ref64(x, d), 1e-12, "out")
    gx_ref, gd_ref = ref_grads64(x, d, grad_out)
    assert_close_scaled(gx, gx_ref, 1e-12, "grad_x")
    assert_close_scaled(gd, gd_ref, 1e-12, "grad_d")
    # and through the functional layer, with leading batch dims [2, 3, c, 3]
    xf = torch.randn(2, 3, 3, c, generator=g, dtype=torch.float64).to(device).transpose(-1, -2)
    df = torch.randn(2, 3, 1 if shared else c, 3, generator=g, dtype=torch.float64).to(device)
    outf = functional.vn_leaky_relu(xf, df, SLOPE, EPS, backend=backend)
    assert outf.shape == xf.shape
    assert_close_scaled(outf, ref64(xf.reshape(6, c, 3), df.reshape(6, -1, 3)).reshape(xf.shape), 1e-12, "functional")


# Property test of the native CPU op (torch.ops.relaxeq.vn_leaky_relu and its backward op, checked to run):
# tiny shapes (N = 0 and 1 included, odd C), both dtypes (tolerances: DTYPES), shared or per-channel d,
# slopes and eps other than the defaults, and x, d and grad_out each in a drawn memory layout
# (testing.LAYOUTS: transposed xyz, permuted, NaN-gapped slices, broadcast along rows, channels or xyz --
# for a per-channel d, a broadcast along channels is a shared direction written out). Against the float64
# reference on contiguous copies; the backward op is also called directly with the strided grad_out
# (autograd hands the op a contiguous one).
@needs_native
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 5), c=st.integers(1, 9), shared=st.booleans(),
       dtype_tols=st.sampled_from([(p.values[0], p.values[1], p.values[2]) for p in DTYPES]),
       slope=st.sampled_from([0.0, 0.2, 0.37, 0.9]), eps=st.sampled_from([1e-6, 1e-2]),
       layout_x=layouts((0, 1, 2)), layout_d=layouts((0, 1, 2)), layout_g=layouts((0, 1, 2)),
       seed=st.integers(0, 2 ** 16))
def test_hypothesis_native_strided_inputs_match_reference(n, c, shared, dtype_tols, slope, eps, layout_x, layout_d,
                                                          layout_g, seed):
    dtype, tol, gtol = dtype_tols
    x, d = make_inputs(n, c, shared, dtype, "cpu", seed=seed)
    x, d = with_layout(x, *layout_x), with_layout(d, *layout_d)
    grad_out = torch.randn(n, c, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    grad_out = with_layout(grad_out.to(dtype), *layout_g)
    x.requires_grad_()
    d.requires_grad_()
    with RecordOps() as ops:
        out = _native_op()(x, d, slope, eps)
        gx, gd = torch.autograd.grad(out, (x, d), grad_out)
    assert "relaxeq.vn_leaky_relu" in ops.ops and "relaxeq.vn_leaky_relu_backward" in ops.ops, ops.ops
    x64, d64 = contiguous64(x).requires_grad_(), contiguous64(d).requires_grad_()
    want = vn_leaky_relu_ref(x64, d64, slope, eps)
    gx_ref, gd_ref = torch.autograd.grad(want, (x64, d64), contiguous64(grad_out))
    assert out.shape == x.shape and out.dtype == dtype
    assert_close_scaled(out, want, tol, "out")
    assert gx.shape == x.shape and gd.shape == d.shape, "gradients must have the inputs' shapes"
    assert_close_scaled(gx, gx_ref, gtol, "grad_x")
    assert_close_scaled(gd, gd_ref, gtol, "grad_d")
    gx2, gd2 = _native_backward_op()(grad_out, x.detach(), d.detach(), slope, eps, [True, True])
    assert_close_scaled(gx2, gx_ref, gtol, "grad_x (backward op, strided grad_out)")
    assert_close_scaled(gd2, gd_ref, gtol, "grad_d (backward op, strided grad_out)")


def _well_separated(n, c, shared, seed):
    """float64 inputs with |<x, d>| > 1e-3 everywhere, away from the kink of the branch switch."""
    x, d = make_inputs(n, c, shared, torch.float64, "cpu", seed=seed)
    dot = (x * d).sum(-1, keepdim=True)
    dd = d.expand_as(x)
    # Push x along ±d (the sign of its dot): |dot| grows by 0.5 |d|^2.
    x = x + 0.5 * torch.where(dot >= 0, 1.0, -1.0) * dd
    dot = (x * d).sum(-1)
    assert dot.abs().min() > 1e-3 and (dot < 0).any() and (dot > 0).any()
    return x, d


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("shared", [False, True])
def test_gradcheck_float64(backend, device, shared):
    # The interpreter pays per launch, and gradcheck launches once per perturbed input entry:
    # a smaller case there (still with several channels to sum over for a shared d).
    n, c = (2, 3) if backend == "triton" else (4, 5)
    x, d = _well_separated(n, c, shared, seed=8)
    inputs = (x.to(device).requires_grad_(), d.to(device).requires_grad_())
    op = get_op(backend)
    assert torch.autograd.gradcheck(lambda x, d: op(x, d, SLOPE, EPS), inputs)
    if backend == "native":
        # and the reference's own gradient agrees with finite differences on the same inputs
        assert torch.autograd.gradcheck(lambda x, d: vn_leaky_relu_ref(x, d, SLOPE, EPS), inputs)


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("mask", [[True, True], [True, False], [False, True], [False, False]],
                         ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("shared", [False, True])
def test_backward_op_output_mask(backend, device, mask, shared):
    x, d = make_inputs(7, 5, shared, torch.float64, device, seed=9)
    grad_out = torch.randn_like(x)
    gx, gd = get_backward_op(backend)(grad_out, x, d, SLOPE, EPS, mask)
    gx_ref, gd_ref = ref_grads64(x, d, grad_out)
    for name, want, got, ref in (("grad_x", mask[0], gx, gx_ref), ("grad_d", mask[1], gd, gd_ref)):
        if want:
            assert_close_scaled(got, ref, 1e-12, name)
        else:
            assert got.shape == (0,), f"{name} not requested: expected an empty [0] tensor, got {tuple(got.shape)}"


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("shared", [False, True])
def test_opcheck(backend, device, shared):
    x, d = _well_separated(5, 4, shared, seed=10)
    x, d = x.to(device).requires_grad_(), d.to(device).requires_grad_()
    torch.library.opcheck(get_op(backend), (x, d, SLOPE, EPS))
    grad_out = torch.randn_like(x)
    for mask in ([True, True], [False, True]):
        torch.library.opcheck(get_backward_op(backend), (grad_out, x.detach(), d.detach(), SLOPE, EPS, mask))


@pytest.mark.parametrize("backend, device", BACKEND_ONLY)
@pytest.mark.parametrize("shared", [False, True])
def test_equivariance(backend, device, shared):
    # out(x Rᵀ, d Rᵀ) = out(x, d) Rᵀ: <x, d> and |d|^2 are invariant, the rest is linear in x and d.
    x, d = make_inputs(7, 5, shared, torch.float64, device, seed=11)
    R = random_rotation(generator=torch.Generator().manual_seed(12)).to(device)
    op = get_op(backend)
    rotated_in = op(x @ R.T, d @ R.T, SLOPE, EPS)
    rotated_out = op(x, d, SLOPE, EPS) @ R.T
    assert_close_scaled(rotated_in, rotated_out, 1e-12, "equivariance defect")


def test_functional_routes_to_each_backend():
    x, d = make_inputs(2 * 3, 4, True, torch.float64, "cpu", seed=13)
    x, d = x.reshape(2, 3, 4, 3), d.reshape(2, 3, 1, 3)
    want = ref64(x.reshape(6, 4, 3), d.reshape(6, 1, 3)).reshape(x.shape)
    backends = ["reference"] + (["native"] if _native_built else []) + (["triton"] if _triton_runs and not has_cuda()
                                                                          else [])
    for backend in backends:
        got = functional.vn_leaky_relu(x, d, SLOPE, EPS, backend=backend)
        assert got.shape == x.shape
        assert_close_scaled(got, want, 1e-12, f"functional ({backend})")
    if _native_built:
        # "auto" on CPU picks the native op.
        out = functional.vn_leaky_relu(x, d, SLOPE, EPS)
        assert_close_scaled(out, want, 1e-12, "functional (auto)")


@needs_native
def test_meta_tensors_use_the_fake_kernel():
    x, d = torch.empty(11, 6, 3, device="meta"), torch.empty(11, 1, 3, device="meta")
    out = torch.ops.relaxeq.vn_leaky_relu(x, d, SLOPE, EPS)
    assert out.shape == (11, 6, 3) and out.device.type == "meta"
    gx, gd = torch.ops.relaxeq.vn_leaky_relu_backward(out, x, d, SLOPE, EPS, [True, True])
    assert gx.shape == (11, 6, 3) and gd.shape == (11, 1, 3)


@needs_native
def test_cuda_kernels_registered_when_built():
    if not relaxeq_fast.build_info()["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    for name in ("relaxeq::vn_leaky_relu", "relaxeq::vn_leaky_relu_backward"):
        table = torch._C._dispatch_dump(name)
        assert "CUDA" in table and "CPU" in table, table


@needs_native
def test_torch_compile_fullgraph_functional():
    # Inductor on CPU: the op stays opaque (fake kernel for shapes, registered autograd formula).
    x, d = make_inputs(9, 5, False, torch.float32, "cpu", seed=14)

    def step(x, d):
        h = functional.vn_leaky_relu(x * 2.0, d, SLOPE, EPS, backend="native")
        return h.square().sum()

    d.requires_grad_()
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(x, d)
    (gc,) = torch.autograd.grad(loss_c, d)
    loss_e = step(x, d)
    (ge,) = torch.autograd.grad(loss_e, d)
    assert_close_scaled(loss_c, loss_e, 1e-6, "loss")
    assert_close_scaled(gc, ge, 1e-5, "grad_d")


@needs_triton
def test_torch_compile_triton_op():
    # aot_eager: fake kernels and the autograd formula under tracing, without an inductor compile.
    op = get_op("triton")
    x, d = make_inputs(6, 5, True, torch.float64, TRITON_DEVICE, seed=15)
    d.requires_grad_()

    def f(x, d):
        return op(x, d, SLOPE, EPS).square().sum()

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, d)
    (gd,) = torch.autograd.grad(out, d)
    dr = d.detach().clone().requires_grad_()
    (gdr,) = torch.autograd.grad(vn_leaky_relu_ref(x, dr, SLOPE, EPS).square().sum(), dr)
    assert_close_scaled(gd, gdr, 1e-10, "compiled grad_d")


def _bad(x_shape=(4, 5, 3), d_shape=(4, 5, 3), d_dtype=torch.float32, slope=SLOPE, eps=EPS):
    return torch.randn(x_shape), torch.randn(d_shape, dtype=d_dtype), slope, eps


BAD_INPUTS = [
    ("wrong_last_dim_x", _bad(x_shape=(4, 5, 2), d_shape=(4, 5, 2)), "x must have shape"),
    ("wrong_last_dim_d", _bad(d_shape=(4, 5, 4)), "d must have shape"),
    ("d_channels", _bad(d_shape=(4, 3, 3)), "d must have shape"),
    ("d_rows", _bad(d_shape=(2, 5, 3)), "d must have shape"),
    ("dtype_mismatch", _bad(d_dtype=torch.float64), "d must have the dtype"),
    ("slope_negative", _bad(slope=-0.1), "negative_slope must be in [0, 1)"),
    ("slope_one", _bad(slope=1.0), "negative_slope must be in [0, 1)"),
    ("eps_zero", _bad(eps=0.0), "eps must be positive"),
]


@pytest.mark.parametrize("backend", ["functional", pytest.param("native", marks=needs_native),
                                     pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case, args, message", BAD_INPUTS, ids=[c for c, _, _ in BAD_INPUTS])
def test_bad_input_names_the_argument(backend, case, args, message):
    x, d, slope, eps = args
    if backend == "triton":
        x, d = x.to(TRITON_DEVICE), d.to(TRITON_DEVICE)
    if backend == "functional":
        call = lambda: functional.vn_leaky_relu(x, d, slope, eps)  # noqa: E731
    else:
        call = lambda: get_op(backend)(x, d, slope, eps)  # noqa: E731
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call()
    assert message in str(info.value), str(info.value)


@needs_native
def test_bad_input_native_specific():
    x, d = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of x"):
        torch.ops.relaxeq.vn_leaky_relu_backward(torch.randn(4, 5, 2), x, d, SLOPE, EPS, [True, True])
    with pytest.raises(RuntimeError, match="x must be float32 or float64 on CPU"):
        torch.ops.relaxeq.vn_leaky_relu(x.half(), d.half(), SLOPE, EPS)
    with pytest.raises((RuntimeError, ValueError), match="d must be on the device of x"):
        torch.ops.relaxeq.vn_leaky_relu(x, d.to("meta"), SLOPE, EPS)
    with pytest.raises(ValueError, match=r"d must have shape \[..., C, 3\] or \[..., 1, 3\]"):
        functional.vn_leaky_relu(torch.randn(2, 4, 5, 3), torch.randn(3, 4, 5, 3))


@needs_native
def test_threads_do_not_change_results():
    x, d = make_inputs(3000, 33, True, torch.float64, "cpu", seed=16)
    grad_out = torch.randn_like(x)
    results = {}
    for n in (1, 2):
        with num_threads(n):
            results[n] = (_native_op()(x, d, SLOPE, EPS),
                          *_native_backward_op()(grad_out, x, d, SLOPE, EPS, [True, True]))
    for a, b in zip(results[1], results[2]):
        assert torch.equal(a, b), "rows are independent: results must be bitwise identical"
    assert math.isfinite(results[1][0].sum().item())
