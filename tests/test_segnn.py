"""The relaxed SEGNN (relaxeq_fast.models.segnn): weight-balanced irreps, the attributes and one layer against the
equations written out with loops, O(3)/E(3) equivariance at θ = 0 and after projection (float64), broken by
a random relaxation, the projected state_dict in the plain model, the regulariser, and a few training steps
on N-body trajectories."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("e3nn", reason="SEGNN is built from e3nn blocks: pip install 'relaxeq_fast[e3nn]'")
from e3nn import o3  # noqa: E402

from relaxeq_fast.data import nbody  # noqa: E402
from relaxeq_fast.nn import EquivariantLinear  # noqa: E402
from relaxeq_fast.regularizer import combine_regularizers  # noqa: E402
from testing import assert_projection_is_the_model_at_theta_zero, e3_error, nbody_inputs  # noqa: E402
from relaxeq_fast.models.segnn import SEGNN, balanced_irreps, fully_connected_edges, tp_path_count  # noqa: E402
from relaxeq_fast.vn import model_regularizers, project, relaxed_layers, set_theta  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
DT = torch.float64



def _randomise_relaxation(model, std=0.3):
    """Random W_r (``*_relax``) and random equivariant node_relax weights: the projected map is then nonzero,
    so the equivariance tests also check its layout against e3nn's concatenation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_relax") or ".node_relax.weights." in name:
                p.normal_(std=std)



@pytest.mark.parametrize("lmax", [1, 2, 3])
def test_balanced_irreps_match_a_square_linear_layer(lmax):
    h = 64
    irreps = o3.Irreps(balanced_irreps(h, lmax))
    m = irreps[0].mul
    assert [(mul, ir.l, ir.p) for mul, ir in irreps] == [(m, l, (-1) ** l) for l in range(lmax + 1)]
    n_weights = o3.FullyConnectedTensorProduct(irreps, o3.Irreps.spherical_harmonics(lmax), irreps).weight_numel
    assert n_weights == m * m * tp_path_count(lmax)
    assert n_weights >= h * h > (m - 1) ** 2 * tp_path_count(lmax)  # the smallest m reaching h²
    assert balanced_irreps(64, 1) == "32x0e + 32x1o"


def test_attributes_and_one_layer_against_loops():
    """Node attributes, aggregation and one layer update against the equations written out per particle with
    the layer's sub-modules (not its forward), on a tiny fully connected case."""
    torch.manual_seed(0)
    model = SEGNN(hidden_features=8, lmax=2, n_layers=1, relaxed=True).to(DT)
    set_theta(model, 0.7)
    _randomise_relaxation(model)
    loc, vel, q = nbody_inputs(B=2, n=4)
    B, n = loc.shape[:2]

    def sh(r):
        return o3.spherical_harmonics(model.attr_irreps, r, normalize=True, normalization="integral")

    edges = recv, send = fully_connected_edges(B, n)
    assert recv.numel() == B * n * (n - 1) and not (recv == send).any()
    x, qf = loc.reshape(-1, 3), q.reshape(-1, 1)
    edge_attr, node_attr, _ = model.attributes(x, vel.reshape(-1, 3), edges)
    layer = model.layers[0]
    h = torch.randn(B * n, model.hidden_irreps.dim, dtype=DT)
    edge_scalars = torch.cat([(x[recv] - x[send]).square().sum(-1, keepdim=True), qf[recv] * qf[send]], -1)
    h_new = layer(h, edges, edge_attr, node_attr, edge_scalars)
    for b in range(B):
        for i in range(n):
            node = b * n + i
            a_i = sum(sh(loc[b, i] - loc[b, j]) for j in range(n) if j != i) / (n - 1) + sh(vel[b, i])
            assert (node_attr[node] - a_i).abs().max() < 1e-12
            agg = torch.zeros(model.hidden_irreps.dim, dtype=DT)
            for j in range(n):
                if j == i:
                    continue
                d = loc[b, i] - loc[b, j]
                a_ij = sh(d)[None]
                pair = torch.cat([h[node], h[b * n + j], d.square().sum()[None], q[b, i] * q[b, j]])[None]
                agg = agg + layer.message2(layer.message1(pair, a_ij), a_ij)[0]
            u = torch.cat([h[node], agg])[None]
            ref = h[node] + layer.update2(layer.update1(u, a_i[None]), a_i[None])[0] + layer.node_relax(u)[0]
            assert (h_new[node] - ref).abs().max() < 1e-12


@pytest.mark.parametrize("relaxed", [False, True])
def test_e3_equivariant_at_theta_zero_and_after_projection(relaxed):
    torch.manual_seed(1)
    model = SEGNN(hidden_features=8, lmax=2, n_layers=2, relaxed=relaxed).to(DT)
    _randomise_relaxation(model)
    loc, vel, q = nbody_inputs()
    if relaxed:
        set_theta(model, 1.0)
        broken = e3_error(model, loc, vel, q)
        assert broken > 1e-3, broken  # a random relaxation breaks rotation equivariance
        set_theta(model, 0.0)
    assert e3_error(model, loc, vel, q) < 1e-10
    assert e3_error(model, loc, vel, q, improper=True) < 1e-10
    if relaxed:
        assert_projection_is_the_model_at_theta_zero(model, loc, vel, q)


