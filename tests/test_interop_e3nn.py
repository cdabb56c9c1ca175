"""e3nn interop (relaxeq_fast.interop.e3nn, swap): o3.Linear → EquivariantLinear with identical outputs and
gradients (float64), relax → project → back to e3nn, equivariance by e3nn's own checker, parity kept, and the
errors. Skipped with the reason where e3nn is not installed (scripts/setup.sh installs it)."""
import copy

import pytest
import torch

e3nn = pytest.importorskip("e3nn", reason="e3nn is an optional extra (pip install 'relaxeq_fast[e3nn]')")
from e3nn import o3  # noqa: E402
from e3nn.util.test import assert_equivariant  # noqa: E402

from relaxeq_fast import VN, Irreps, use_backend  # noqa: E402
from relaxeq_fast.interop.e3nn import from_e3nn_linear, irreps_from_e3nn, to_e3nn, to_e3nn_linear  # noqa: E402
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear  # noqa: E402
from relaxeq_fast.vn import model_regularizers, project, relax, set_theta, swap  # noqa: E402
from testing import assert_close_scaled  # noqa: E402

DT = torch.float64
# (irreps_in, irreps_out, o3.Linear options): parities, multiplicities, repeated irreps, 0o outputs (no bias
# allowed there), path normalisation, an instruction subset
CASES = [
    ("2x0e+1x1o+1x1e+2x2e", "1x0e+2x1o+1x1e+1x2e", dict(biases=True)),
    ("3x1o+2x3o+1x0e", "2x1o+1x3o+2x0e", dict(path_normalization="path", biases=True)),
    ("1x0e+1x1o", "2x0e+1x1o", dict(instructions=[(0, 0)])),
    ("4x0e+2x1o+1x0o", "3x0e+1x0o+2x1o", dict()),
    ("1x1o+1x1o+2x2e", "2x1o+1x2e+1x2e", dict(biases=False)),
]
IDS = ["parities", "path_norm", "subset", "pseudoscalar", "repeated"]


def _random_linear(ir_in, ir_out, kw, seed):
    torch.manual_seed(seed)
    lin = o3.Linear(ir_in, ir_out, **kw).to(DT)
    with torch.no_grad():
        for p in lin.parameters():
            p.normal_()
    return lin


@pytest.mark.parametrize("ir_in,ir_out,kw", CASES, ids=IDS)
def test_converted_linear_has_the_same_outputs_and_gradients(ir_in, ir_out, kw):
    lin = _random_linear(ir_in, ir_out, kw, 0)
    ours = from_e3nn_linear(lin)
    assert ours.irreps_in == irreps_from_e3nn(ir_in) and ours.irreps_out == irreps_from_e3nn(ir_out)
    x = torch.randn(7, lin.irreps_in.dim, dtype=DT, requires_grad=True)
    y_ours, y_e3nn = ours(x), lin(x)
    assert (y_ours - y_e3nn).abs().max() < 1e-10
    dy = torch.randn_like(y_e3nn)
    g_ours, = torch.autograd.grad(y_ours, x, dy)
    g_e3nn, = torch.autograd.grad(y_e3nn, x, dy)
    assert (g_ours - g_e3nn).abs().max() < 1e-10
    # and back: an e3nn Linear that computes the same
    back = to_e3nn_linear(ours)
    assert (back(x) - y_e3nn).abs().max() < 1e-10


def test_parity_is_kept():
    ours = EquivariantLinear(Irreps("1x1o+1x1e"), Irreps("1x1o+1x0o+1x0e"), dtype=DT)
    assert [(entry[5], entry[6]) for entry in ours.layout] == [(0, 0)]  # 1e → 1o is not an O(3) map
    assert ours.n_scalar_out == 1  # a bias on 0e only: a pseudoscalar bias would break parity
    assert Irreps("1x1o") != Irreps("1x1e") and Irreps("1x1") != Irreps("1x1o")


