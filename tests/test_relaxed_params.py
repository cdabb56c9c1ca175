"""relaxeq::relaxed_params (M = weight ⊗ I_d + θ W_r, c = b + θ b_r in one op) against an independent float64
reference written element by element (no kron, no relaxeq code), its gradients (θ's too: a learned θ) by autograd
of that reference and θ's by finite differences; gradcheck, opcheck, torch.compile, odd shapes, bad input, and
the layers that use it."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaxeq_fast import _ops, functional as F, use_backend
from relaxeq_fast.models import VNPointNet
from relaxeq_fast.nn import RelaxedLinear
from relaxeq_fast.reference import relaxed_params_ref
from relaxeq_fast.reps import VN, Irreps

from testing import DEVICES, RecordOps, assert_close_scaled, contiguous64, layouts, with_layout

pytestmark = pytest.mark.skipif(not _ops.EXTENSION_LOADED, reason="the native extension is not built")

# float64: the op adds the same two numbers per entry as the reference (exact up to one rounding);
# float32: one rounding of θ·W_r + w per entry
RTOL = {torch.float64: 1e-14, torch.float32: 1e-6}


def elementwise_ref(w, W_r, b, b_r, theta):
    """M[o·d + a, i·d + a'] = w[o, i]·δ(a, a') + θ W_r[o·d + a, i·d + a'], entry by entry, float64."""
    c_out, c_in = w.shape
    d = W_r.shape[1] // c_in
    M = torch.empty(W_r.shape, dtype=torch.float64)
    for r in range(c_out * d):
        for col in range(c_in * d):
            eq = float(w[r // d, col // d]) if r % d == col % d else 0.0
            M[r, col] = eq + float(theta) * float(W_r[r, col])
    c = torch.zeros(c_out * d, dtype=torch.float64)
    if b is not None:
        c = c + b.double()
    if b_r is not None:
        c = c + float(theta) * b_r.double()
    return M, c


def make_inputs(c_out, c_in, d, bias, bias_relax, dtype, device, theta=0.37, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, dtype=dtype, generator=g).to(device).requires_grad_()  # noqa: E731
    w, W_r = t(c_out, c_in), t(c_out * d, c_in * d)
    b = t(c_out * d) if bias else None
    b_r = t(c_out * d) if bias_relax else None
    return w, W_r, b, b_r, torch.tensor(theta, dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias,bias_relax", [(False, True), (True, True), (False, False), (True, False)],
                         ids=["relax_bias", "both_biases", "no_bias", "eq_bias"])
@pytest.mark.parametrize("c_out,c_in,d", [(4, 3, 3), (1, 5, 3), (6, 2, 1), (3, 3, 5)],
                         ids=["vn", "one_out", "scalars", "d5"])
@pytest.mark.parametrize("theta", [1.0, 0.37, 0.0])
def test_values_and_gradients_match_elementwise_reference(c_out, c_in, d, bias, bias_relax, dtype, device, theta):
    w, W_r, b, b_r, th = make_inputs(c_out, c_in, d, bias, bias_relax, dtype, device, theta)
    th.requires_grad_()  # a learned θ
    M, c = F.relaxed_params(w, W_r, b, b_r, th, backend="native")
    eM, ec = elementwise_ref(w.detach().cpu(), W_r.detach().cpu(), None if b is None else b.detach().cpu(),
                             None if b_r is None else b_r.detach().cpu(), theta)
    rtol = RTOL[dtype]
    torch.testing.assert_close(M.double().cpu(), eM, rtol=rtol, atol=rtol)
    assert (c is None) == (b is None and b_r is None)
    if c is not None:
        torch.testing.assert_close(c.double().cpu(), ec, rtol=rtol, atol=rtol)
    # gradients of a random linear functional of (M, c), against autograd of the float64 reference
    g = torch.Generator().manual_seed(1)
    gM = torch.randn(M.shape, dtype=torch.float64, generator=g)
    gc = torch.randn(c_out * d, dtype=torch.float64, generator=g)
    inputs = [t for t in (w, W_r, b, b_r) if t is not None] + [th]
    got = torch.autograd.grad((M * gM.to(M)).sum() + (0 if c is None else (c * gc.to(c)).sum()), inputs)
    ref_inputs = [t.detach().cpu().double().requires_grad_() for t in inputs]
    rw, rW, *rest = ref_inputs
    rb = rest.pop(0) if b is not None else None
    rbr = rest.pop(0) if b_r is not None else None
    rth = rest.pop(0)
    d_eye = torch.eye(d, dtype=torch.float64)
    RM = (rw[:, None, :, None] * d_eye[None, :, None, :]).reshape(c_out * d, c_in * d) + rth * rW
    Rc = (0 if rb is None else rb) + (0 if rbr is None else rth * rbr)
    want = torch.autograd.grad((RM * gM).sum() + (0 if c is None else (Rc * gc).sum()), ref_inputs)
    names = ["weight", "weight_relax"] + ["bias"] * (b is not None) + ["bias_relax"] * (b_r is not None) + ["theta"]
    for name, a, e in zip(names, got, want):
        assert a.shape == e.shape, f"d{name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(a.double().cpu(), e, rtol=rtol, atol=rtol * 10, msg=lambda m: f"d{name}: {m}")


def elementwise_grads(gM, gc, c_out, c_in, d, theta, W_r, b_r):
    """Gradients of <M, gM> + <c, gc> entry by entry, float64: d weight[o, i] = Σ_a gM[o·d + a, i·d + a],
    d weight_relax = θ gM, d bias = gc, d bias_relax = θ gc, dθ = Σ gM·W_r + Σ gc·b_r (b_r None: 0)."""
    gw = torch.empty(c_out, c_in, dtype=torch.float64)
    for o in range(c_out):
        for i in range(c_in):
            gw[o, i] = sum(float(gM[o * d + a, i * d + a]) for a in range(d))
    dtheta = sum(float(gM[r, col]) * float(W_r[r, col]) for r in range(c_out * d) for col in range(c_in * d))
    if b_r is not None:
        dtheta += sum(float(gc[r]) * float(b_r[r]) for r in range(c_out * d))
    return gw, float(theta) * gM, gc, float(theta) * gc, torch.tensor(dtheta, dtype=torch.float64)


# Property test of the native op (torch.ops.relaxeq.relaxed_params and its backward op, checked to run): tiny
# shapes (C_out, C_in, d from 1 to 5), both dtypes (tolerances: RTOL; gradients 10x: d weight sums d entries),
# every combination of the two biases, θ from {0, 0.37, 1, -1.5}, and weight, weight_relax, the biases (each
# may be broadcast along any dim) and θ (a 0-d view at a storage offset) each in a drawn memory layout
# (testing.LAYOUTS). Against the entry-by-entry float64 reference on contiguous copies.
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(c_out=st.integers(1, 5), c_in=st.integers(1, 5), d=st.integers(1, 5), bias=st.booleans(),
       bias_relax=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
       theta=st.sampled_from([0.0, 0.37, 1.0, -1.5]), layout_w=layouts((0, 1)), layout_W=layouts((0, 1)),
       layout_b=layouts(), layout_br=layouts(), layout_theta=layouts(allowed=("contiguous", "sliced")),
       seed=st.integers(0, 2 ** 16))
def test_hypothesis_strided_inputs_match_elementwise_reference(c_out, c_in, d, bias, bias_relax, dtype, theta,
                                                               layout_w, layout_W, layout_b, layout_br, layout_theta,
                                                               seed):
    w, W_r, b, b_r, th = make_inputs(c_out, c_in, d, bias, bias_relax, dtype, "cpu", theta, seed)
    w, W_r = with_layout(w, *layout_w).requires_grad_(), with_layout(W_r, *layout_W).requires_grad_()
    b = None if b is None else with_layout(b, *layout_b).requires_grad_()
    b_r = None if b_r is None else with_layout(b_r, *layout_br).requires_grad_()
    th = with_layout(th, *layout_theta).requires_grad_()  # a learned θ
    g = torch.Generator().manual_seed(seed + 1)
    gM = torch.randn(c_out * d, c_in * d, dtype=torch.float64, generator=g)
    gc = torch.randn(c_out * d, dtype=torch.float64, generator=g)
    has_c = bias or bias_relax
    leaves = [t for t in (w, W_r, b, b_r) if t is not None] + [th]
    with RecordOps() as ops:
        M, c = torch.ops.relaxeq.relaxed_params(w, W_r, b, b_r, th)
        grads = torch.autograd.grad((M * gM.to(dtype)).sum() + ((c * gc.to(dtype)).sum() if has_c else 0), leaves)
    assert "relaxeq.relaxed_params" in ops.ops and "relaxeq.relaxed_params_backward" in ops.ops, ops.ops
    eM, ec = elementwise_ref(*map(contiguous64, (w, W_r, b, b_r)), float(th))
    rtol = RTOL[dtype]
    assert M.shape == W_r.shape and M.dtype == dtype
    assert_close_scaled(M, eM, rtol, "M")
    assert c.shape == ((c_out * d,) if has_c else (0,))
    if has_c:
        assert_close_scaled(c, ec, rtol, "c")
    gw, gW, gb, gbr, gth = elementwise_grads(gM.to(dtype).double(), gc.to(dtype).double(), c_out, c_in, d, float(th),
                                             contiguous64(W_r), contiguous64(b_r))
    want = [gw, gW] + ([gb] if bias else []) + ([gbr] if bias_relax else []) + [gth]
    names = ["weight", "weight_relax"] + (["bias"] if bias else []) + (["bias_relax"] if bias_relax else []) + ["theta"]
    for name, leaf, got, e in zip(names, leaves, grads, want):
        assert got.shape == leaf.shape, f"d{name}: shape {tuple(got.shape)} != the input's {tuple(leaf.shape)}"
        assert_close_scaled(got, e, 10 * rtol, f"d{name}")


def test_gradcheck_and_opcheck():
    w, W_r, b, b_r, th = make_inputs(3, 2, 3, True, True, torch.float64, "cpu")
    th.requires_grad_()  # a learned θ
    assert torch.autograd.gradcheck(torch.ops.relaxeq.relaxed_params, (w, W_r, b, b_r, th))
    assert torch.autograd.gradcheck(lambda *a: torch.ops.relaxeq.relaxed_params(*a, None, th), (w, W_r, b))
    for args in ((w, W_r, b, b_r, th), (w, W_r, None, b_r, th), (w, W_r, None, None, th),
                 (w, W_r, b, b_r, th.detach())):
        torch.library.opcheck(torch.ops.relaxeq.relaxed_params.default, args)
    M, c = torch.ops.relaxeq.relaxed_params(w, W_r, b, b_r, th)
    for b_r_arg in (b_r.detach(), None):
        torch.library.opcheck(torch.ops.relaxeq.relaxed_params_backward.default,
                              (torch.randn_like(M), torch.randn_like(c), w.detach(), W_r.detach(), b_r_arg, th.detach(),
                               [True, True, True, True, True]))


@pytest.mark.parametrize("bias_relax", [True, False])
@pytest.mark.parametrize("theta", [0.0, 0.37, -1.5])
def test_theta_gradient_against_finite_differences(theta, bias_relax):
    """dθ of L = <M, gM> + <c, gc> against central differences of the entry-by-entry reference (float64; L is
    affine in θ, so the difference quotient is exact up to rounding); a θ without requires_grad gets none."""
    w, W_r, b, b_r, th = make_inputs(3, 2, 3, True, bias_relax, torch.float64, "cpu", theta)
    g = torch.Generator().manual_seed(5)
    gM = torch.randn(W_r.shape, dtype=torch.float64, generator=g)
    gc = torch.randn(W_r.shape[0], dtype=torch.float64, generator=g)

    def loss_ref(t):
        eM, ec = elementwise_ref(w.detach(), W_r.detach(), b.detach(), None if b_r is None else b_r.detach(), t)
        return float((eM * gM).sum() + (ec * gc).sum())

    h = 1e-3
    fd = (loss_ref(theta + h) - loss_ref(theta - h)) / (2 * h)
    th.requires_grad_()
    M, c = torch.ops.relaxeq.relaxed_params(w, W_r, b, b_r, th)
    (dtheta,) = torch.autograd.grad((M * gM).sum() + (c * gc).sum(), (th,))
    print(f"dθ {dtheta.item():.12g}, finite differences {fd:.12g}")
    assert dtheta.shape == () and dtheta.item() == pytest.approx(fd, rel=1e-9, abs=1e-12)
    # a scheduled θ (a buffer, no requires_grad): the backward op is asked for no dθ
    with RecordOps() as ops:
        M, c = torch.ops.relaxeq.relaxed_params(w, W_r, b, b_r, th.detach())
        grads = torch.autograd.grad((M * gM).sum() + (c * gc).sum(), (w, W_r))
    assert "relaxeq.relaxed_params_backward" in ops.ops and len(grads) == 2


def test_only_c_used_gives_zero_matrix_gradients():
    w, W_r, b, b_r, th = make_inputs(2, 3, 3, True, True, torch.float64, "cpu")
    _, c = torch.ops.relaxeq.relaxed_params(w, W_r, b, b_r, th)
    gw, gW, gb, gbr = torch.autograd.grad(c.sum(), (w, W_r, b, b_r))
    assert not gw.any() and not gW.any()
    assert torch.equal(gb, torch.ones_like(gb)) and torch.allclose(gbr, th * torch.ones_like(gbr))


def test_torch_compile_fullgraph_matches_eager():
    w, W_r, b, b_r, th = make_inputs(4, 3, 3, False, True, torch.float64, "cpu")

    def loss(w, W_r, b_r):
        M, c = torch.ops.relaxeq.relaxed_params(w, W_r, None, b_r, th)
        return (M.square().sum() + c.square().sum()) * 0.5

    eager = loss(w, W_r, b_r)
    ge = torch.autograd.grad(eager, (w, W_r, b_r))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(w, W_r, b_r)
    gc = torch.autograd.grad(compiled, (w, W_r, b_r))
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for a, e in zip(gc, ge):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_non_contiguous_inputs():
    w, W_r, b, b_r, th = make_inputs(3, 4, 3, True, True, torch.float64, "cpu")
    wt = w.detach().T.contiguous().T  # same values, transposed strides
    Wt = W_r.detach().T.contiguous().T
    M, c = torch.ops.relaxeq.relaxed_params(wt, Wt, b.detach(), b_r.detach(), th)
    eM, ec = relaxed_params_ref(w.detach(), W_r.detach(), b.detach(), b_r.detach(), th)
    torch.testing.assert_close(M, eM, rtol=0, atol=1e-15)
    torch.testing.assert_close(c, ec, rtol=0, atol=1e-15)


@pytest.mark.parametrize("change, message", [
    (dict(w=lambda w: w[0]), "weight must be [C_out, C_in]"),
    (dict(W=lambda W: W[:, :-1]), "weight_relax must be [C_out d, C_in d]"),
    (dict(W=lambda W: W[:-1]), "weight_relax must be [C_out d, C_in d]"),
    (dict(W=lambda W: W.float()), "weight_relax must have weight's dtype"),
    (dict(th=lambda t: t.reshape(1)), "theta must be a 0-d tensor"),
    (dict(th=lambda t: t.float()), "theta must be a 0-d tensor"),
    (dict(b=lambda b: b[:-1]), "bias must be [C_out d]"),
    (dict(br=lambda b: b[:-1]), "bias_relax must be [C_out d]"),
])
@pytest.mark.parametrize("entry", ["op", "functional"])
def test_bad_input_names_the_argument(change, message, entry):
    w, W_r, b, b_r, th = make_inputs(3, 2, 3, True, True, torch.float64, "cpu")
    args = dict(w=w.detach(), W=W_r.detach(), b=b.detach(), br=b_r.detach(), th=th)
    for k, f in change.items():
        args[k] = f(args[k])
    call = torch.ops.relaxeq.relaxed_params if entry == "op" else F.relaxed_params
    with pytest.raises((RuntimeError, ValueError), match=message.replace("[", r"\[")):
        call(args["w"], args["W"], args["b"], args["br"], args["th"])


@pytest.mark.parametrize("irreps_in,irreps_out,uses_op", [
    (VN(4), VN(3), True), (Irreps("3x0"), Irreps("2x0"), True), (Irreps("1x0+1x1"), Irreps("2x1"), False)],
    ids=["vn", "scalars", "mixed_irreps"])
@pytest.mark.parametrize("bias", [False, True])
def test_relaxed_linear_layer_same_with_and_without_the_op(irreps_in, irreps_out, uses_op, bias):
    """RelaxedLinear.effective_params through the op (single-block layouts) equals the reference backend's
    kron algebra, values and gradients; multi-block layouts keep the block algebra."""
    torch.manual_seed(0)
    layer = RelaxedLinear(irreps_in, irreps_out, bias=bias, relax_init="default", theta=0.6, dtype=torch.float64)
    assert (layer.single_block_dim() is not None) == uses_op
    results = {}
    for backend in ("native", "reference"):
        layer.zero_grad(set_to_none=True)
        with use_backend(backend):
            M, c = layer.effective_params()
        loss = M.square().sum() + (0 if c is None else c.square().sum())
        loss.backward()
        results[backend] = (M.detach(), None if c is None else c.detach(),
                            [p.grad.clone() for p in layer.parameters() if p.grad is not None])
    (Mn, cn, gn), (Mr, cr, gr) = results["native"], results["reference"]
    torch.testing.assert_close(Mn, Mr, rtol=1e-14, atol=1e-14)
    assert (cn is None) == (cr is None) and (cn is None or torch.allclose(cn, cr, rtol=1e-14, atol=1e-14))
    assert len(gn) == len(gr)
    for a, e in zip(gn, gr):
        torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)


def test_vn_pointnet_step_dispatches_fewer_ops():
    """The parameter algebra was ~17 dispatched ops per relaxed layer and step (eye, kron, mul, add and their
    backward); with the op it is one forward and one backward op per layer."""
    torch.manual_seed(0)
    net = VNPointNet(num_classes=4, k=4, width=0.125, relaxed=True).train()
    x = torch.randn(2, 16, 3)
    counts = {}
    for backend in ("native", "reference"):
        with use_backend(backend), RecordOps() as c:
            net.zero_grad(set_to_none=True)
            sum(m.effective_params()[0].sum() for m in net.modules() if isinstance(m, RelaxedLinear)).backward()
        counts[backend] = c.ops
    layers = sum(isinstance(m, RelaxedLinear) for m in net.modules())
    assert counts["native"].count("relaxeq.relaxed_params") == layers
    assert counts["native"].count("relaxeq.relaxed_params_backward") == layers
    assert "aten.kron" not in counts["native"] and "aten.eye" not in counts["native"]
    assert len(counts["reference"]) - len(counts["native"]) >= 10 * layers, (len(counts["reference"]),
                                                                             len(counts["native"]), layers)
