"""relaxeq::relaxation_regularizer_triton (and its backward) against the independent float64 dense reference of
test_relaxation_regularizer.py (sums over rows with dense generators, differentiated by autograd); gradcheck,
opcheck, determinism, bad input, and a model's regulariser under the Triton backend against the native op.

Without a GPU the kernels run in the Triton interpreter (TRITON_INTERPRET=1, set by conftest.py before triton
is imported); shapes stay tiny because the interpreter executes every program in numpy.
"""
import pytest
import torch

from testing import TRITON_DEVICE as DEVICE, assert_close_scaled, skip_module_unless_triton_runs

skip_module_unless_triton_runs()

from relaxeq_fast import Irreps, _ops, use_backend  # noqa: E402
from relaxeq_fast.models import VNPointNet  # noqa: E402
from relaxeq_fast.regularizer import _flat_irreps, _generator_list  # noqa: E402
from relaxeq_fast.triton_kernels import relaxation_regularizer as triton_reg  # noqa: E402
from relaxeq_fast.vn import model_regularizers  # noqa: E402

from test_relaxation_regularizer import REP_PAIRS, IDS, dense_ref, make_inputs  # noqa: E402

# float64: the same algebra, different summation order (blocked tl.dot, per-row partial sums): rounding only.
# float32: G and the products in float32 with IEEE tl.dot (no TF32), ~1e-6 of the largest term.
RTOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def call(op, W, b, G, s, rows, n, rin, rout):
    """All six outputs: R_LD, R_N and the four unit gradients the backward scales."""
    return op(W, b, G, s, rows, n, _flat_irreps(rin), _flat_irreps(rout),
              _generator_list(rin, rout, G.dtype, G.device))


