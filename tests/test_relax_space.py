"""Issue 16: the projection P_eq onto a layer's equivariant maps, relaxation confined to its complement
(relax_space="complement"), the nearest-equivariant projection (project(mode="nearest")) and the per-layer
"layer_mean" reduction — against independent references (null spaces of the commutation constraints, least
squares on the dense steerable basis) and mathematical properties (idempotence, self-adjointness,
equivariance, nearness in the data norm for group-closed batches). R_LD and R_N of the complement against jvp
and the branch itself: tests/test_regularizer.py."""
import copy
import itertools
import math

import pytest
import torch

from relaxeq_fast import Irreps, VN, combine_regularizers
from relaxeq_fast.models import VNPointNet
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear, intertwiner_coefficients
from relaxeq_fast.regularizer import RegularizerTerms
from relaxeq_fast.relaxation import relaxation_report
from relaxeq_fast.steerable import FieldType, R2Conv, RelaxedR2Conv, kernel_basis, kernel_defect
from relaxeq_fast.vn import equivariance_error, model_regularizers, project, relax, set_theta

from testing import RecordOps, assert_close_scaled, relaxed_layer, rep_features

pytestmark = pytest.mark.usefixtures("single_thread")
DT = torch.float64
EXACT = 1e-10  # float64: projections and symmetries hold to rounding

REP_PAIRS = [
    (VN(2), VN(3)),
    (Irreps("2x0+1x1+1x2+1x3"), Irreps("1x0+2x1+1x2+2x3")),  # SO(3), l <= 3
    (Irreps("2x0e+1x0o+2x1o+1x1e+1x2e+1x3o"), Irreps("1x0e+1x0o+1x1o+2x1e+1x2o+2x3o")),  # O(3): parities
]
IDS = ["vn", "so3_l0-3", "o3_parity"]


def field_types(G):
    if G is None:
        return FieldType.trivial(None, 1) + FieldType.irreps(None, [1]), FieldType.irreps(None, [1, 2])
    return FieldType.regular(G, 1) + FieldType.trivial(G, 1), FieldType.regular(G, 1) + FieldType.irreps(G, [1])


def dense_operator(fn, shape):
    """The matrix [n, n] of a linear map on tensors of ``shape`` (n = their size), column j = fn(e_j)."""
    n = math.prod(shape)
    basis = torch.eye(n, dtype=DT).reshape(n, *shape)
    return torch.stack([fn(e).reshape(-1) for e in basis], 1)


def null_space_projector(C):
    """The orthogonal projector onto {v : C v = 0}, from an SVD (independent of the code under test)."""
    _, S, Vh = torch.linalg.svd(C)
    rank = int((S > 1e-9 * S[0]).sum())
    N = Vh[rank:].T
    return N @ N.T, N.shape[1]


def intertwiner_projector(rin, rout):
    """P_ref on vec(W), W [D_out, D_in]: the maps with W A_k,in = A_k,out W (k = 1..3) and, where every block has
    a parity, W Π_in = Π_out W with Π the inversion — i.e. the O(3) (or SO(3)) intertwiners."""
    A_in, A_out = rin.generator_matrices(), rout.generator_matrices()
    constraints = [lambda W, k=k: W @ A_in[k] - A_out[k] @ W for k in range(3)]
    if all(p is not None for p in rin.parities + rout.parities):
        def inversion(rep):
            return torch.diag(torch.cat([torch.full((m * (2 * l + 1),), float(p) * (-1.0) ** l, dtype=DT)
                                         for (m, l), p in zip(rep.blocks, rep.parities)]))
        P_in, P_out = inversion(rin), inversion(rout)
        constraints.append(lambda W: W @ P_in - P_out @ W)
    C = torch.cat([dense_operator(c, (rout.dim, rin.dim)) for c in constraints])
    return null_space_projector(C)


def ours_projector(layer):
    return dense_operator(lambda W: layer.equivariant_matrix(intertwiner_coefficients(W, layer.layout)),
                          (layer.irreps_out.dim, layer.irreps_in.dim))


