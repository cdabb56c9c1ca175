"""relaxed_conv2d op (native CPU/CUDA kernels) against the float64 pure-PyTorch reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relaxeq_fast
from relaxeq_fast import use_backend
from relaxeq_fast.functional import relaxed_conv2d
from relaxeq_fast.reference import relaxed_conv2d_ref

from testing import (DEVICES, RecordOps, assert_close_scaled, contiguous64, conv2d_im2col_ref, has_cuda, layouts,
                     num_threads, record_need_S, with_layout)

pytestmark = pytest.mark.skipif(not relaxeq_fast.build_info()["extension_loaded"],
                                reason="relaxeq_fast._C is not built")

# rtol relative to the largest reference entry, applied once: max|err| <= tol * max(1, max|ref|) (see
# assert_close_scaled; never multiply these by the reference again). For r (a sum of squares, >> 1 here)
# that is a relative tolerance on r itself.
# float32: y sums C_in k^2 products (<= 200 here): ~sqrt(K) * 6e-8 plus the convolution's own blocking
# order -> 1e-5. r and the weight gradients sum over every output pixel of the batch (up to ~3000 terms
# of squares, all positive for r) -> 5e-5. float64: round-off only.
# S (the weight gradient of z) sums over every output pixel of the batch like the weight gradients.
TOLS = {
    torch.float32: {"y": 1e-5, "r": 5e-5, "S": 5e-5, "grad": 5e-5},
    torch.float64: {"y": 1e-12, "r": 1e-11, "S": 1e-11, "grad": 1e-11},
}
# (B, C_in, C_out, C_d, H, W, k, padding): B = 1, C_in = 1, k = 1/3/5, padding 0 and k // 2, H != W,
# C_d != C_out, C_d = 0 via D = None in the separate tests.
SHAPES = [
    (1, 1, 1, 1, 5, 5, 1, 0),
    (2, 3, 4, 5, 9, 7, 3, 1),
    (1, 2, 3, 2, 6, 11, 3, 0),
    (3, 4, 6, 3, 12, 10, 5, 2),
    (2, 1, 5, 7, 8, 9, 5, 0),
    (4, 6, 8, 8, 14, 14, 5, 2),
]


def make_inputs(b, c_in, c_out, c_d, h, w, k, dtype, device, bias=True, defect=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)

    x = rnd(b, c_in, h, w)
    M = rnd(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5)
    c = rnd(c_out) if bias else None
    D = rnd(c_d, c_in, k, k, scale=(c_in * k * k) ** -0.5) if defect else None
    return x, M, c, D


def ref64(x, M, c, D, padding):
    f64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return relaxed_conv2d_ref(f64(x), f64(M), f64(c), f64(D), padding)


def native(x, M, c, D, padding, need_S=True):
    return torch.ops.relaxeq.relaxed_conv2d(x, M, c, D, padding, need_S)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["c", "no_c"])
@pytest.mark.parametrize("defect", [True, False], ids=["D", "no_D"])
def test_forward_matches_reference(device, dtype, shape, bias, defect):
    *dims, padding = shape
    x, M, c, D = make_inputs(*dims, dtype, device, bias, defect)
    y, r, S = native(x, M, c, D, padding)
    y_ref, r_ref, S_ref = ref64(x, M, c, D, padding)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and r.dtype == sdt and S.dtype == sdt
    assert y.is_contiguous()
    assert_close_scaled(y, y_ref, TOLS[dtype]["y"], "y")
    if defect:
        assert r.shape == ()
        assert_close_scaled(r, r_ref, TOLS[dtype]["r"], "r")
        assert S.shape == D.shape
        assert_close_scaled(S, S_ref, TOLS[dtype]["S"], "S")
    else:
        assert r.shape == (0,) and S.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_backward_matches_reference(device, dtype, shape):
    *dims, padding = shape
    x, M, c, D = make_inputs(*dims, dtype, device)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    y, r, _ = native(*leaves, padding)
    dy = torch.randn_like(y)
    w = 0.7  # dr: the regulariser's weight in the loss
    grads = torch.autograd.grad((y * dy).sum() + w * r, leaves)
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    y64, r64, _ = relaxed_conv2d_ref(*leaves64, padding)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum() + w * r64, leaves64)
    for name, g, g64 in zip(("dx", "dM", "dc", "dD"), grads, grads64):
        assert_close_scaled(g, g64, TOLS[dtype]["grad"], name)


@pytest.fixture
def no_tf32():
    """cuDNN in full fp32 for the reference backend's F.conv2d on a GPU (torch's default allows TF32)."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = old