def test_projected_state_dict_loads_into_the_plain_segnn():
    torch.manual_seed(2)
    kwargs = dict(hidden_features=8, lmax=1, n_layers=2)
    model = SEGNN(**kwargs, relaxed=True).to(DT)
    _randomise_relaxation(model)
    set_theta(model, 0.5)
    loc, vel, q = nbody_inputs()
    projected = project(model).eval()
    plain = SEGNN(**kwargs, relaxed=False).to(DT).eval()
    plain.load_state_dict(projected.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(loc, vel, q), projected(loc, vel, q))
        assert projected(loc, vel, q).abs().max() > 0


def test_float64_is_exact_after_a_cast_or_a_float32_state_dict():
    """e3nn builds its Wigner 3j buffers in the default dtype (float32 here); SteerableLayer recomputes them."""
    torch.manual_seed(5)
    loc, vel, q = nbody_inputs()
    cast = SEGNN(hidden_features=8, lmax=3, n_layers=1).to(DT)
    errors = [e3_error(cast, loc, vel, q)]  # ~1e-9 with float32-rounded coefficients
    loaded = SEGNN(hidden_features=8, lmax=3, n_layers=1).to(DT)
    loaded.load_state_dict(SEGNN(hidden_features=8, lmax=3, n_layers=1).state_dict())  # float32 values
    errors.append(e3_error(loaded, loc, vel, q))
    print("relative equivariance errors (cast, loaded):", errors)
    assert max(errors) < 1e-12


def test_plain_model_starts_with_a_zero_node_relax():
    model = SEGNN(hidden_features=8, lmax=1, n_layers=2).to(DT)
    assert all(type(layer.node_relax) is EquivariantLinear for layer in model.layers)
    assert all((w == 0).all() for layer in model.layers for w in layer.node_relax.weights)


def test_regulariser_terms_per_layer():
    torch.manual_seed(3)
    n_layers = 2
    model = SEGNN(hidden_features=8, lmax=1, n_layers=n_layers, relaxed=True).to(DT)
    set_theta(model, 1.0)
    loc, vel, q = nbody_inputs()

    def terms():
        model.train()(loc, vel, q)
        per_layer = [m.regularizers() for m in relaxed_layers(model)]
        grouped = model_regularizers(model)  # same-shape layers come back as one grouped entry
        assert len(per_layer) == n_layers and grouped
        for field in ("lie_derivative", "projection"):
            total = sum(getattr(t, field) for t in per_layer)
            assert torch.allclose(sum(getattr(t, field) for t in grouped), total, rtol=1e-10, atol=1e-30)
        return per_layer

    assert all(t.lie_derivative.abs() < 1e-20 and t.projection.abs() < 1e-20 for t in terms())  # W_r = 0
    _randomise_relaxation(model)
    assert all(t.lie_derivative > 1e-3 and t.projection > 1e-3 for t in terms())
    with torch.no_grad():  # W_r = an equivariant map of the same irreps: no Lie derivative, still a projection error
        for layer in relaxed_layers(model):
            eq = EquivariantLinear(layer.irreps_in, layer.irreps_out, bias=False, dtype=DT)
            layer.weight_relax.copy_(eq.equivariant_matrix())
    for t in terms():
        print(f"R_LD = {t.lie_derivative.item():.3g}, R_N = {t.projection.item():.3g}")
        assert t.lie_derivative.abs() < 1e-10 and t.projection > 1e-3


def test_a_few_training_steps_reduce_the_nbody_error():
    # the task's frames (30 → 40) for 64 systems; load_nbody would generate all 7000 systems first (~20 s)
    data = nbody.make_split(64, 0)
    torch.manual_seed(4)
    model = SEGNN(hidden_features=16, lmax=1, n_layers=2, relaxed=True)
    set_theta(model, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.mse_loss(model(data.loc, data.vel, data.charges), data.target)
        reg = combine_regularizers(model_regularizers(model), 1e-2, 1e-2, "paper")
        opt.zero_grad()
        (loss + reg).backward()
        opt.step()
        assert torch.isfinite(loss) and torch.isfinite(reg)
        losses.append(loss.item())
    print("losses", [round(v, 4) for v in losses[::4]])
    assert losses[-1] < 0.8 * losses[0], losses[::4]
    assert any(layer.weight_relax.abs().max() > 0 for layer in relaxed_layers(model))  # the relaxation trains


def test_bad_arguments_name_the_shapes():
    model = SEGNN(hidden_features=4, lmax=1, n_layers=1)
    with pytest.raises(ValueError, match="charges \\[B, n, 1\\]"):
        model(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="positive ints"):
        SEGNN(hidden_features=0)
    with pytest.raises(ValueError, match="lmax"):
        SEGNN(lmax=0)


def test_without_e3nn_models_import_and_segnn_says_what_to_install():
    code = ("import sys; sys.modules['e3nn'] = None\n"
            "import relaxeq_fast.models as m\n"
            "try:\n    m.SEGNN()\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "SEGNN needs e3nn: pip install 'relaxeq_fast[e3nn]'" in out.stdout
