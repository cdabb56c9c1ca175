"""Closed-form R_LD and R_N against independent evaluations: jvp of the layer, dense generators, outputs."""
import pytest
import torch

from relaxeq_fast import InputStats, VN, Irreps, combine_regularizers, use_backend
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear
from relaxeq_fast.regularizer import (RegularizerTerms, grouped_relaxation_regularizers, lie_derivative_matrices,
                                      relaxation_regularizers)

from testing import assert_close_scaled, jvp_lie_derivative_norm2, relaxed_layer, rep_features

REP_PAIRS = [
    (VN(4), VN(6)),
    (Irreps("2x0+1x1+1x2+1x3"), Irreps("1x0+2x1+1x2+2x3")),
    (Irreps("3x2"), Irreps("1x0+1x2")),
    (Irreps("2x0e+1x0o+2x1o+1x1e+1x2e+1x3o"), Irreps("1x0e+1x0o+1x1o+2x1e+1x2o+2x3o")),  # O(3): parities
]
IDS = ["vn", "irreps_l0-3", "irreps_l2", "o3_parity"]


features = rep_features


@pytest.mark.parametrize("relax_space", ["full", "complement"])
@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_closed_form_lie_derivative_equals_jvp(rin, rout, relax_space):
    layer = relaxed_layer(rin, rout, relax_space=relax_space)
    x = features(rin, 50)
    layer.train()
    with use_backend("reference"):  # jvp needs forward-mode AD, which the pure-PyTorch path has
        layer(x)
        terms = layer.regularizers()
        total = jvp_lie_derivative_norm2(layer, x, rin, rout)
    theta = float(layer.theta)
    assert terms.lie_derivative.item() > 1e-3, "test must exercise a non-equivariant branch"
    assert_close_scaled(theta ** 2 * terms.lie_derivative, total, 1e-10, "θ² R_LD vs jvp")
    # R_N is the branch as applied: Σ ‖W x + b‖² = ‖f_θ − f_drop‖² / θ² (drop: the projection), W the
    # relaxation weight of the forward (W_r, or its complement)
    with torch.no_grad():
        branch = layer(x) - layer.project("drop")(x)
    assert_close_scaled(theta ** 2 * terms.projection, (branch ** 2).sum(), 1e-10, "θ² R_N vs branch")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_lie_derivative_matrices_match_dense_generators(rin, rout):
    W = torch.randn(rout.dim, rin.dim, dtype=torch.float64)
    A_in, A_out = rin.generator_matrices(), rout.generator_matrices()
    dense = torch.stack([W @ A_in[k] - A_out[k] @ W for k in range(3)])
    assert_close_scaled(lie_derivative_matrices(W, rin, rout), dense, 1e-13, "C_k")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_lie_derivative_vanishes_for_equivariant_relaxation(rin, rout):
    layer = relaxed_layer(rin, rout)
    other = EquivariantLinear(rin, rout, bias=False, dtype=torch.float64)
    with torch.no_grad():
        layer.weight_relax.copy_(other.equivariant_matrix())
        layer.bias_relax.zero_()
    layer(features(rin, 30))
    terms = layer.regularizers()
    scale = terms.projection.item()
    assert scale > 1.0
    print("R_LD", terms.lie_derivative.item(), "R_N", scale)
    assert abs(terms.lie_derivative.item()) <= 1e-12 * scale
    assert abs(layer.regularizers(data_free=True).lie_derivative.item()) <= 1e-12 * scale


def test_scalar_bias_is_equivariant_vector_bias_is_not():
    rin, rout = Irreps("2x0+1x1"), Irreps("1x0+1x1")
    layer = relaxed_layer(rin, rout)
    with torch.no_grad():
        layer.weight_relax.zero_()
        layer.bias_relax.zero_()
        layer.bias_relax[0] = 2.0  # scalar output: invariant, so no Lie derivative
    layer(features(rin, 10))
    assert abs(layer.regularizers().lie_derivative.item()) < 1e-12
    with torch.no_grad():
        layer.bias_relax[2] = 1.0  # a vector component: A_k b ≠ 0
    layer(features(rin, 10))
    # Σ_k ‖A_k b‖² for b = e_y in a vector block is 2 (two generators move it), times N = 10 rows
    assert_close_scaled(layer.regularizers().lie_derivative, torch.tensor(20.0, dtype=torch.float64), 1e-12)


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_projection_term_equals_output_difference(rin, rout):
    layer = relaxed_layer(rin, rout, theta=0.35)
    x = features(rin, 40)
    y_theta = layer(x)
    terms = layer.regularizers()
    y_zero = layer.project()(x)
    direct = ((y_theta - y_zero) ** 2).sum() / 0.35 ** 2
    assert_close_scaled(terms.projection, direct, 1e-10, "R_N")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_data_free_equals_identity_statistics(rin, rout):
    layer = relaxed_layer(rin, rout)
    free = layer.regularizers(data_free=True)
    A_out = rout.generator_matrices()
    W, b = layer.weight_relax.detach(), layer.bias_relax.detach()
    C = torch.stack([W @ rin.generator_matrices()[k] - A_out[k] @ W for k in range(3)])
    want_ld = (C ** 2).sum() + sum(((A_out[k] @ b) ** 2).sum() for k in range(3))
    want_n = (W ** 2).sum() + (b ** 2).sum()
    assert_close_scaled(free.lie_derivative, want_ld, 1e-12, "R_LD data-free")
    assert_close_scaled(free.projection, want_n, 1e-12, "R_N data-free")


