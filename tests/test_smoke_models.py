"""RSteer's convolution (relaxeq_fast.steerable.rsteer) and the smoke-plume forecasters (relaxeq_fast.models.smoke):
RSteer against the dense steerable basis and against R2Conv when its coefficients agree over the positions,
exact 90° equivariance of the steerable forecasters (float64), the relaxed branch through one relaxed_conv2d
call per layer, its regulariser, projection back to the exact / RSteer models, and bad arguments."""
import copy

import pytest
import torch

from relaxeq_fast.data.smoke import rotate_fields
from relaxeq_fast.models import ConvForecaster, SteerableForecaster
from relaxeq_fast.models.smoke import rollout
from relaxeq_fast.steerable import (FieldType, R2Conv, RelaxedR2Conv, RelaxedRSteerConv, RSteerConv, kernel_basis,
                                    kernel_defect)
from relaxeq_fast.vn import model_regularizers, project, relax, relaxed_layers, set_theta

F64 = torch.float64
VELOCITY_IN, HIDDEN = FieldType.irreps(4, [1], 3), FieldType.regular(4, 2)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rot90_fields(x, ftype):
    """A feature map x [B, C, H, W] of field type ftype turned by 90°: the grid and ρ(π/2) on the channels."""
    rho = ftype.representation(torch.pi / 2).to(x)
    return torch.einsum("oc,bchw->bohw", rho, torch.rot90(x, 1, dims=(-2, -1)))


@pytest.mark.parametrize("t_in, t_out", [(VELOCITY_IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, FieldType.irreps(4, [1]))])
def test_rsteer_kernel_is_the_basis_with_coefficients_per_position(t_in, t_out):
    torch.manual_seed(0)
    conv = RSteerConv(t_in, t_out, 3).double()
    basis = kernel_basis(t_in, t_out, 3)  # dense [n_basis, O, I, k, k]
    expected = torch.einsum("bkl,boikl->oikl", conv.weight.detach(), basis)
    assert conv.expand()[0].detach().allclose(expected, rtol=0, atol=1e-12)
    x = torch.randn(2, t_in.dim, 7, 7, dtype=F64)
    assert conv(x).allclose(torch.nn.functional.conv2d(x, expected, conv.expand()[1], padding=1), atol=1e-12)


def test_rsteer_with_equal_coefficients_is_the_exact_steerable_conv():
    torch.manual_seed(1)
    exact = R2Conv(VELOCITY_IN, HIDDEN, 3).double()
    with torch.no_grad():
        exact.bias.normal_()
    rs = RSteerConv.from_r2conv(exact)
    x = torch.randn(3, VELOCITY_IN.dim, 9, 9, dtype=F64)
    assert rel(rs(x), exact(x)) < 1e-10
    assert rs.coefficient_penalty().item() == 0.0
    assert rel(rs(rot90_fields(x, VELOCITY_IN)), rot90_fields(rs(x), HIDDEN)) < 1e-10


def test_rsteer_with_varying_coefficients_breaks_the_symmetry_and_is_penalised():
    torch.manual_seed(2)
    rs = RSteerConv(VELOCITY_IN, HIDDEN, 3).double()
    x = torch.randn(3, VELOCITY_IN.dim, 9, 9, dtype=F64)
    err = rel(rs(rot90_fields(x, VELOCITY_IN)), rot90_fields(rs(x), HIDDEN))
    print(f"90° equivariance error with independent coefficients per position: {err:.3g}")
    assert err > 1e-2
    # the penalty: mean |w_b(p) − w_b(p')| over horizontally and vertically adjacent positions, by loops
    w, k = rs.weight.detach(), 3
    diffs = [(w[:, a, b] - w[:, a, b + 1]).abs() for a in range(k) for b in range(k - 1)]
    diffs += [(w[:, a, b] - w[:, a + 1, b]).abs() for a in range(k - 1) for b in range(k)]
    expected = torch.cat(diffs).mean()
    assert rs.coefficient_penalty().item() == pytest.approx(expected.item(), rel=1e-12) and expected > 0