def test_im2col_reference_is_right():
    # The im2col reference itself: y and S against torch's convolution, and its hand-written gradients
    # against autograd through its own einsum forward (no convolution routine involved).
    x, M, c, D = make_inputs(2, 3, 4, 5, 9, 7, 3, torch.float64, "cpu")
    dy = torch.randn(2, 4, 9, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = conv2d_im2col_ref(x, M, c, D, 1, dy, 0.7)
    y_ref, r_ref, S_ref = relaxed_conv2d_ref(x, M, c, D, 1)
    for name, ref in (("y", y_ref), ("r", r_ref), ("S", S_ref)):
        assert_close_scaled(want[name], ref, 1e-12, name)
    # Autograd through an einsum forward built from the same kind of slices (pad, stack, einsum).
    leaves = tuple(t.clone().requires_grad_() for t in (x, M, c))
    xg, Mg, cg = leaves
    k, p = 3, 1
    xp = torch.nn.functional.pad(xg, (p, p, p, p))
    patches = torch.stack([torch.stack([xp[:, :, i:i + 9, j:j + 7] for j in range(k)], 2) for i in range(k)], 2)
    y = torch.einsum("bcijhw,ocij->bohw", patches, Mg) + cg.view(1, -1, 1, 1)
    for name, g in zip(("dx", "dM", "dc"), torch.autograd.grad((y * dy).sum(), leaves)):
        assert_close_scaled(want[name], g, 1e-12, name)
    assert_close_scaled(want["dD"], 2 * 0.7 * S_ref, 1e-12, "dD")


# Gradients against the float64 im2col reference (testing.conv2d_im2col_ref): the native backward and
# S (at::convolution_backward) and relaxed_conv2d_ref's autograd (F.conv2d) all run torch's convolution
# routines, so comparing them with each other cannot see a fault there. Tolerances: TOLS, as above.
@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_im2col_reference(no_tf32, backend, device, dtype, shape):
    *dims, padding = shape
    x, M, c, D = make_inputs(*dims, dtype, device, seed=3)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    fn = native if backend == "native" else relaxed_conv2d_ref
    y, r, S = fn(*leaves, padding, True)
    dy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).to(device, dtype)
    dr = 0.7
    grads = torch.autograd.grad((y * dy).sum() + dr * r, leaves)
    want = conv2d_im2col_ref(x, M, c, D, padding, dy, dr)
    for name, got in (("y", y), ("r", r), ("S", S)):
        assert_close_scaled(got, want[name], TOLS[dtype][name], name)
    for name, got in zip(("dx", "dM", "dc", "dD"), grads):
        assert_close_scaled(got, want[name], TOLS[dtype]["grad"], name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("defect", [True, False], ids=["D", "no_D"])
def test_need_S_false_skips_only_S(device, dtype, shape, defect):
    # Skipping S must leave the y and r computation alone: exactly the same values.
    *dims, padding = shape
    x, M, c, D = make_inputs(*dims, dtype, device, defect=defect)
    y, r, S = native(x, M, c, D, padding, True)
    y0, r0, S0 = native(x, M, c, D, padding, False)
    assert torch.equal(y0, y) and torch.equal(r0, r)
    assert S0.shape == (0,) and S0.dtype == S.dtype


def test_D_gradient_without_S_raises():
    x, M, c, D = make_inputs(2, 3, 4, 5, 7, 6, 3, torch.float64, "cpu")
    _, r, _ = native(x, M, c, D.requires_grad_(), 1, False)
    with pytest.raises(RuntimeError, match="need_S=False"):
        torch.autograd.grad(r, (D,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_asks_for_S_only_when_D_needs_a_gradient(monkeypatch, device, dtype):
    seen = record_need_S(monkeypatch)
    x, M, c, D = make_inputs(2, 3, 4, 5, 9, 7, 3, dtype, device)
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    y64, r64, _ = ref64(x, M, c, D, 1)
    with torch.no_grad():
        y, r = relaxed_conv2d(*leaves, 1, backend="native")
    assert seen == [False]
    assert_close_scaled(y, y64, TOLS[dtype]["y"], "y (no_grad)")
    assert_close_scaled(r, r64, TOLS[dtype]["r"], "r (no_grad)")
    dy = torch.randn_like(y)
    leaves64 = tuple(t.detach().double().requires_grad_() for t in leaves)
    y64, r64, _ = relaxed_conv2d_ref(*leaves64, 1)
    grads64 = torch.autograd.grad((y64 * dy.double()).sum() + 0.7 * r64, leaves64)
    y, r = relaxed_conv2d(*leaves, 1, backend="native")
    assert seen == [False, True]
    grads = torch.autograd.grad((y * dy).sum() + 0.7 * r, leaves)
    for name, g, g64 in zip(("dx", "dM", "dc", "dD"), grads, grads64):
        assert_close_scaled(g, g64, TOLS[dtype]["grad"], name)
    # D without a gradient: no S, and the gradients of y still flow.
    y, r = relaxed_conv2d(*leaves[:3], D.detach(), 1, backend="native")
    assert seen == [False, True, False]
    grads = torch.autograd.grad((y * dy).sum() + 0.7 * r, leaves[:3])
    for name, g, g64 in zip(("dx", "dM", "dc"), grads, grads64):
        assert_close_scaled(g, g64, TOLS[dtype]["grad"], name + " (D detached)")


def test_r_gradient_reaches_D_only():
    x, M, c, D = make_inputs(2, 3, 4, 5, 7, 6, 3, torch.float64, "cpu")
    leaves = tuple(t.requires_grad_() for t in (x, M, c, D))
    _, r, _ = native(*leaves, 1)
    dx, dM, dc, dD = torch.autograd.grad(r, leaves, allow_unused=True, materialize_grads=True)
    assert dx.abs().max() == 0 and dM.abs().max() == 0 and dc.abs().max() == 0
    assert dD.abs().max() > 0


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, True), (False, False, False)])
def test_backward_op_output_mask(mask):
    x, M, _, _ = make_inputs(2, 3, 4, 5, 8, 7, 3, torch.float64, "cpu")
    dy = torch.randn(2, 4, 8, 7, dtype=torch.float64)
    got = torch.ops.relaxeq.relaxed_conv2d_backward(dy, x, M, 1, list(mask))
    leaves = tuple(t.clone().requires_grad_() for t in (x, M, torch.zeros(4, dtype=torch.float64)))
    y, _, _ = relaxed_conv2d_ref(*leaves, None, 1)
    want = torch.autograd.grad((y * dy).sum(), leaves)
    for g, w, m in zip(got, want, mask):
        if m:
            assert_close_scaled(g, w, 1e-12)
        else:
            assert g.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padding", [0, 2])