@pytest.mark.parametrize("rin,rout", REP_PAIRS[:2], ids=IDS[:2])
def test_native_and_reference_statistics_agree(rin, rout):
    layer = relaxed_layer(rin, rout)
    x = features(rin, 200)
    with use_backend("native"):
        layer(x)
        native = layer.regularizers()
    with use_backend("reference"):
        layer(x)
        ref = layer.regularizers()
    for a, b, name in zip(native[:2], ref[:2], ("R_LD", "R_N")):
        assert_close_scaled(a, b, 1e-11, name)


def test_gradcheck_regularizers():
    rin, rout = Irreps("1x0+1x1+1x2"), Irreps("2x1+1x0")
    x = torch.randn(9, rin.dim, dtype=torch.float64)
    stats = InputStats(x.T @ x, x.sum(0), 9)
    W = torch.randn(rout.dim, rin.dim, dtype=torch.float64, requires_grad=True)
    b = torch.randn(rout.dim, dtype=torch.float64, requires_grad=True)
    for st in (stats, None):
        assert torch.autograd.gradcheck(
            lambda W, b: torch.stack(relaxation_regularizers(W, b, rin, rout, st)[:2]), (W, b))


def test_combine_forms():
    t1 = RegularizerTerms(torch.tensor(4.0), torch.tensor(9.0), 2)
    t2 = RegularizerTerms(torch.tensor(5.0), torch.tensor(16.0), 4)
    assert combine_regularizers([t1, t2], 2.0, 1.0, "paper").item() == pytest.approx(2 * 3.0 + 5.0)
    assert combine_regularizers([t1, t2], 2.0, 1.0, "sum").item() == pytest.approx(2 * 9 + 25)
    assert combine_regularizers([t1, t2], 1.0, 1.0, "mean").item() == pytest.approx(4 / 2 + 5 / 4 + 9 / 2 + 16 / 4)
    assert combine_regularizers([t1, t2], 1.0, 0.0, "paper", theta=0.5).item() == pytest.approx(0.5 * 3.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        combine_regularizers([t1], 1.0, 1.0, reduction="max")
    with pytest.raises(ValueError, match="terms is empty"):
        combine_regularizers([], 1.0, 1.0)


def test_paper_form_has_finite_gradient_at_zero():
    layer = RelaxedLinear(VN(3), VN(3), dtype=torch.float64)  # W_r = b_r = 0: R = 0 exactly
    layer(torch.randn(5, 3, 3, dtype=torch.float64))
    loss = combine_regularizers([layer.regularizers()], 1.0, 1.0, "paper")
    loss.backward()
    assert torch.isfinite(layer.weight_relax.grad).all()


def test_regularizers_without_stats_is_an_error():
    layer = RelaxedLinear(VN(2), VN(2))
    with pytest.raises(RuntimeError, match="no input statistics"):
        layer.regularizers()


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_grouped_regularizers_equal_the_per_layer_sum(rin, rout):
    """The batched evaluation of several layers (shared irreps and N) gives the sum of the per-layer terms,
    values and gradients, in float64."""
    layers = [relaxed_layer(rin, rout, seed=s) for s in range(3)]
    stats = []
    for i, layer in enumerate(layers):
        layer.train()
        layer(features(rin, 40, seed=10 + i))
        stats.append(layer.last_stats)
    per_layer = [layer.regularizers() for layer in layers]
    want_ld, want_n = sum(t.lie_derivative for t in per_layer), sum(t.projection for t in per_layer)
    want_grads = torch.autograd.grad(want_ld + 0.3 * want_n, [p for m in layers for p in (m.weight_relax, m.bias_relax)])
    got = grouped_relaxation_regularizers([m.weight_relax for m in layers], [m.bias_relax for m in layers],
                                          rin, rout, stats)
    assert got.n == 40
    assert_close_scaled(got.lie_derivative, want_ld, 1e-12, "R_LD")
    assert_close_scaled(got.projection, want_n, 1e-12, "R_N")
    grads = torch.autograd.grad(got.lie_derivative + 0.3 * got.projection,
                                [p for m in layers for p in (m.weight_relax, m.bias_relax)])
    for g, w in zip(grads, want_grads):
        assert_close_scaled(g, w, 1e-12, "grad")


def test_model_regularizers_groups_layers_and_keeps_the_sums():
    """model_regularizers batches same-shape layers (here the two maps of each VNLinearLeakyReLU and the
    repeated blocks) and its sums equal the per-layer sums for every reduction."""
    from relaxeq_fast.vn import VNLinearLeakyReLU, model_regularizers, relax, relaxed_layers

    torch.manual_seed(0)
    net = torch.nn.Sequential(VNLinearLeakyReLU(4, 4), VNLinearLeakyReLU(4, 4), VNLinearLeakyReLU(4, 6)).double()
    relax(net, relax_init="default", theta=0.5)
    with torch.no_grad():
        for m in relaxed_layers(net):
            m.bias_relax.normal_()
    net.train()
    net(torch.randn(2, 9, 4, 3, dtype=torch.float64))
    layers = list(relaxed_layers(net))
    per_layer = [m.regularizers() for m in layers]
    grouped = model_regularizers(net)
    assert len(layers) == 6 and len(grouped) == 2  # {4→4 maps of blocks 0 and 1}, {4→6 maps of block 2}
    for reduction in ("paper", "sum", "mean"):
        want = combine_regularizers(per_layer, 1.0, 0.1, reduction)
        got = combine_regularizers(grouped, 1.0, 0.1, reduction)
        assert_close_scaled(got, want, 1e-12, reduction)


def test_layers_with_and_without_a_relaxation_bias_share_a_group():
    """The paper's direction maps have no relaxation bias: they join their feature map's group with a zero bias
    (one call, not two), and the sums, and the gradients of every W_r and b_r, equal the per-layer ones."""
    from relaxeq_fast.vn import VNLinearLeakyReLU, model_regularizers, relax, relaxed_layers

    torch.manual_seed(0)
    net = torch.nn.Sequential(VNLinearLeakyReLU(4, 4), VNLinearLeakyReLU(4, 4)).double()
    relax(net, relax_init="default", theta=0.5)
    for block in net:  # as relaxed_maps="paper": the direction map relaxed without a bias
        block.map_to_dir = RelaxedLinear.from_plain(block.map_to_dir.project(), relax_init="default", theta=0.5,
                                                    relax_bias=False)
    with torch.no_grad():
        for m in relaxed_layers(net):
            if m.bias_relax is not None:
                m.bias_relax.normal_()
    net.train()
    net(torch.randn(2, 9, 4, 3, dtype=torch.float64))
    layers = list(relaxed_layers(net))
    assert sum(m.bias_relax is None for m in layers) == 2
    grads = {}
    for how in ("per_layer", "grouped"):
        net.zero_grad(set_to_none=True)
        terms = [m.regularizers() for m in layers] if how == "per_layer" else model_regularizers(net)
        if how == "grouped":
            assert len(terms) == 1
        loss = combine_regularizers(terms, 1.0, 0.1, "paper")
        loss.backward()
        grads[how] = (loss.detach(), [p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert_close_scaled(grads["grouped"][0], grads["per_layer"][0], 1e-12, "loss")
    assert len(grads["grouped"][1]) == len(grads["per_layer"][1]) == 6  # 4 W_r, 2 b_r
    for got, want in zip(grads["grouped"][1], grads["per_layer"][1]):
        assert_close_scaled(got, want, 1e-12, "grad")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_row_path_equals_closed_form(rin, rout):
    """With fewer rows than D_in the layer keeps its input rows and sums over them directly: the same R_LD,
    R_N and gradients as the closed form on (G, s, N), in float64, also batched over a group of layers."""
    layers = [relaxed_layer(rin, rout, seed=s) for s in range(2)]
    n = max(1, rin.dim // 2)
    for i, layer in enumerate(layers):
        layer.train()
        layer(features(rin, n, seed=20 + i))
        assert layer.last_rows is not None and layer.last_rows.shape == (n, rin.dim)
    params = [p for m in layers for p in (m.weight_relax, m.bias_relax)]
    for group in ([layers[0]], layers):
        args = ([m.weight_relax for m in group], [m.bias_relax for m in group], rin, rout,
                [m.last_stats for m in group])
        closed = grouped_relaxation_regularizers(*args)
        direct = grouped_relaxation_regularizers(*args, rows=[m.last_rows for m in group])
        for got, want, name in ((direct.lie_derivative, closed.lie_derivative, "R_LD"),
                                (direct.projection, closed.projection, "R_N")):
            assert_close_scaled(got, want, 1e-12, name)
        g_direct = torch.autograd.grad(direct.lie_derivative + 0.3 * direct.projection, params, allow_unused=True)
        g_closed = torch.autograd.grad(closed.lie_derivative + 0.3 * closed.projection, params, allow_unused=True)
        for a, b in zip(g_direct, g_closed):
            assert (a is None) == (b is None)
            if a is not None:
                assert_close_scaled(a, b, 1e-12, "grad")
    # the layer's own regularizers() takes the row path, and a layer with N >= D_in keeps no rows
    assert_close_scaled(layers[0].regularizers().lie_derivative,
                        relaxation_regularizers(layers[0].weight_relax, layers[0].bias_relax, rin, rout,
                                                layers[0].last_stats).lie_derivative, 1e-12, "layer")
    layers[0](features(rin, rin.dim + 1))
    assert layers[0].last_rows is None