def _window(b=2, frames=3, size=10, seed=0):
    return torch.randn(b, frames, 2, size, size, dtype=F64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layers", [2, 3])
def test_steerable_forecaster_is_exactly_equivariant_to_quarter_turns_over_a_rollout(layers):
    torch.manual_seed(3)
    model = SteerableForecaster(input_frames=3, hidden=2, layers=layers).double()
    x = _window()
    y = model(x, 4)
    assert y.shape == (2, 4, 2, 10, 10)
    for q in (1, 2, 3):
        assert rel(model(rotate_fields(x, q), 4), rotate_fields(y, q)) < 1e-10


def test_rollout_feeds_each_prediction_back():
    torch.manual_seed(4)
    model = SteerableForecaster(input_frames=3, hidden=2, layers=2).double()
    x = _window()
    window, preds = x.clone(), []
    for _ in range(3):  # by hand: predict, append, drop the oldest frame
        p = model.step(window.flatten(1, 2)).unflatten(1, (1, 2))
        preds.append(p)
        window = torch.cat((window[:, 1:], p), 1)
    assert torch.equal(model(x, 3), torch.cat(preds, 1))
    assert torch.equal(rollout(model.step, x, 3), model(x, 3))


@pytest.mark.parametrize("rsteer", [False, True])
def test_relaxed_forecaster_is_the_model_at_theta_zero_and_projects_to_its_class(rsteer):
    torch.manual_seed(5)
    plain = SteerableForecaster(input_frames=3, hidden=2, layers=3, rsteer=rsteer).double()
    relaxed = relax(copy.deepcopy(plain), relax_init="default")
    twin = RelaxedRSteerConv if rsteer else RelaxedR2Conv
    assert [type(m) for m in relaxed_layers(relaxed)] == [twin] * 3
    x = _window()
    broken = rel(relaxed(rotate_fields(x), 2), rotate_fields(relaxed(x, 2)))
    print(f"equivariance error at θ = 1 with a random B: {broken:.3g}")
    assert broken > 1e-2
    set_theta(relaxed, 0.0)
    assert rel(relaxed(x, 2), plain(x, 2)) < 1e-12
    projected = project(copy.deepcopy(relaxed))
    conv_class = RSteerConv if rsteer else R2Conv
    assert [type(m) for m in projected.modules() if isinstance(m, R2Conv)] == [conv_class] * 3
    assert rel(projected(x, 2), relaxed(x, 2)) < 1e-12
    # the projected state_dict loads strictly into the plain model class
    fresh = SteerableForecaster(input_frames=3, hidden=2, layers=3, rsteer=rsteer).double()
    fresh.load_state_dict(projected.state_dict())
    assert rel(fresh(x, 2), plain(x, 2)) < 1e-12
    if not rsteer:
        assert rel(projected(rotate_fields(x), 2), rotate_fields(projected(x, 2))) < 1e-10


def test_nearest_projection_of_relaxed_rsteer_adds_the_equivariant_part_at_every_position():
    torch.manual_seed(6)
    layer = RelaxedRSteerConv(VELOCITY_IN, HIDDEN, 3, relax_init="default", theta=0.4).double()
    near = layer.project("nearest")
    K_relaxed = layer.expand()[0] + 0.4 * layer.weight_relax
    P_eq_B = layer.expand(layer.basis_coefficients(layer.weight_relax))[0]
    assert type(near) is RSteerConv
    assert near.expand()[0].detach().allclose((layer.expand()[0] + 0.4 * P_eq_B).detach(), atol=1e-12)
    # what is left is the non-equivariant part of θB: orthogonal to every steerable kernel
    resid = (K_relaxed - near.expand()[0]).detach()
    assert layer.basis_coefficients(resid).abs().max() < 1e-8 * resid.norm()  # the basis is orthonormal to ~1e-10


def test_relaxed_rsteer_runs_one_fused_call_per_layer_with_the_defect(monkeypatch):
    import relaxeq_fast.steerable.conv as conv_module
    calls = []
    real = conv_module.relaxed_conv2d

    def counting(x, M, b=None, D=None, *args, **kwargs):
        calls.append(D is not None)
        return real(x, M, b, D, *args, **kwargs)

    monkeypatch.setattr(conv_module, "relaxed_conv2d", counting)
    torch.manual_seed(7)
    model = SteerableForecaster(input_frames=3, hidden=2, layers=3, rsteer=True, relaxed=True,
                                relax_kwargs=dict(relax_init="default")).double().train()
    model(_window(), 1)
    assert calls == [True, True, True]  # one call per layer, each with its defect kernel
    terms = model_regularizers(model)
    assert len(terms) == 3 and all(t.lie_derivative > 0 for t in terms)


@pytest.mark.parametrize("track_defect", [True, False])
def test_relaxed_rsteer_regulariser_vanishes_for_an_equivariant_branch(track_defect):
    torch.manual_seed(8)
    layer = RelaxedRSteerConv(VELOCITY_IN, HIDDEN, 3, track_defect=track_defect).double().train()
    with torch.no_grad():  # B an exact steerable kernel
        layer.weight_relax.copy_(layer.expand(torch.randn(layer.n_basis, dtype=F64))[0])
    layer(torch.randn(2, VELOCITY_IN.dim, 8, 8, dtype=F64))
    terms = layer.regularizers()
    assert terms.lie_derivative.abs().item() < 1e-20 and terms.projection > 0
    if not track_defect:  # weight mode by default: ‖D(B)‖² of the defect operator
        with torch.no_grad():
            layer.weight_relax.normal_()
        D = kernel_defect(layer.weight_relax.detach(), VELOCITY_IN, HIDDEN)
        assert layer.regularizers().lie_derivative.item() == pytest.approx(D.square().sum().item(), rel=1e-12)


def test_auxiliary_loss_is_alpha_times_the_layers_penalties():
    torch.manual_seed(9)
    model = SteerableForecaster(input_frames=3, hidden=2, layers=3, rsteer=True, alpha=0.25).double()
    penalties = [m.coefficient_penalty() for m in model.modules() if isinstance(m, RSteerConv)]
    assert len(penalties) == 3
    assert model.auxiliary_loss().item() == pytest.approx(0.25 * sum(p.item() for p in penalties), rel=1e-12)
    assert SteerableForecaster(input_frames=3, hidden=2, layers=3).auxiliary_loss().item() == 0.0


def test_plain_cnn_has_nothing_to_relax_and_is_not_equivariant():
    torch.manual_seed(10)
    cnn = ConvForecaster(input_frames=3, hidden_channels=8, layers=3).double()
    assert not list(relaxed_layers(relax(cnn)))
    x = _window()
    assert rel(cnn(rotate_fields(x), 1), rotate_fields(cnn(x), 1)) > 1e-2


@pytest.mark.parametrize("kwargs, message", [
    (dict(group=1), "group must be an int N >= 2"),
    (dict(layers=1), "layers must be an int >= 2"),
    (dict(hidden=0), "hidden must be a positive int"),
    (dict(width=0.0), "width must be a positive number"),
    (dict(alpha=-1.0), "alpha must be >= 0"),
])
def test_bad_forecaster_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SteerableForecaster(**kwargs)


def test_bad_forecaster_inputs():
    model = SteerableForecaster(input_frames=3, hidden=2, layers=2)
    with pytest.raises(ValueError, match=r"frames must hold input_frames = 3 frames, got 4"):
        model(torch.randn(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match=r"frames must have shape \[B, T, 2, H, W\]"):
        model(torch.randn(1, 3, 3, 8, 8))
    with pytest.raises(ValueError, match="steps must be a positive int, got 0"):
        model(torch.randn(1, 3, 2, 8, 8), 0)


def test_relaxed_rsteer_complement_kernel_against_the_dense_basis():
    """relax_space="complement" on RSteer: kernel K_RSteer + θ (B − P_eq B), P_eq the least-squares projection onto
    the (orthonormal, dense) steerable basis, subtracted from the coefficients at every position."""
    torch.manual_seed(11)
    layer = RelaxedRSteerConv(VELOCITY_IN, HIDDEN, 3, relax_init="default", theta=0.6, relax_space="complement").double()
    basis = kernel_basis(VELOCITY_IN, HIDDEN, 3)
    B = layer.weight_relax.detach()
    P_eq_B = torch.einsum("b,boikl->oikl", torch.einsum("oikl,boikl->b", B, basis), basis)
    expected = torch.einsum("bkl,boikl->oikl", layer.weight.detach(), basis) + 0.6 * (B - P_eq_B)
    x = torch.randn(2, VELOCITY_IN.dim, 7, 7, dtype=F64)
    want = torch.nn.functional.conv2d(x, expected, layer.expand()[1].detach(), padding=1)
    assert rel(layer.eval()(x).detach(), want) < 1e-7  # the basis is orthonormal to ~1e-9 (the projection assumes it)