def test_r_is_quadratic_in_D(device, dtype, padding):
    # r = <D, S> and the D gradient is 2 dr S, both against autograd of the pure-torch r = sum z^2.
    x, M, c, D = make_inputs(3, 4, 6, 5, 10, 9, 5, dtype, device)
    D.requires_grad_()
    _, r, S = native(x, M, c, D, padding)
    assert_close_scaled(r, (D.detach().to(S.dtype) * S).sum(), TOLS[dtype]["r"], "r = <D, S>")
    dr = 0.37
    (dD,) = torch.autograd.grad(dr * r, (D,))
    assert_close_scaled(dD, 2 * dr * S, 1e-12 if dtype == torch.float64 else 1e-6, "dD = 2 dr S")
    D64 = D.detach().double().requires_grad_()
    r64 = torch.nn.functional.conv2d(x.double(), D64, padding=padding).square().sum()
    (dD64,) = torch.autograd.grad(dr * r64, (D64,))
    assert_close_scaled(dD, dD64, TOLS[dtype]["grad"], "dD against autograd of sum z^2")
    assert_close_scaled(r, r64, TOLS[dtype]["r"], "r against sum z^2")


def test_reference_S_is_the_weight_gradient_of_z():
    # The reference's S (D P from the unfolded patches) against autograd of <z, z.detach()>.
    x, M, c, D = make_inputs(2, 3, 4, 5, 9, 7, 3, torch.float64, "cpu")
    _, r, S = relaxed_conv2d_ref(x, M, c, D, 1)
    Dg = D.clone().requires_grad_()
    z = torch.nn.functional.conv2d(x, Dg, padding=1)
    (S_auto,) = torch.autograd.grad((z * z.detach()).sum(), (Dg,))
    assert_close_scaled(S, S_auto, 1e-12, "S")
    assert_close_scaled(r, (D * S).sum(), 1e-12, "r = <D, S>")
    _, _, S_skip = relaxed_conv2d_ref(x, M, c, D, 1, need_S=False)
    assert S_skip.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = torch.randn(3, 5, 2 * 9, 8, dtype=torch.float64, device=device)
    x = base[:, :, ::2].transpose(2, 3)  # [3, 5, 8, 9], strided and transposed
    assert not x.is_contiguous()
    M = torch.randn(4, 5, 3, 3, dtype=torch.float64, device=device).transpose(2, 3)
    D = torch.randn(5, 6, 3, 3, dtype=torch.float64, device=device).transpose(0, 1)  # [6, 5, 3, 3] view
    c = torch.randn(8, dtype=torch.float64, device=device)[::2]
    with use_backend("native"):
        y, r = relaxed_conv2d(x, M, c, D, 1)
    y_ref, r_ref, S_ref = relaxed_conv2d_ref(x.contiguous(), M.contiguous(), c.contiguous(), D.contiguous(), 1)
    assert_close_scaled(y, y_ref, 1e-12, "y")
    assert_close_scaled(r, r_ref, 1e-12, "r")
    _, _, S = native(x, M, c, D, 1)
    assert_close_scaled(S, S_ref, 1e-12, "S")


