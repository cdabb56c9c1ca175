"""relaxeq::relaxation_regularizer (R_LD, R_N of L same-shape layers in one op) against an independent
float64 reference: the sums over rows Σ_k Σ_n ‖C_k x_n − A_k b‖², Σ_n ‖W x_n + b‖² with dense generators,
differentiated by autograd. Plus gradcheck, opcheck, torch.compile, odd shapes and bad input."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaxeq_fast import VN, Irreps, InputStats, use_backend
from relaxeq_fast import _ops
from relaxeq_fast.models import VNPointNet
from relaxeq_fast.regularizer import (_flat_irreps, _generator_list, relaxation_regularizer_ref,
                                      relaxation_regularizers)
from relaxeq_fast.vn import model_regularizers, set_theta

from testing import (DEVICES, WRITABLE_LAYOUTS, RecordOps, assert_close_scaled, contiguous64, jvp_lie_derivative_norm2,
                     layouts, relaxed_layer, rep_features, with_layout)

pytestmark = pytest.mark.skipif(not _ops.EXTENSION_LOADED, reason="the native extension is not built")

REP_PAIRS = [(VN(4), VN(3)), (Irreps("2x0+1x1+1x2"), Irreps("1x0+2x1+1x3")), (Irreps("1x0"), Irreps("2x0")),
             (Irreps("1x0e+1x0o+1x1o+1x2e+1x3o"), Irreps("2x0e+1x1e+1x3o"))]
IDS = ["vn", "irreps_l0-3", "scalars", "o3_parity"]
# float64: the op and the dense reference differ only by summation order. float32: G and the products are
# float32 (the statistics' dtype), ~1e-6 of the largest term.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def dense_ref(W, b, X, rin, rout):
    """[L] R_LD, R_N from the rows X [L, n, D_in] with dense generators, float64 (no relaxeq algebra)."""
    A_in, A_out = rin.generator_matrices(), rout.generator_matrices()  # [3, D, D]
    W, X = W.double(), X.double()
    C = W[None] @ A_in[:, None] - A_out[:, None] @ W[None]  # [3, L, D_out, D_in]
    lie = C @ X.transpose(-1, -2)[None]  # [3, L, D_out, n]
    out = W @ X.transpose(-1, -2)
    if b is not None:
        lie = lie - (A_out[:, None] @ b.double()[None, ..., None])
        out = out + b.double()[..., None]
    return (lie ** 2).sum((0, 2, 3)), (out ** 2).sum((1, 2))


def make_inputs(rin, rout, L, n, bias, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(L, rout.dim, rin.dim, dtype=dtype, generator=g).to(device).requires_grad_()
    b = torch.randn(L, rout.dim, dtype=dtype, generator=g).to(device).requires_grad_() if bias else None
    X = (torch.randn(L, n, rin.dim, dtype=dtype, generator=g) + 0.3).to(device)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    Xs = X.to(sdt)
    G, s = Xs.transpose(-1, -2) @ Xs, Xs.sum(1)
    return W, b, X, G, s


def call_op(W, b, G, s, rows, n, rin, rout, all_outputs=False):
    """(R_LD, R_N); with all_outputs also the four unit gradients the op returns for its backward."""
    out = torch.ops.relaxeq.relaxation_regularizer(
        W, b, G, s, rows, n, _flat_irreps(rin), _flat_irreps(rout), _generator_list(rin, rout, G.dtype, G.device))
    return out if all_outputs else out[:2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_rows", [False, True], ids=["closed_form", "rows"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("L", [1, 4])
@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_values_and_gradients_match_dense_reference(rin, rout, L, bias, use_rows, dtype, device):
    W, b, X, G, s = make_inputs(rin, rout, L, 7, bias, dtype, device)
    r_ld, r_n = call_op(W, b, G, s, X if use_rows else None, 7, rin, rout)
    Wd = W.detach().double().cpu().requires_grad_()
    bd = b.detach().double().cpu().requires_grad_() if bias else None
    e_ld, e_n = dense_ref(Wd, bd, X.cpu(), rin, rout)
    assert r_ld.dtype == G.dtype and r_ld.shape == (L,)
    tol = RTOL[dtype]
    assert_close_scaled(r_ld.cpu(), e_ld, tol, "R_LD")
    assert_close_scaled(r_n.cpu(), e_n, tol, "R_N")
    # distinct upstream weights per layer and per term, so a swapped or summed gradient shows
    w_ld = torch.linspace(0.5, 1.5, L, dtype=torch.float64)
    w_n = torch.linspace(2.0, 0.7, L, dtype=torch.float64)
    ((r_ld.cpu().double() * w_ld).sum() + (r_n.cpu().double() * w_n).sum()).backward()
    ((e_ld * w_ld).sum() + (e_n * w_n).sum()).backward()
    assert W.grad.dtype == dtype
    assert_close_scaled(W.grad.cpu(), Wd.grad, tol, "dW_r")
    if bias:
        assert_close_scaled(b.grad.cpu(), bd.grad, tol, "db_r")


# Property test of the native op (torch.ops.relaxeq.relaxation_regularizer and its backward op, checked to run):
# tiny representations (VN(1..3), scalars, irreps with l up to 3), L = 1..4 layers, n = 0..7 rows, both dtypes
# (tolerances: RTOL), bias or not, closed form or rows, and W_r, b_r, the rows, G, s and the generators each in
# a drawn memory layout (testing.LAYOUTS; W_r, b_r and the rows may be broadcast along any dim -- G and s are
# then formed from the broadcast rows' values; G, s and the generators keep their values, so never broadcast).
# Against the float64 dense reference on contiguous copies of the rows.
REPS = [VN(1), VN(2), VN(3), Irreps("1x0"), Irreps("2x0+1x1"), Irreps("1x1+1x2"), Irreps("1x0+1x1+1x3")]


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(rin=st.sampled_from(REPS), rout=st.sampled_from(REPS), L=st.integers(1, 4), n=st.integers(0, 7),
       bias=st.booleans(), use_rows=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32]),
       layout_W=layouts((0, 1, 2)), layout_b=layouts((0, 1)), layout_X=layouts((0, 1, 2)),
       layout_G=layouts(allowed=WRITABLE_LAYOUTS), layout_s=layouts(allowed=WRITABLE_LAYOUTS),
       layout_gens=layouts(allowed=WRITABLE_LAYOUTS), seed=st.integers(0, 2 ** 16))
def test_hypothesis_strided_inputs_match_dense_reference(rin, rout, L, n, bias, use_rows, dtype, layout_W, layout_b,
                                                         layout_X, layout_G, layout_s, layout_gens, seed):
    W, b, X, _, _ = make_inputs(rin, rout, L, n, bias, dtype, "cpu", seed)
    W = with_layout(W, *layout_W).requires_grad_()
    b = with_layout(b, *layout_b).requires_grad_() if bias else None
    X = with_layout(X, *layout_X)
    Xs = X.contiguous()  # the statistics' dtype is the dtype of the rows for float32 and float64
    G = with_layout(Xs.mT @ Xs, *layout_G)
    s = with_layout(Xs.sum(1), *layout_s)
    gens = [with_layout(g, *layout_gens) for g in _generator_list(rin, rout, G.dtype, G.device)]
    w_ld = torch.linspace(0.5, 1.5, L, dtype=torch.float64)  # distinct upstream weights per layer and term
    w_n = torch.linspace(2.0, 0.7, L, dtype=torch.float64)
    with RecordOps() as ops:
        r_ld, r_n = torch.ops.relaxeq.relaxation_regularizer(W, b, G, s, X if use_rows else None, n,
                                                             _flat_irreps(rin), _flat_irreps(rout), gens)[:2]
        grads = torch.autograd.grad((r_ld.double() * w_ld).sum() + (r_n.double() * w_n).sum(),
                                    [t for t in (W, b) if t is not None])
    assert "relaxeq.relaxation_regularizer" in ops.ops and "relaxeq.relaxation_regularizer_backward" in ops.ops
    Wd = contiguous64(W).requires_grad_()
    bd = contiguous64(b).requires_grad_() if bias else None
    e_ld, e_n = dense_ref(Wd, bd, contiguous64(X), rin, rout)
    want = torch.autograd.grad((e_ld * w_ld).sum() + (e_n * w_n).sum(), [t for t in (Wd, bd) if t is not None])
    tol = RTOL[dtype]
    assert r_ld.shape == r_n.shape == (L,) and r_ld.dtype == G.dtype
    assert_close_scaled(r_ld, e_ld, tol, "R_LD")
    assert_close_scaled(r_n, e_n, tol, "R_N")
    for name, leaf, g, e in zip(("dW_r", "db_r"), (W, b), grads, want):
        assert g.shape == leaf.shape and g.dtype == dtype, f"{name}: {tuple(g.shape)} {g.dtype}"
        assert_close_scaled(g, e, tol, name)


@pytest.mark.parametrize("rin,rout", REP_PAIRS[:2], ids=IDS[:2])
def test_equivariant_relaxation_weights_give_zero_lie_derivative(rin, rout):
    # W_r = W_eq (an equivariant matrix from the layer's own parametrisation), b_r = 0: R_LD = 0 exactly
    from relaxeq_fast.nn import EquivariantLinear
    torch.manual_seed(0)
    eq = EquivariantLinear(rin, rout, bias=False, dtype=torch.float64)
    W = eq.equivariant_matrix().detach()[None]
    _, _, X, G, s = make_inputs(rin, rout, 1, 9, False, torch.float64, "cpu")
    r_ld, r_n = call_op(W, torch.zeros(1, rout.dim, dtype=torch.float64), G, s, None, 9, rin, rout)
    assert r_n.item() > 1e-3
    assert abs(r_ld.item()) < 1e-10 * r_n.item()


@pytest.mark.parametrize("use_rows", [False, True], ids=["closed_form", "rows"])
def test_gradcheck(use_rows):
    rin, rout = REP_PAIRS[1]
    W, b, X, G, s = make_inputs(rin, rout, 2, 5, True, torch.float64, "cpu")
    gens = _generator_list(rin, rout, G.dtype, G.device)
    f = lambda W, b: torch.ops.relaxeq.relaxation_regularizer(  # noqa: E731
        W, b, G, s, X if use_rows else None, 5, _flat_irreps(rin), _flat_irreps(rout), gens)[:2]
    assert torch.autograd.gradcheck(f, (W, b))


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("use_rows", [False, True], ids=["closed_form", "rows"])
def test_opcheck(bias, use_rows):
    rin, rout = REP_PAIRS[0]
    W, b, X, G, s = make_inputs(rin, rout, 3, 6, bias, torch.float32, "cpu")
    gens = _generator_list(rin, rout, G.dtype, G.device)
    args = (W, b, G, s, X if use_rows else None, 6, _flat_irreps(rin), _flat_irreps(rout), gens)
    torch.library.opcheck(torch.ops.relaxeq.relaxation_regularizer.default, args)
    unit_grads = torch.ops.relaxeq.relaxation_regularizer(*args)[2:]
    torch.library.opcheck(torch.ops.relaxeq.relaxation_regularizer_backward.default,
                          (torch.rand(3), torch.rand(3), W.detach(), *unit_grads, [True, bias]))


def test_torch_compile_fullgraph_matches_eager():
    rin, rout = REP_PAIRS[1]
    W, b, X, G, s = make_inputs(rin, rout, 2, 5, True, torch.float64, "cpu")

    def loss(W, b):
        terms = relaxation_regularizers(W, b, rin, rout, InputStats(G, s, 5), backend="native")
        return (terms.lie_derivative.sum() + 0.3 * terms.projection.sum()).sqrt()

    eager = loss(W, b)
    gW, gb = torch.autograd.grad(eager, (W, b))
    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(W, b)
    cW, cb = torch.autograd.grad(compiled, (W, b))
    assert_close_scaled(compiled, eager, 1e-12, "compiled loss")
    assert_close_scaled(cW, gW, 1e-12, "compiled dW_r")
    assert_close_scaled(cb, gb, 1e-12, "compiled db_r")


@pytest.mark.parametrize("n", [0, 1])
def test_few_rows_and_many_layers(n):
    rin, rout = VN(2), VN(3)
    L = 64
    W, b, X, G, s = make_inputs(rin, rout, L, n, True, torch.float64, "cpu")
    r_ld, r_n = call_op(W, b, G, s, None, n, rin, rout)
    e_ld, e_n = dense_ref(W.detach(), b.detach(), X, rin, rout)
    assert_close_scaled(r_ld, e_ld, 1e-10, "R_LD")
    assert_close_scaled(r_n, e_n, 1e-10, "R_N")


def test_non_contiguous_inputs():
    rin, rout = REP_PAIRS[1]
    W, b, X, G, s = make_inputs(rin, rout, 3, 6, True, torch.float64, "cpu")
    Wt = W.detach().transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    bt = torch.stack([b.detach(), b.detach()], -1)[..., 0]
    ref = call_op(W.detach(), b.detach(), G, s, None, 6, rin, rout, all_outputs=True)
    got = call_op(Wt, bt, G.transpose(1, 2), s, None, 6, rin, rout, all_outputs=True)  # G symmetric
    for r, e in zip(got, ref):
        assert_close_scaled(r, e, 1e-12, "non-contiguous")


def test_native_and_reference_backends_agree_on_a_model():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=4, k=5, width=0.25, relaxed=True,
                       relax_kwargs=dict(relax_init="default")).double()
    set_theta(model, 0.6)
    x = torch.randn(3, 24, 3, dtype=torch.float64)
    model.train()
    out = {}
    for backend in ("native", "reference"):
        with use_backend(backend):
            model.zero_grad()
            model(x)
            terms = model_regularizers(model)
            total = sum(t.lie_derivative for t in terms) + 0.1 * sum(t.projection for t in terms)
            total.backward()
            out[backend] = (total.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert_close_scaled(out["native"][0], out["reference"][0], 1e-10, "model regulariser")
    assert len(out["native"][1]) == len(out["reference"][1]) > 0
    for a, e in zip(out["native"][1], out["reference"][1]):
        assert_close_scaled(a, e, 1e-9, "model gradient")


def test_native_regulariser_is_one_dispatch_per_group():
    rin, rout = REP_PAIRS[1]
    W, b, X, G, s = make_inputs(rin, rout, 4, 6, True, torch.float32, "cpu")
    counts = {}
    for backend in ("native", "reference"):
        relaxation_regularizers(W, b, rin, rout, InputStats(G, s, 6), backend=backend)  # fills the generator cache
        with RecordOps() as c:
            terms = relaxation_regularizers(W, b, rin, rout, InputStats(G, s, 6), backend=backend)
            (terms.lie_derivative.sum() + terms.projection.sum()).backward()
        counts[backend] = c.ops
    native = counts["native"]
    assert native.count("relaxeq.relaxation_regularizer") == 1
    assert native.count("relaxeq.relaxation_regularizer_backward") == 1
    # what is left around the op: the two sums, their backward and autograd's bookkeeping
    assert len(native) <= 12, native
    assert len(counts["reference"]) > 4 * len(native), (len(counts["reference"]), len(native))


@pytest.mark.parametrize("change, message", [
    (dict(W=lambda W: W[0]), "W_r must be [L, D_out, D_in]"),
    (dict(W=lambda W: W[:, :-1]), "W_r must be [L, D_out, D_in]"),
    (dict(G=lambda G: G[:, :-1]), "G must be [L, D_in, D_in]"),
    (dict(G=lambda G: G.half()), "G must be float32 or float64"),
    (dict(s=lambda s: s[:1]), "s must be [L, D_in]"),
    (dict(b=lambda b: b[:, :-1]), "b_r must be [L, D_out]"),
    (dict(rows=lambda X: X[:, :-1]), "rows must be [L, n, D_in]"),
    (dict(gens=lambda g: g[:1]), "generators must hold"),
    (dict(n=lambda n: -1), "n must be >= 0"),
])
def test_bad_input_names_the_argument(change, message):
    rin, rout = REP_PAIRS[0]
    W, b, X, G, s = make_inputs(rin, rout, 2, 5, True, torch.float32, "cpu")
    args = dict(W=W.detach(), b=b.detach(), G=G, s=s, rows=None, n=5,
                gens=_generator_list(rin, rout, G.dtype, G.device))
    if "rows" in change:
        args["rows"] = X
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[")):
        torch.ops.relaxeq.relaxation_regularizer(args["W"], args["b"], args["G"], args["s"], args["rows"],
                                                 args["n"], _flat_irreps(rin), _flat_irreps(rout), args["gens"])


def test_reference_function_is_the_algebra_the_op_implements():
    # relaxation_regularizer_ref (the pure-PyTorch closed form) against the dense rows reference too
    rin, rout = REP_PAIRS[1]
    W, b, X, G, s = make_inputs(rin, rout, 3, 6, True, torch.float64, "cpu")
    for rows in (None, X):
        r_ld, r_n = relaxation_regularizer_ref(W, b, G, s, rows, 6, rin, rout)
        e_ld, e_n = dense_ref(W.detach(), b.detach(), X, rin, rout)
        assert_close_scaled(r_ld, e_ld, 1e-10, "ref R_LD")
        assert_close_scaled(r_n, e_n, 1e-10, "ref R_N")


# The closed form the op evaluates (W·[G | H] and V·G, csrc/relaxation_regularizer.cpp) against the Lie
# derivative's definition by forward-mode AD, for the layer's own relaxation weights (full, or the complement
# W_r − P_eq W_r), with O(3) parities and l up to 3; its gradient against reverse mode through that jvp.
JVP_PAIRS = [(VN(4), VN(6)), (Irreps("2x0+1x1+1x2+1x3"), Irreps("1x0+2x1+1x2+2x3")),
             (Irreps("2x0e+1x0o+2x1o+1x1e+1x2e+1x3o"), Irreps("1x0e+1x0o+1x1o+2x1e+1x2o+2x3o"))]


@pytest.mark.parametrize("relax_space", ["full", "complement"])
@pytest.mark.parametrize("rin,rout", JVP_PAIRS, ids=["vn", "irreps_l0-3", "o3_parity"])
def test_closed_form_and_its_gradient_equal_the_jvp_definition(rin, rout, relax_space):
    layer = relaxed_layer(rin, rout, relax_space=relax_space)
    x = rep_features(rin, 50)
    layer.train()
    with use_backend("native"):
        layer(x)
        r_ld = layer.regularizers().lie_derivative
    with use_backend("reference"):
        jvp_total = jvp_lie_derivative_norm2(layer, x, rin, rout)
    theta = float(layer.theta)
    assert jvp_total.item() > 1e-3, "test must exercise a non-equivariant branch"
    assert_close_scaled(theta ** 2 * r_ld, jvp_total, 1e-10, "θ² R_LD vs jvp")
    params = (layer.weight_relax, layer.bias_relax)
    got = torch.autograd.grad(theta ** 2 * r_ld, params)
    want = torch.autograd.grad(jvp_total, params)
    for name, g, w in zip(("dW_r", "db_r"), got, want):
        assert_close_scaled(g, w, 1e-10, name)
