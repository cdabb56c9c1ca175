"""The relaxed E(n)-GNN (relaxeq_fast.models.egnn): the layer against the EGNN-vel equations written out here, E(3)
equivariance at θ = 0 and after projection (float64), broken by a random relaxation, its regulariser, and
a few training steps on N-body trajectories."""
import pytest
import torch

from relaxeq_fast.data import nbody
from relaxeq_fast.models.egnn import EGNN
from relaxeq_fast.regularizer import combine_regularizers
from testing import assert_projection_is_the_model_at_theta_zero, e3_error, nbody_inputs
from relaxeq_fast.vn import model_regularizers, set_theta

pytestmark = pytest.mark.usefixtures("single_thread")
DT = torch.float64



def _randomise_relaxation(model, std=0.3):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_relax"):
                p.normal_(std=std)
            if name.endswith("coord_mlp.2.weight"):  # larger coordinate steps than the init: a sharper test
                p.normal_(std=0.3)



@pytest.mark.parametrize("norm_diff", [False, True])
def test_layer_is_the_egnn_vel_update(norm_diff):
    """The plain layers against the EGNN-vel equations (eq. 7 of Satorras et al.) written out with their
    sub-networks (not their forward): every layer scales the *input* velocities (not the previous layer's v); the
    first two of three layers update x and h, the last one x only (its h reaches no output); norm_diff divides
    x_i − x_j by |x_i − x_j| + 1 in the coordinate update only."""
    torch.manual_seed(0)
    model = EGNN(hidden=8, n_layers=3, norm_diff=norm_diff).to(DT)
    loc, vel, q = nbody_inputs()
    h = model.embedding(vel.norm(dim=-1, keepdim=True))
    B, n = loc.shape[:2]
    for layer in model.layers:
        x_new, h_new = torch.empty_like(loc), torch.empty_like(h)
        for b in range(B):
            for i in range(n):
                agg, msum = torch.zeros(3, dtype=DT), torch.zeros(8, dtype=DT)
                for j in range(n):
                    if j == i:
                        continue
                    d = loc[b, i] - loc[b, j]
                    m = layer.edge_mlp(torch.cat([h[b, i], h[b, j], d.square().sum()[None], q[b, i] * q[b, j]]))
                    agg = agg + (d / (d.norm() + 1) if norm_diff else d) * layer.coord_mlp(m)
                    msum = msum + m
                x_new[b, i] = loc[b, i] + layer.vel_mlp(h[b, i]) * vel[b, i] + agg / (n - 1)
                h_new[b, i] = h[b, i] + layer.node_mlp(torch.cat([h[b, i], msum])) if layer.node_mlp is not None \
                    else h[b, i]
        loc, h = x_new, h_new
    assert model.layers[1].node_mlp is not None and model.layers[2].node_mlp is None
    assert (model(*nbody_inputs()) - loc).abs().max() < 1e-12
    x0, v0, q0 = nbody_inputs()
    x0.requires_grad_()
    model(x0, v0, q0).square().sum().backward()  # norm_diff: |x_i − x_i| = 0 must not give a nan gradient
    assert torch.isfinite(x0.grad).all() and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                                 if p.grad is not None)


@pytest.mark.parametrize("norm_diff", [False, True])
@pytest.mark.parametrize("relaxed", [False, True])
def test_e3_equivariant_at_theta_zero_and_after_projection(relaxed, norm_diff):
    torch.manual_seed(1)
    model = EGNN(hidden=16, n_layers=3, relaxed=relaxed, norm_diff=norm_diff).to(DT)
    _randomise_relaxation(model)
    loc, vel, q = nbody_inputs()
    if relaxed:
        set_theta(model, 1.0)
        broken = e3_error(model, loc, vel, q)
        assert broken > 1e-3, broken  # a random relaxation breaks rotation equivariance
        set_theta(model, 0.0)
    assert e3_error(model, loc, vel, q) < 1e-10
    if relaxed:
        assert_projection_is_the_model_at_theta_zero(model, loc, vel, q)


def test_regulariser_vanishes_for_an_equivariant_relaxation():
    torch.manual_seed(2)
    model = EGNN(hidden=8, n_layers=2, relaxed=True).to(DT)
    set_theta(model, 1.0)
    loc, vel, q = nbody_inputs()
    with torch.no_grad():
        for layer in model.layers:
            w = torch.randn(1, 2, dtype=DT)
            layer.vector_map.weight_relax.copy_(torch.kron(w, torch.eye(3, dtype=DT)))  # W_r = w ⊗ I₃
            layer.vector_map.bias_relax.zero_()
    model.train()(loc, vel, q)
    terms = model_regularizers(model)
    # same-shape layers: one grouped term. Zero up to the rounding of the closed form's cancelling terms
    # (⟨W H, W⟩ − 2⟨W G, V⟩ + ⟨Cas W G, W⟩, each of the size of R_N): float64, relative to R_N
    assert terms and all(t.lie_derivative.abs() < 1e-12 * t.projection for t in terms)
    _randomise_relaxation(model)
    model(loc, vel, q)
    assert all(t.lie_derivative > 1e-3 for t in model_regularizers(model))


def test_a_few_training_steps_reduce_the_nbody_error():
    loc, vel, charges, _ = nbody.simulate(64, 0)  # the task's frames: 30 → 40
    x_in, v_in, x_out = (t.float() for t in (loc[:, nbody.INPUT_FRAME], vel[:, nbody.INPUT_FRAME],
                                             loc[:, nbody.TARGET_FRAME]))
    q = charges[..., None].float()
    torch.manual_seed(3)
    model = EGNN(hidden=16, n_layers=2, relaxed=True)
    set_theta(model, 1.0)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(x_in, v_in, q), x_out)
        reg = combine_regularizers(model_regularizers(model), lambda_ld=1e-2, lambda_n=1e-3)
        opt.zero_grad()
        (loss + reg).backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses[::5]


def test_bad_inputs_name_the_shapes():
    model = EGNN(hidden=4, n_layers=1)
    with pytest.raises(ValueError, match="charges \\[B, n, 1\\]"):
        model(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match="positive ints"):
        EGNN(hidden=0)