# Property test: tiny random shapes (size 1, odd and even, k up to 4 with every padding that fits), both
# dtypes (tolerances: TOLS), with and without c and D, every input in a drawn memory layout (testing.LAYOUTS:
# transposed / permuted / NaN-gapped slices / broadcast along any dim, a broadcast x or M being a legal
# input with repeated values). The native op (torch.ops.relaxeq, the C++ CPU kernel; its backward op is
# checked to run) against the float64 im2col reference on contiguous copies; dy is strided too, and the
# backward op is also called directly with it (autograd hands the op a contiguous dy).
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 4), c_in=st.integers(1, 5), c_out=st.integers(1, 5), c_d=st.integers(1, 4),
       h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(1, 4), padding=st.integers(0, 2),
       dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(), defect=st.booleans(),
       layout_x=layouts((0, 1, 2, 3)), layout_M=layouts((0, 1, 2, 3)), layout_c=layouts(),
       layout_D=layouts((0, 1, 2, 3)), layout_dy=layouts((0, 1, 2, 3)), seed=st.integers(0, 2 ** 16))
def test_hypothesis_strided_inputs_match_im2col_reference(b, c_in, c_out, c_d, h, w, k, padding, dtype, bias, defect,
                                                          layout_x, layout_M, layout_c, layout_D, layout_dy, seed):
    h, w = max(h, k - 2 * padding), max(w, k - 2 * padding)  # the kernel must fit
    x, M, c, D = make_inputs(b, c_in, c_out, c_d, h, w, k, dtype, "cpu", bias, defect, seed)
    x, M = with_layout(x, *layout_x), with_layout(M, *layout_M)
    c = None if c is None else with_layout(c, *layout_c)
    D = None if D is None else with_layout(D, *layout_D)
    leaves = [t.requires_grad_() for t in (x, M, c, D) if t is not None]
    ho, wo = h + 2 * padding - k + 1, w + 2 * padding - k + 1
    dy = torch.randn(b, c_out, ho, wo, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    dy = with_layout(dy.to(dtype), *layout_dy)
    dr = 0.7
    with RecordOps() as ops:
        y, r, S = native(x, M, c, D, padding)
        loss = (y * dy).sum() + (dr * r if defect else 0)
        grads = torch.autograd.grad(loss, leaves)
    assert "relaxeq.relaxed_conv2d" in ops.ops and "relaxeq.relaxed_conv2d_backward" in ops.ops, ops.ops
    want = conv2d_im2col_ref(*map(contiguous64, (x, M, c, D)), padding, contiguous64(dy), dr)
    assert_close_scaled(y, want["y"], TOLS[dtype]["y"], "y")
    if defect:
        assert_close_scaled(r, want["r"], TOLS[dtype]["r"], "r")
        assert_close_scaled(S, want["S"], TOLS[dtype]["S"], "S")
    names = ["dx", "dM"] + (["dc"] if bias else []) + (["dD"] if defect else [])
    for name, leaf, g in zip(names, leaves, grads):
        assert g.shape == leaf.shape, f"{name}: shape {tuple(g.shape)} != the input's {tuple(leaf.shape)}"
        assert_close_scaled(g, want[name], TOLS[dtype]["grad"], name)
    # the backward op itself on the strided dy (and strided x, M)
    direct = torch.ops.relaxeq.relaxed_conv2d_backward(dy, x.detach(), M.detach(), padding, [True, True, True])
    for name, g in zip(("dx", "dM", "dc"), direct):
        assert_close_scaled(g, want[name], TOLS[dtype]["grad"], f"{name} (backward op, strided dy)")


def test_threads_do_not_change_results():
    x, M, c, D = make_inputs(8, 6, 7, 9, 20, 18, 5, torch.float64, "cpu")
    with num_threads(1):
        one = native(x, M, c, D, 2)
    with num_threads(2):
        two = native(x, M, c, D, 2)
    assert_close_scaled(one[0], two[0], 1e-12, "y")
    assert_close_scaled(one[1], two[1], 1e-12, "r")
    assert_close_scaled(one[2], two[2], 1e-12, "S")


@pytest.mark.parametrize("defect", [True, False])
def test_gradcheck_float64(defect):
    x, M, c, D = make_inputs(2, 2, 3, 2, 5, 4, 3, torch.float64, "cpu", defect=defect)
    inputs = tuple(t.requires_grad_() for t in (x, M, c, D) if t is not None)
    # y through every input (it does not depend on D: a zero Jacobian, which is checked too).
    assert torch.autograd.gradcheck(lambda *ts: native(*ts[:3], ts[3] if defect else None, 1)[0], inputs)


def test_gradcheck_r_to_D_float64():
    # r's gradient goes to D only by definition (x̂ is detached), while a finite difference in x would
    # move r: so r is checked as a function of D with x, M, c held fixed.
    x, M, c, D = make_inputs(2, 2, 3, 2, 5, 4, 3, torch.float64, "cpu")
    assert torch.autograd.gradcheck(lambda D: native(x, M, c, D, 1)[1], (D.requires_grad_(),))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("defect", [True, False])
@pytest.mark.parametrize("need_S", [True, False])
def test_opcheck(bias, defect, need_S):
    x, M, c, D = make_inputs(2, 3, 4, 2, 6, 5, 3, torch.float64, "cpu", bias, defect)
    req = lambda t: None if t is None else t.requires_grad_()  # noqa: E731
    # Without S no gradient for D can be formed: D then takes none, as the functional layer arranges.
    torch.library.opcheck(torch.ops.relaxeq.relaxed_conv2d.default,
                          (req(x), req(M), req(c), req(D) if need_S else D, 1, need_S))
    dy = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    torch.library.opcheck(torch.ops.relaxeq.relaxed_conv2d_backward.default,
                          (dy, x.detach(), M.detach(), 1, [True, True, bias]))


def test_meta_tensors_use_the_fake_kernel():
    x, M, D = (torch.empty(*s, device="meta") for s in ((2, 3, 9, 7), (4, 3, 3, 3), (5, 3, 3, 3)))
    y, r, S = torch.ops.relaxeq.relaxed_conv2d(x, M, None, D, 0, True)
    assert y.shape == (2, 4, 7, 5) and r.shape == () and S.shape == (5, 3, 3, 3) and y.device.type == "meta"
    _, r, S = torch.ops.relaxeq.relaxed_conv2d(x, M, None, D, 0, False)
    assert r.shape == () and S.shape == (0,)


def test_torch_compile_fullgraph():
    x, M, c, D = make_inputs(2, 3, 4, 5, 8, 8, 3, torch.float32, "cpu")

    def step(x, M, c, D):
        y, r, _S = torch.ops.relaxeq.relaxed_conv2d(x, M, c, D, 1, True)
        return y.square().sum() + 0.1 * r

    compiled = torch.compile(step, fullgraph=True)
    M.requires_grad_(); D.requires_grad_()
    out_c = compiled(x, M, c, D)
    gc = torch.autograd.grad(out_c, (M, D))
    out_e = step(x, M, c, D)
    ge = torch.autograd.grad(out_e, (M, D))
    assert_close_scaled(out_c, out_e, 1e-6, "loss")
    for a, b, name in zip(gc, ge, ("dM", "dD")):
        assert_close_scaled(a, b, 1e-6, name)


def test_functional_dispatch_and_return_form():
    x, M, c, D = make_inputs(2, 3, 4, 5, 8, 8, 3, torch.float64, "cpu")
    y_n, r_n = relaxed_conv2d(x, M, c, D, 1, backend="native")
    y_r, r_r = relaxed_conv2d(x, M, c, D, 1, backend="reference")
    assert_close_scaled(y_n, y_r, 1e-12, "y")
    assert_close_scaled(r_n, r_r, 1e-12, "r")
    y_only = relaxed_conv2d(x, M, c, padding=1, backend="native")
    assert isinstance(y_only, torch.Tensor) and y_only.shape == y_n.shape


def test_cuda_kernels_registered_when_built():
    info = relaxeq_fast.build_info()
    if not info["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    for name in ("relaxeq::relaxed_conv2d", "relaxeq::relaxed_conv2d_backward"):
        table = torch._C._dispatch_dump(name)
        assert "CUDA" in table and "CPU" in table, table


@pytest.mark.cuda
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision(dtype, tol, device):
    # Inputs rounded to 11/8-bit mantissas, float32 accumulation, one rounding of y on store (CPU: what
    # torch.autocast("cpu") hands the op).
    x, M, c, D = make_inputs(2, 5, 6, 7, 13, 11, 5, dtype, device)
    y, r, S = native(x, M, c, D, 2)
    y_ref, r_ref, S_ref = ref64(x, M, c, D, 2)
    assert r.dtype == torch.float32 and S.dtype == torch.float32
    assert_close_scaled(y, y_ref, tol, "y")
    # CUDA keeps z in float32 registers; the CPU op squares z after the half-type convolution stored it
    # (one rounding per term, mostly averaging out: measured 1e-4 relative for bfloat16)
    assert_close_scaled(r, r_ref, 1e-4 if device == "cuda" else tol / 10, "r (float32 accumulation)")
    assert_close_scaled(S, S_ref, tol, "S")


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


# Bad input: every error names the argument at fault (the native op directly, then the functional layer).
BAD_CALLS = [
    ("x must be 4-D", lambda: native(_t(3, 9, 9), _t(4, 3, 3, 3), None, None, 0)),
    ("M must be 4-D", lambda: native(_t(2, 3, 9, 9), _t(4, 27), None, None, 0)),
    ("C_in = x.shape[1] = 3", lambda: native(_t(2, 3, 9, 9), _t(4, 2, 3, 3), None, None, 0)),
    ("M must have the dtype of x", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 3, dtype=torch.float64), None, None, 0)),
    ("D must have shape [C_d, C_in, k, k]", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 3), None, _t(5, 3, 5, 5), 0)),
    ("D must have the dtype of x", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 3), None,
                                                  _t(5, 3, 3, 3, dtype=torch.float64), 0)),
    ("c must have shape [C_out]", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 3), _t(5), None, 0)),
    ("M must have a square k x k kernel", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 5), None, None, 0)),
    ("padding must be >= 0", lambda: native(_t(2, 3, 9, 9), _t(4, 3, 3, 3), None, None, -1)),
    ("kernel does not fit x", lambda: native(_t(2, 3, 2, 9), _t(4, 3, 3, 3), None, None, 0)),
    ("x must be float32, float64, bfloat16 or float16 on CPU", lambda: native(
        torch.ones(2, 3, 9, 9, dtype=torch.int32), torch.ones(4, 3, 3, 3, dtype=torch.int32), None, None, 0)),
    ("dy must have shape [B, C_out, H', W']", lambda: torch.ops.relaxeq.relaxed_conv2d_backward(
        _t(2, 4, 9, 9), _t(2, 3, 9, 9), _t(4, 3, 3, 3), 0, [True, True, True])),
    ("dy must have the dtype of x", lambda: torch.ops.relaxeq.relaxed_conv2d_backward(
        _t(2, 4, 7, 7, dtype=torch.float64), _t(2, 3, 9, 9), _t(4, 3, 3, 3), 0, [True, True, True])),
    # through the functional layer (checked before dispatch, device mismatches included)
    ("x must be 4-D", lambda: relaxed_conv2d(_t(3, 9, 9), _t(4, 3, 3, 3))),
    ("C_in = x.shape[1] = 3", lambda: relaxed_conv2d(_t(2, 3, 9, 9), _t(4, 2, 3, 3))),
    ("D must have the dtype of x", lambda: relaxed_conv2d(_t(2, 3, 9, 9), _t(4, 3, 3, 3),
                                                          D=_t(5, 3, 3, 3, dtype=torch.float64))),
    ("D must have shape [C_d, C_in, k, k]", lambda: relaxed_conv2d(_t(2, 3, 9, 9), _t(4, 3, 3, 3), D=_t(5, 3, 5, 5))),
    ("M must be on the device of x", lambda: relaxed_conv2d(_t(2, 3, 9, 9), torch.empty(4, 3, 3, 3, device="meta"))),
    ("padding must be an int >= 0", lambda: relaxed_conv2d(_t(2, 3, 9, 9), _t(4, 3, 3, 3), padding=1.5)),
    ("backend must be one of", lambda: relaxed_conv2d(_t(2, 3, 9, 9), _t(4, 3, 3, 3), backend="fast")),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_names_the_argument(message, call):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call()
    assert message in str(info.value), str(info.value)