@pytest.fixture(scope="module")
def op():
    return triton_reg.op()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("use_rows", [False, True], ids=["closed_form", "rows"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("L,n", [(1, 5), (4, 1), (2, 40)])  # 40 rows: several 32-wide row blocks
@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_values_and_gradients_match_dense_reference(op, rin, rout, L, n, bias, use_rows, dtype):
    W, b, X, G, s = make_inputs(rin, rout, L, n, bias, dtype, DEVICE)
    r_ld, r_n = call(op, W, b, G, s, X if use_rows else None, n, rin, rout)[:2]
    e_ld, e_n = dense_ref(W.detach().cpu(), None if b is None else b.detach().cpu(), X.cpu(), rin, rout)
    rtol = RTOL[dtype]
    assert r_ld.dtype == r_n.dtype == G.dtype
    assert_close_scaled(r_ld.double().cpu(), e_ld, rtol, "R_LD")
    assert_close_scaled(r_n.double().cpu(), e_n, rtol, "R_N")
    g = torch.Generator().manual_seed(3)
    w_ld, w_n = torch.rand(L, generator=g, dtype=torch.float64), torch.rand(L, generator=g, dtype=torch.float64)
    params = [t for t in (W, b) if t is not None]
    got = torch.autograd.grad((r_ld * w_ld.to(r_ld)).sum() + (r_n * w_n.to(r_n)).sum(), params)
    ref_params = [t.detach().cpu().double().requires_grad_() for t in params]
    e_ld, e_n = dense_ref(ref_params[0], ref_params[1] if bias else None, X.cpu(), rin, rout)
    want = torch.autograd.grad((e_ld * w_ld).sum() + (e_n * w_n).sum(), ref_params)
    for name, a, e in zip(("dW_r", "db_r"), got, want):
        assert_close_scaled(a.double().cpu(), e, rtol, name)


@pytest.mark.parametrize("rin,rout", REP_PAIRS[:2], ids=IDS[:2])
def test_equivariant_relaxation_weights_give_zero_lie_derivative(op, rin, rout):
    # an equivariant W_r (from an EquivariantLinear) commutes with the generators: R_LD = 0, R_N > 0
    from relaxeq_fast.nn import EquivariantLinear
    torch.manual_seed(0)
    W = EquivariantLinear(rin, rout, bias=False, dtype=torch.float64).equivariant_matrix().detach()
    _, _, X, G, s = make_inputs(rin, rout, 1, 6, False, torch.float64, DEVICE)
    r_ld, r_n = call(op, W[None].to(DEVICE), None, G, s, None, 6, rin, rout)[:2]
    assert abs(float(r_ld[0])) < 1e-10 * float(r_n[0]) and float(r_n[0]) > 0


@pytest.mark.parametrize("use_rows", [False, True], ids=["closed_form", "rows"])
def test_gradcheck_and_opcheck(op, use_rows):
    # small irreps with l = 0, 1, 2 (each entry of W is one more gradcheck evaluation in the interpreter)
    rin, rout = Irreps("1x0+1x1"), Irreps("1x1+1x2")
    W, b, X, G, s = make_inputs(rin, rout, 1, 3, True, torch.float64, DEVICE)
    rows = X if use_rows else None
    gens = _generator_list(rin, rout, G.dtype, G.device)
    fn = lambda W, b: op(W, b, G, s, rows, 3, _flat_irreps(rin), _flat_irreps(rout), gens)[:2]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (W, b))
    args = (W, b, G, s, rows, 3, _flat_irreps(rin), _flat_irreps(rout), gens)
    torch.library.opcheck(op, args)
    torch.library.opcheck(triton_reg.backward_op(), (torch.rand(1, dtype=torch.float64), torch.rand(1, dtype=torch.float64),
                                                     W.detach(), *op(*args)[2:], [True, True]))


def test_matches_native_op_and_repeats_bit_for_bit(op):
    """Same numbers as the native op (float64, rounding), and twice the same bits (no atomics)."""
    rin, rout = REP_PAIRS[0]
    W, b, X, G, s = make_inputs(rin, rout, 3, 50, True, torch.float64, DEVICE)
    got = call(op, W, b, G, s, None, 50, rin, rout)
    again = call(op, W, b, G, s, None, 50, rin, rout)
    assert all(torch.equal(a, c) for a, c in zip(got, again))
    if _ops.EXTENSION_LOADED and DEVICE == "cpu":
        want = call(torch.ops.relaxeq.relaxation_regularizer, W, b, G, s, None, 50, rin, rout)
        for a, e in zip(got, want):
            assert_close_scaled(a, e, 1e-12, "triton vs native")


@pytest.mark.parametrize("change, message", [
    (dict(W=lambda W: W[0]), "W_r must be [L, D_out, D_in]"),
    (dict(G=lambda G: G[:, :-1]), "G must be [L, D_in, D_in]"),
    (dict(s=lambda s: s[:1]), "s must be [L, D_in]"),
    (dict(b=lambda b: b[:, :-1]), "b_r must be [L, D_out]"),
    (dict(gens=lambda g: g[:1]), "generators must hold"),
])
def test_bad_input_names_the_argument(op, change, message):
    rin, rout = REP_PAIRS[0]
    W, b, X, G, s = make_inputs(rin, rout, 2, 5, True, torch.float32, DEVICE)
    args = dict(W=W.detach(), b=b.detach(), G=G, s=s, gens=_generator_list(rin, rout, G.dtype, G.device))
    for k, f in change.items():
        args[k] = f(args[k])
    with pytest.raises((RuntimeError, ValueError), match=message.replace("[", r"\[")):
        op(args["W"], args["b"], args["G"], args["s"], None, 5, _flat_irreps(rin), _flat_irreps(rout), args["gens"])


def test_model_regularisers_under_the_triton_backend_match_native():
    """VN-PointNet's grouped regularisers (closed form and rows path, bias and no bias) through the Triton op
    against the native op, values and gradients, float64."""
    if not _ops.EXTENSION_LOADED or DEVICE != "cpu":
        pytest.skip("compares against the native CPU op")
    torch.manual_seed(0)
    net = VNPointNet(num_classes=4, k=4, width=0.125, relaxed=True,
                     relax_kwargs=dict(relax_init="default")).double().train()
    net(torch.randn(2, 16, 3, dtype=torch.float64))  # records the input statistics
    results = {}
    for backend in ("triton", "native"):
        net.zero_grad(set_to_none=True)
        with use_backend(backend):
            terms = model_regularizers(net)
        total = sum(t.lie_derivative.sum() + 0.5 * t.projection.sum() for t in terms)
        total.backward()
        results[backend] = (total.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None])
    (t_val, t_grads), (n_val, n_grads) = results["triton"], results["native"]
    assert_close_scaled(t_val, n_val, 1e-12, "total")
    assert len(t_grads) == len(n_grads) > 0
    for a, e in zip(t_grads, n_grads):
        assert_close_scaled(a, e, 1e-12, "grad")