# ---- P_eq ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_irreps_projection_is_the_orthogonal_projector_onto_the_intertwiners(rin, rout):
    layer = EquivariantLinear(rin, rout, dtype=DT)
    P = ours_projector(layer)
    P_ref, dim = intertwiner_projector(rin, rout)
    assert dim == sum(om * im for (_l, _os, om, _is, im, _oi, _ii) in layer.layout)
    assert_close_scaled(P, P_ref, EXACT, "P_eq vs null-space projector")
    assert_close_scaled(P @ P, P, EXACT, "idempotent")
    assert_close_scaled(P.T, P, EXACT, "self-adjoint")
    W_eq = layer.equivariant_matrix().reshape(-1)  # identity on equivariant maps
    assert_close_scaled(P @ W_eq, W_eq, EXACT, "P W_eq")
    W = torch.randn(rout.dim * rin.dim, dtype=DT, generator=torch.Generator().manual_seed(0))
    complement = W - P_ref @ W  # zero on their orthogonal complement
    assert complement.norm() > 1.0
    assert (P @ complement).norm() <= EXACT * complement.norm()


@pytest.mark.parametrize("G", [4, 8, None], ids=["C4", "C8", "SO2"])
def test_steerable_projection_is_least_squares_on_the_basis(G):
    tin, tout = field_types(G)
    conv = R2Conv(tin, tout, 3, dtype=DT)
    shape = (tout.dim, tin.dim, 3, 3)
    P = dense_operator(lambda B: conv.expand(conv.basis_coefficients(B))[0], shape)
    E = kernel_basis(tin, tout, 3).reshape(conv.n_basis, -1)  # the dense basis, built independently of expand
    P_ref = E.T @ torch.linalg.solve(E @ E.T, E)
    assert_close_scaled(P, P_ref, EXACT, "P_eq vs least squares")
    assert_close_scaled(P @ P, P, EXACT, "idempotent")
    assert_close_scaled(P.T, P, EXACT, "self-adjoint")
    K = conv.expand()[0].reshape(-1)
    assert_close_scaled(P @ K, K, EXACT, "identity on equivariant kernels")
    B = torch.randn(shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    complement = B.reshape(-1) - P_ref @ B.reshape(-1)
    assert (P @ complement).norm() <= EXACT * complement.norm()
    # the projected kernel is equivariant: the defect of P B vanishes (C_4 exactly; C_8 / SO(2) to rounding
    # of the interpolation, on which the basis is built)
    D = kernel_defect(conv.expand(conv.basis_coefficients(B))[0], tin, tout)
    assert D.norm() <= (EXACT if G == 4 else 1e-8) * B.norm()


# ---- complement parametrisation ----------------------------------------------------------------------------

def relaxed(rin, rout, space, theta=0.7, seed=0):
    return relaxed_layer(rin, rout, theta=theta, seed=seed, relax_space=space)


features = rep_features


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_complement_forward_is_equivariant_part_plus_theta_times_the_complement(rin, rout):
    layer = relaxed(rin, rout, "complement")
    x = features(rin, 20)
    xf = x.reshape(len(x), rin.dim)
    P, _ = intertwiner_projector(rin, rout)
    W_c = layer.weight_relax.detach().reshape(-1)
    W_c = (W_c - P @ W_c).reshape(rout.dim, rin.dim)
    b_c = layer.bias_relax.detach().clone()
    if layer.bias is not None:  # the plain layer's bias covers the invariant scalar outputs
        for i, (start, stop, _m, _l) in enumerate(rout.slices()):
            if rout.is_invariant(i):
                b_c[start:stop] = 0
    b_eq = layer.equivariant_bias() if layer.bias is not None else 0
    want = xf @ (layer.equivariant_matrix() + layer.theta * W_c).T + b_eq + layer.theta * b_c
    assert_close_scaled(layer(x).reshape(len(x), rout.dim), want.detach(), 1e-12, "complement forward")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_complement_regularisers_vanish_exactly_on_the_intertwiners(rin, rout):
    layer = relaxed(rin, rout, "complement")
    other = EquivariantLinear(rin, rout, bias=False, dtype=DT)
    x = features(rin, 30)
    with torch.no_grad():
        layer.weight_relax.copy_(other.equivariant_matrix())
        layer.bias_relax.zero_()
    y = layer(x)
    terms = layer.regularizers()
    assert abs(terms.lie_derivative.item()) <= 1e-20 and abs(terms.projection.item()) <= 1e-20
    # the relaxation holds nothing: the output is the plain layer's at any θ
    assert_close_scaled(y, layer.project()(x), 1e-13, "equivariant W_r changes nothing")
    # and any component off the intertwiners is seen by both terms
    with torch.no_grad():
        layer.weight_relax[0, -1] += 1e-3
    layer(x)
    terms = layer.regularizers()
    assert terms.lie_derivative.item() > 1e-10 and terms.projection.item() > 1e-10
    # the full parametrisation keeps R_N > 0 for an equivariant W_r (the part projection throws away)
    full = relaxed(rin, rout, "full")
    with torch.no_grad():
        full.weight_relax.copy_(other.equivariant_matrix())
        full.bias_relax.zero_()
    full(x)
    assert full.regularizers().projection.item() > 1.0


@pytest.mark.parametrize("G", [4, None], ids=["C4", "SO2"])
def test_steerable_complement_forward_and_regularisers(G):
    tin, tout = field_types(G)
    torch.manual_seed(0)
    layer = RelaxedR2Conv(tin, tout, 3, relax_init="default", relax_space="complement", theta=0.6, dtype=DT)
    full = RelaxedR2Conv(tin, tout, 3, relax_space="full", theta=0.6, dtype=DT)
    full.load_state_dict(layer.state_dict())
    x = torch.randn(2, tin.dim, 7, 7, dtype=DT)
    E = kernel_basis(tin, tout, 3).reshape(layer.n_basis, -1)
    B = layer.weight_relax.detach().reshape(-1)
    B_c = (B - E.T @ torch.linalg.solve(E @ E.T, E @ B)).reshape(layer.weight_relax.shape)
    kernel, bias = layer.expand()
    want = torch.nn.functional.conv2d(x, kernel + 0.6 * B_c, bias, padding=1)
    y = layer(x)
    assert_close_scaled(y, want.detach(), 1e-12, "complement conv")
    terms, full_terms = layer.regularizers(), (full(x), full.regularizers())[1]
    assert_close_scaled(terms.projection, (B_c ** 2).sum(), 1e-12, "R_N = ‖B − P B‖²")
    # D(P B) = 0, so the Lie-derivative term is the full parametrisation's
    assert_close_scaled(terms.lie_derivative, full_terms.lie_derivative, 1e-8, "R_LD")


# ---- one pass over the data, M formed once ----------------------------------------------------------------

@pytest.mark.parametrize("rin,rout", REP_PAIRS[:2], ids=IDS[:2])
def test_complement_forms_M_once_and_reads_the_data_once(rin, rout):
    x = features(rin, 64)
    records = {}
    for space in ("full", "complement"):
        layer = relaxed(rin, rout, space).train()
        with RecordOps(x.numel()) as rec:
            layer(x)
        records[space] = rec
    print({s: r.data_ops for s, r in records.items()})
    assert records["complement"].data_ops == records["full"].data_ops  # no extra pass over x
    assert len(records["full"].data_ops) >= 1
    if isinstance(rin, VN):  # the fused op forms M = (w − θ P W_r) ⊗ I + θ W_r, once
        assert records["complement"].ops.count("relaxeq.relaxed_params") == 1
    else:  # M = W_eq(w − θ P W_r) + θ W_r: one [D_out, D_in] sum, as for the full parametrisation
        def m_sums(rec):
            return rec.outputs.count(("aten.add", (rout.dim, rin.dim)))
        assert m_sums(records["complement"]) == m_sums(records["full"]) == 1


def test_steerable_complement_convolves_once():
    tin, tout = field_types(4)
    x = torch.randn(8, tin.dim, 20, 20, dtype=DT)  # larger than any weight-side tensor (basis samples)
    data_ops = {}
    for space in ("full", "complement"):
        layer = RelaxedR2Conv(tin, tout, 3, relax_init="default", relax_space=space, dtype=DT).train()
        with RecordOps(x.numel()) as rec:
            layer(x)
        data_ops[space] = rec.data_ops
    print(data_ops)
    assert data_ops["complement"] == data_ops["full"] == ["relaxeq.relaxed_conv2d"]


# ---- nearest projection ------------------------------------------------------------------------------------

def octahedral_rotations():
    """The 24 rotations of the cube: signed permutation matrices with determinant 1."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            R = torch.zeros(3, 3, dtype=DT)
            for i, (j, s) in enumerate(zip(perm, signs)):
                R[i, j] = s
            if torch.det(R) > 0:
                out.append(R)
    assert len(out) == 24
    return out


@pytest.mark.parametrize("rin,rout", [(VN(3), VN(4)), (Irreps("2x0+2x1"), Irreps("1x0+3x1"))], ids=["vn", "l01"])
def test_nearest_projection_is_closest_on_a_group_closed_batch(rin, rout):
    """On a batch closed under the octahedral group (irreducible on l = 1, so the batch's second moments commute
    with the representation) the Frobenius-nearest layer is also the nearest in output norm: closer than "drop"
    and than any other equivariant layer."""
    layer = relaxed(rin, rout, "full", theta=0.8)
    x0 = features(rin, 6)
    x = torch.cat([rin.rotate(R, x0) for R in octahedral_rotations()])
    with torch.no_grad():
        y = layer(x)
        dist = {mode: (layer.project(mode)(x) - y).norm().item() for mode in ("drop", "nearest")}
        nearest = layer.project("nearest")
        gen = torch.Generator().manual_seed(3)
        for _ in range(5):
            other = copy.deepcopy(nearest)
            for p in other.parameters():
                p.add_(1e-3 * torch.randn(p.shape, dtype=DT, generator=gen))
            assert (other(x) - y).norm().item() > dist["nearest"]
    print(dist)
    assert dist["nearest"] < dist["drop"]


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_nearest_projection_folds_the_equivariant_part_and_loads_into_the_plain_class(rin, rout):
    layer = relaxed(rin, rout, "full", theta=0.8)
    plain = layer.project("nearest")
    P, _ = intertwiner_projector(rin, rout)
    M = (layer.equivariant_matrix() + layer.theta * layer.weight_relax).detach().reshape(-1)
    assert_close_scaled(plain.equivariant_matrix().detach().reshape(-1), P @ M, 1e-12, "W_near = P_eq M")
    assert type(plain) is EquivariantLinear
    EquivariantLinear(rin, rout, dtype=DT).load_state_dict(plain.state_dict(), strict=True)
    # with the complement, the relaxation has no equivariant part: nearest = drop
    comp = relaxed(rin, rout, "complement", theta=0.8)
    x = features(rin, 10)
    assert_close_scaled(comp.project("nearest")(x), comp.project("drop")(x), 1e-13, "complement nearest = drop")
    # at θ = 0 they agree for the full parametrisation too
    layer.set_theta(0.0)
    assert_close_scaled(layer.project("nearest")(x), layer.project("drop")(x), 1e-15, "θ = 0")


def test_nearest_projected_model_is_equivariant_and_loads_into_the_plain_model():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=4, k=4, relaxed=True, width=0.125, relax_kwargs=dict(relax_init="default")).double()
    points = torch.randn(3, 24, 3, dtype=DT)
    model.train()
    model(points)
    model.eval()
    set_theta(model, 0.6)
    relaxed_err = equivariance_error(model, points)
    projected = project(copy.deepcopy(model), "nearest")
    err = equivariance_error(projected, points)
    print(f"relaxed {relaxed_err:.2e}, nearest-projected {err:.2e}")
    assert relaxed_err > 1e-6 and err < EXACT  # the relaxed model is measurably not equivariant
    plain = VNPointNet(num_classes=4, k=4, relaxed=False, width=0.125).double()
    plain.load_state_dict(projected.state_dict(), strict=True)


@pytest.mark.parametrize("G", [4, None], ids=["C4", "SO2"])
def test_steerable_nearest_projection(G):
    tin, tout = field_types(G)
    torch.manual_seed(0)
    layer = RelaxedR2Conv(tin, tout, 3, relax_init="default", theta=0.7, dtype=DT)
    plain = layer.project("nearest")
    E = kernel_basis(tin, tout, 3).reshape(layer.n_basis, -1)
    M = (layer.expand()[0] + 0.7 * layer.weight_relax).detach().reshape(-1)
    assert_close_scaled(plain.expand()[0].detach().reshape(-1), E.T @ torch.linalg.solve(E @ E.T, E @ M), 1e-12,
                        "K_near = P_eq(K_eq + θB)")
    R2Conv(tin, tout, 3, dtype=DT).load_state_dict(plain.state_dict(), strict=True)


def test_relaxation_report_measures_size_and_equivariant_share():
    torch.manual_seed(0)
    model = relax(torch.nn.Sequential(EquivariantLinear(VN(2), VN(3)), R2Conv(*field_types(4), 3)),
                  relax_init="default", theta=0.5).double()
    other = EquivariantLinear(VN(2), VN(3), bias=False, dtype=DT)
    with torch.no_grad():
        model[0].weight_relax.copy_(other.equivariant_matrix())  # all equivariant
        model[1].weight_relax.copy_(model[1].expand()[0])  # the layer's own kernel: all equivariant
    report = relaxation_report(model)
    assert [r["name"] for r in report] == ["0", "1"]
    for r, m in zip(report, model):
        assert abs(r["equivariant_share"] - 1) < 1e-12
        W_eq = m.equivariant_matrix() if isinstance(m, RelaxedLinear) else m.expand()[0]
        assert abs(r["relative_size"] - m.weight_relax.norm().item() / W_eq.norm().item()) < 1e-12
        assert r["theta"] == 0.5
    for m in model:
        m.relax_space = "complement"  # the same weights seen through the complement: nothing left
    assert all(r["relax_norm"] < 1e-12 for r in relaxation_report(model))
    with torch.no_grad():
        model[0].weight_relax.normal_()
    assert relaxation_report(model)[0]["equivariant_share"] < 1e-24


def test_relax_passes_relax_space_to_every_layer():
    model = relax(torch.nn.Sequential(EquivariantLinear(VN(2), VN(3)),
                                      R2Conv(*field_types(4), 3)), relax_space="complement")
    assert [m.relax_space for m in model] == ["complement", "complement"]


def test_grouped_regularisers_use_the_complement():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=4, k=4, relaxed=True, width=0.125,
                       relax_kwargs=dict(relax_init="default", relax_space="complement")).double().train()
    model(torch.randn(2, 24, 3, dtype=DT))
    grouped = model_regularizers(model)
    per_layer = [m.regularizers() for m in model.modules() if isinstance(m, RelaxedLinear)]
    for field in ("lie_derivative", "projection"):
        assert_close_scaled(sum(getattr(t, field) for t in grouped), sum(getattr(t, field) for t in per_layer),
                            1e-12, field)


# ---- per-layer balance -------------------------------------------------------------------------------------

def test_layer_mean_reduction_divides_each_layer_by_its_rows_before_the_square_root():
    terms = [RegularizerTerms(torch.tensor(8.0, dtype=DT), torch.tensor(2.0, dtype=DT), 4),
             RegularizerTerms(torch.tensor(3.0, dtype=DT), torch.tensor(5.0, dtype=DT), 1)]
    got = combine_regularizers(terms, 0.5, 0.25, reduction="layer_mean")
    want = 0.5 * math.sqrt(8 / 4 + 3 / 1) + 0.25 * math.sqrt(2 / 4 + 5 / 1)
    assert abs(got.item() - want) < 1e-14
    got = combine_regularizers(terms, 0.5, 0.25, reduction="layer_mean", theta=0.5)
    assert abs(got.item() - 0.5 * want) < 1e-14


# ---- errors ------------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="relax_space"):
        RelaxedLinear(VN(2), VN(2), relax_space="equivariant")
    with pytest.raises(ValueError, match="relax_space"):
        RelaxedR2Conv(*field_types(4), 3, relax_space="half")
    with pytest.raises(ValueError, match="mode"):
        RelaxedLinear(VN(2), VN(2)).project("closest")
    with pytest.raises(ValueError, match="mode"):
        project(relax(torch.nn.Sequential(EquivariantLinear(VN(2), VN(2)))), mode="closest")
    with pytest.raises(ValueError, match="reduction"):
        combine_regularizers([RegularizerTerms(torch.tensor(1.0), torch.tensor(1.0), 1)], 1, 1, reduction="layer")