def test_swap_of_an_e3nn_network_then_relax_project_and_back():
    torch.manual_seed(1)
    net = torch.nn.Sequential(o3.Linear("4x0e+2x1o+1x2e", "3x0e+2x1o+2x2e", biases=True),
                              o3.Linear("3x0e+2x1o+2x2e", "2x0e+1x1o", biases=True)).to(DT)
    x = torch.randn(6, net[0].irreps_in.dim, dtype=DT)
    expected = net(x)
    ours = swap(torch.nn.Sequential(*[m for m in net]))
    assert all(type(m) is EquivariantLinear for m in ours)
    assert (ours(x) - expected).abs().max() < 1e-10
    relaxed = relax(ours)
    set_theta(relaxed, 0.8)
    with torch.no_grad():
        for name, p in relaxed.named_parameters():
            if name.endswith("_relax"):
                p.normal_(std=0.1)
    irreps_in, irreps_out = net[0].irreps_in, net[1].irreps_out
    with pytest.raises(AssertionError):  # non-vacuous: the relaxation breaks equivariance
        assert_equivariant(relaxed, args_in=[x], irreps_in=[irreps_in], irreps_out=[irreps_out])
    relaxed.train()(x)  # the closed-form regulariser on parity irreps (generators see l only)
    terms = model_regularizers(relaxed)
    assert len(terms) == 2 and all(t.lie_derivative > 0 and torch.isfinite(t.projection) for t in terms)
    with pytest.raises(ValueError, match="project"):
        to_e3nn(copy.deepcopy(relaxed))
    projected = project(relaxed)
    assert not any(isinstance(m, RelaxedLinear) for m in projected.modules())
    assert (projected(x) - expected).abs().max() < 1e-10  # θ := 0: the equivariant weights were kept
    back = to_e3nn(projected)
    assert all(type(m).__name__ == "Linear" and type(m).__module__.startswith("e3nn") for m in back)
    assert (back(x) - expected).abs().max() < 1e-10
    # the state_dict loads into the original e3nn architecture and computes the same
    fresh = torch.nn.Sequential(o3.Linear("4x0e+2x1o+1x2e", "3x0e+2x1o+2x2e", biases=True),
                                o3.Linear("3x0e+2x1o+2x2e", "2x0e+1x1o", biases=True)).to(DT)
    fresh.load_state_dict(back.state_dict())
    assert (fresh(x) - expected).abs().max() < 1e-10
    assert_equivariant(back, args_in=[x], irreps_in=[irreps_in], irreps_out=[irreps_out])
    assert_equivariant(projected, args_in=[x], irreps_in=[irreps_in], irreps_out=[irreps_out])


def test_errors_name_the_cause():
    with pytest.raises(ValueError, match="l = 4 is above 3"):
        from_e3nn_linear(o3.Linear("1x4e", "1x4e"))
    with pytest.raises(ValueError, match="internal_weights=True, shared_weights=True"):
        from_e3nn_linear(o3.Linear("1x0e", "1x0e", internal_weights=False, shared_weights=False))
    with pytest.raises(TypeError, match="must be an e3nn.o3.Linear"):
        from_e3nn_linear(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="project a relaxed model first"):
        to_e3nn_linear(relax(EquivariantLinear(Irreps("1x0e"), Irreps("1x0e"))))
    with pytest.raises(ValueError, match="VN features"):  # [..., C, 3] in, not e3nn's flattened [..., D]
        to_e3nn_linear(EquivariantLinear(VN(2), VN(3)))


def _e3nn_generators(irreps):
    """[3, D, D]: e3nn's own Lie-algebra generators (o3.so3_generators, in e3nn's basis) of an e3nn Irreps."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DT)  # e3nn builds them in the default dtype (float32: 1e-7 off)
    try:
        gens = {ir.l: o3.so3_generators(ir.l) for _mul, ir in irreps}
    finally:
        torch.set_default_dtype(default)
    blocks = [torch.kron(torch.eye(mul, dtype=DT), gens[ir.l][k]) for k in range(3) for mul, ir in irreps]
    per_k = len(irreps)
    return torch.stack([torch.block_diag(*blocks[k * per_k:(k + 1) * per_k]) for k in range(3)])


def test_closed_form_r_ld_equals_the_lie_derivative_under_e3nn_generators():
    """θ² R_LD (ours, closed form) = Σ_k ‖J_f(x) A_in,k x − A_out,k f(x)‖² with e3nn's generators, by jvp, on a
    relaxed layer converted from e3nn up to l = 3: our irreps basis is e3nn's (a different basis, or a
    different generator convention beyond an orthogonal mixing of k, would not match)."""
    lin = _random_linear("2x0e+1x1o+1x2e+1x3o", "1x0e+2x1o+1x2e+2x3o", {}, 3)
    layer = relax(from_e3nn_linear(lin))
    set_theta(layer, 0.7)
    with torch.no_grad():
        layer.weight_relax.normal_(std=0.2)
        layer.bias_relax.normal_(std=0.2)
    x = torch.randn(40, lin.irreps_in.dim, dtype=DT, generator=torch.Generator().manual_seed(4)) + 0.3
    A_in, A_out = _e3nn_generators(lin.irreps_in), _e3nn_generators(lin.irreps_out)
    with use_backend("reference"):  # jvp needs forward-mode AD: the pure-PyTorch path has it
        layer.train()(x)
        terms = layer.regularizers()
        total = 0.0
        for k in range(3):
            fx, jv = torch.func.jvp(layer, (x,), (x @ A_in[k].T,))
            total = total + (jv - fx @ A_out[k].T).square().sum()
        # non-vacuous: the same generators in another basis of the l = 3 block (m order reversed) disagree
        flip = torch.eye(lin.irreps_out.dim, dtype=DT)
        flip[-7:, -7:] = flip[-7:, -7:].flip(0)
        other = sum((jv - fx @ (flip @ A_out[k] @ flip).T).square().sum()
                    for k, (fx, jv) in enumerate(torch.func.jvp(layer, (x,), (x @ A_in[k].T,)) for k in range(3)))
    assert terms.lie_derivative.item() > 1e-3
    assert_close_scaled(0.7 ** 2 * terms.lie_derivative, total, 1e-10, "θ² R_LD vs e3nn-generator jvp")
    assert abs(other - total) > 1e-3 * total
