"""se3-transformer-pytorch interop (relaxeq_fast.interop.se3t): relaxed LinearSE3 maps against the library's own.

References: the library model itself (outputs, gradients, its SE(3) behaviour under rotated and translated
coordinates), its own spherical harmonics for the rotation of its degree-d features (so the Lie derivative is taken
with the library's generators, not ours), float64 throughout. The library's own equivariance error in float64 is
~1e-9 (its cached kernel-basis matrices are float32 numbers): "equivariant" below means "as the library model".
Skipped with the reason where the library is not installed.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch

se3t = pytest.importorskip("se3_transformer_pytorch",
                           reason="se3-transformer-pytorch is not installed (pip install 'relaxeq_fast[se3t]')")

from relaxeq_fast.backend import use_backend  # noqa: E402
from relaxeq_fast.interop.se3t import RelaxedLinearSE3, library_basis, library_rotation  # noqa: E402
from relaxeq_fast.reps import random_rotation, so3_generators  # noqa: E402
from relaxeq_fast.vn import model_regularizers, project, relax, set_theta  # noqa: E402
from testing import assert_close_scaled  # noqa: E402


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _model(seed=0, num_degrees=3):
    torch.manual_seed(seed)
    # tiny, and splits=1 (the library's default chunking makes a CPU forward 3× slower)
    return se3t.SE3Transformer(dim=4, depth=1, heads=1, dim_head=2, input_degrees=2, num_degrees=num_degrees,
                               output_degrees=2, reduce_dim_out=True, num_neighbors=3, splits=1)


def _inputs(seed=1, b=1, n=5, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    f0, f1, coors = torch.randn(b, n, 4, 1, generator=g), torch.randn(b, n, 4, 3, generator=g), torch.randn(
        b, n, 3, generator=g)
    return [t.requires_grad_(requires_grad) for t in (f0, f1, coors)]


def _run(model, f0, f1, coors):
    return model({"0": f0, "1": f1}, coors, return_type=1)


def _se3_error(model, seed=3) -> float:
    """max |f(R x + t) − R f(x)| / max |f(x)| for the type-1 output, coordinates and type-1 inputs rotated."""
    f0, f1, coors = _inputs()
    R = random_rotation(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = _run(model, f0, f1, coors)
        moved = _run(model, f0, f1 @ R.T, coors @ R.T + torch.tensor([0.3, -1.2, 0.7]))
    return float((moved - out @ R.T).abs().max() / out.abs().max())


def _relaxed(model):
    return [m for m in model.modules() if isinstance(m, RelaxedLinearSE3)]


def _randomise(model, seed=2, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _relaxed(model):
            m.weight_relax.copy_(scale * torch.randn(m.weight_relax.shape, generator=g))
            m.bias_relax.copy_(scale * torch.randn(m.bias_relax.shape, generator=g))


def test_library_features_are_in_our_basis():
    """The measured change of basis is orthogonal and, for se3-transformer-pytorch 0.9, the identity: the library's
    degree-d features rotate as our irreps (and type-1 features as Cartesian vectors)."""
    for d in range(4):
        T = library_basis(d)
        torch.testing.assert_close(T @ T.T, torch.eye(2 * d + 1), rtol=0, atol=1e-12)
    R = random_rotation(generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(library_rotation(1, R), R, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="degree 4"):
        library_basis(4)


def test_relaxed_at_theta_zero_is_the_original():
    """Every LinearSE3 is relaxed; at θ = 0 (random W_r, b_r) and at W_r = b_r = 0 (θ = 1) outputs and input
    gradients (features and coordinates) equal the library model's to 1e-10."""
    original = _model()
    n_linear = sum(type(m).__name__ == "LinearSE3" for m in original.modules())
    relaxed = relax(copy.deepcopy(original))
    assert len(_relaxed(relaxed)) == n_linear > 0
    assert not any(type(m).__name__ == "LinearSE3" for m in relaxed.modules())
    for setting in ("theta0", "zero_branch"):
        if setting == "theta0":
            _randomise(relaxed)
            set_theta(relaxed, 0.0)
        else:
            set_theta(relaxed, 1.0)
            for m in _relaxed(relaxed):
                m.reset_relaxation()
        inputs = _inputs(requires_grad=True)
        y_ref = _run(original, *inputs)
        g_ref = torch.autograd.grad(y_ref.square().sum(), inputs)
        y = _run(relaxed, *inputs)
        g = torch.autograd.grad(y.square().sum(), inputs)
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_random_relaxation_breaks_se3_and_projection_restores_it():
    """θ = 1 with random W_r: the type-1 output is no longer SE(3)-equivariant. Projected ("drop", "nearest"): the
    library's classes again, the state_dict loads into the original architecture, and the SE(3) error is the library
    model's own."""
    original = _model()
    baseline = max(_se3_error(original), 1e-12)
    assert baseline < 1e-7
    relaxed = relax(copy.deepcopy(original))
    _randomise(relaxed)
    assert _se3_error(relaxed) > 1e-3
    for mode in ("drop", "nearest"):
        projected = project(copy.deepcopy(relaxed), mode)
        assert not _relaxed(projected)
        assert sum(type(m).__name__ == "LinearSE3" and type(m).__module__.startswith("se3_transformer_pytorch")
                   for m in projected.modules()) == len(_relaxed(relaxed))
        assert _se3_error(projected) < 10 * baseline
        # laid out as the library's own parameters, so a matmul sums in the same order (bit-for-bit below)
        assert all(p.is_contiguous() for p in projected.parameters())
        fresh = _model(seed=9)
        assert set(fresh.state_dict()) == set(projected.state_dict())
        fresh.load_state_dict(projected.state_dict())  # strict
        inputs = _inputs()
        with torch.no_grad():
            torch.testing.assert_close(_run(fresh, *inputs), _run(projected, *inputs), rtol=0, atol=0)
    drop = project(copy.deepcopy(relaxed), "drop")
    with torch.no_grad():
        torch.testing.assert_close(_run(drop, *_inputs()), _run(original, *_inputs()), rtol=0, atol=1e-12)


def test_regulariser_vanishes_for_equivariant_relaxation_weights():
    """W_r of the form ⊕ w ⊗ I (b_r = 0): R_LD is 0 to rounding, against a random W_r's."""
    relaxed = relax(_model())
    r = {}
    for which in ("equivariant", "random"):
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for m in _relaxed(relaxed):
                w = [torch.randn(p.shape, generator=g) for p in m.weights]
                m.weight_relax.copy_(m.equivariant_matrix(w) if which == "equivariant"
                                     else torch.randn(m.weight_relax.shape, generator=g))
                m.bias_relax.zero_()
        relaxed.train()
        _run(relaxed, *_inputs())
        r[which] = [float(t.lie_derivative) for t in model_regularizers(relaxed)]
    assert len(r["random"]) == len(_relaxed(relaxed))
    for eq, rand in zip(r["equivariant"], r["random"]):
        assert rand > 1e-3 and eq < 1e-20 * rand, (eq, rand)


def _library_generators(degrees):
    """Dense generators [3, D, D] of the library's feature rotation on the flattened layout (degrees ascending,
    [c, 2d + 1] each), from its own harmonics: d/dt D_lib(exp(t G_k)) at 0 by a central difference (h = 1e-5)."""
    G = so3_generators()
    h = 1e-5
    out = []
    for k in range(3):
        blocks = []
        for d, c in degrees:
            plus = library_rotation(d, torch.linalg.matrix_exp(h * G[k]))
            minus = library_rotation(d, torch.linalg.matrix_exp(-h * G[k]))
            blocks.append(torch.kron(torch.eye(c), (plus - minus) / (2 * h)))
        out.append(torch.block_diag(*blocks))
    return torch.stack(out)


def test_closed_form_r_ld_is_the_lie_derivative_under_the_librarys_rotations():
    """θ² R_LD (ours, closed form, data mode) = Σ_k Σ_rows ‖J_f(x) A_in,k x − A_out,k f(x)‖² by jvp, with A the
    generators of the library's own feature rotations (its harmonics), on a relaxed LinearSE3 with degrees 0-3."""
    lin = se3t.se3_transformer_pytorch.LinearSE3(se3t.se3_transformer_pytorch.Fiber.create(4, 3),
                                                   se3t.se3_transformer_pytorch.Fiber.create(4, 2))
    layer = RelaxedLinearSE3.from_plain(lin, theta=0.7)
    _randomise(layer)
    degrees_in = [(int(k), c) for k, c, _ in sorted(layer.degrees, key=lambda t: int(t[0]))]
    degrees_out = [(int(k), c) for k, _, c in sorted(layer.degrees, key=lambda t: int(t[0]))]
    A_in, A_out = _library_generators(degrees_in), _library_generators(degrees_out)
    g = torch.Generator().manual_seed(6)
    x = {str(d): torch.randn(1, 40, c, 2 * d + 1, generator=g) for d, c in degrees_in}
    flat = torch.cat([x[str(d)].reshape(1, 40, -1) for d, _ in degrees_in], -1)

    def f(x_flat):
        parts, start = {}, 0
        for d, c in degrees_in:
            parts[str(d)] = x_flat[..., start:start + c * (2 * d + 1)].reshape(*x_flat.shape[:-1], c, 2 * d + 1)
            start += c * (2 * d + 1)
        y = layer(parts)
        return torch.cat([y[str(d)].reshape(*x_flat.shape[:-1], -1) for d, _ in degrees_out], -1)

    layer.train()
    with use_backend("reference"):  # jvp needs forward-mode AD: the pure-PyTorch path has it
        layer(x)
        terms = layer.regularizers()
        total = 0.0
        for k in range(3):
            fx, jv = torch.func.jvp(f, (flat,), (flat @ A_in[k].T,))
            total = total + ((jv - fx @ A_out[k].T) ** 2).sum()
    assert terms.lie_derivative.item() > 1e-3
    assert_close_scaled(0.7 ** 2 * terms.lie_derivative, total, 1e-8, "θ² R_LD vs library-generator jvp")


def test_unrelaxed_degrees_and_bad_inputs():
    """A feature dict lacking one of the layer's degrees is refused naming the degrees; extra degrees are ignored
    as the library ignores them."""
    lin = se3t.se3_transformer_pytorch.LinearSE3(se3t.se3_transformer_pytorch.Fiber.create(2, 3),
                                                   se3t.se3_transformer_pytorch.Fiber.create(2, 3))
    layer = RelaxedLinearSE3.from_plain(lin)
    x = {"0": torch.randn(1, 2, 3, 1), "1": torch.randn(1, 2, 3, 3), "2": torch.randn(1, 2, 3, 5)}
    assert set(layer(x)) == {"0", "1"}
    torch.testing.assert_close(layer(x)["1"], lin(x)["1"], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"degrees \['0', '1'\]"):
        layer({"0": x["0"]})


def test_training_steps_lower_the_loss_and_copy():
    """A few optimiser steps with the regulariser (θ = 1) lower the task loss; deepcopy keeps outputs."""
    from relaxeq_fast import combine_regularizers
    model = relax(_model(), relax_init="default")
    # 3e-3 overshoots on the third step for one sign of the library's bases (6.46, 5.08, 7.06); 1e-3 falls with either
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    f0, f1, coors = _inputs()
    target = torch.randn(1, 5, 3, generator=torch.Generator().manual_seed(8))
    losses = []
    for _ in range(3):
        opt.zero_grad()
        task = (_run(model, f0, f1, coors) - target).square().mean()
        (task + combine_regularizers(model_regularizers(model), lambda_ld=1e-3, lambda_n=1e-3)).backward()
        opt.step()
        losses.append(float(task))
    assert losses[-1] < losses[0], losses
    clone = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(_run(clone, f0, f1, coors), _run(model, f0, f1, coors), rtol=0, atol=0)
    assert math.isfinite(losses[-1])


def test_nbody_model_refuses_weights_made_under_other_kernel_bases(monkeypatch):
    """The library's basis Q_J for (J, d_in, d_out) = (1, 1, 1) with the other sign (as a process with another
    thread count computes and caches it) changes the function of the same weights; SE3TransformerNBody's state_dict
    records its bases: it loads where they are the same (same outputs) and is refused, naming the basis, where they
    are not. A checkpoint without the record loads, with a warning."""
    from relaxeq_fast.models import SE3TransformerNBody
    from se3_transformer_pytorch import basis as lib_basis

    def build(seed):
        torch.manual_seed(seed)
        return SE3TransformerNBody(hidden=4, n_layers=1, heads=1, relaxed=True)

    g = torch.Generator().manual_seed(4)
    loc, vel, charges = torch.randn(1, 5, 3, generator=g), torch.randn(1, 5, 3, generator=g), torch.randn(
        1, 5, 1, generator=g)
    trained = build(0)
    with torch.no_grad():
        y = trained(loc, vel, charges)
        same = build(1)
        same.load_state_dict(trained.state_dict())
        torch.testing.assert_close(same(loc, vel, charges), y, rtol=0, atol=0)

    original = lib_basis.basis_transformation_Q_J

    def flipped(J, d_in, d_out, *args, **kwargs):
        q = original(J, d_in, d_out, *args, **kwargs)
        return -q if (J, d_in, d_out) == (1, 1, 1) else q
    monkeypatch.setattr(lib_basis, "basis_transformation_Q_J", flipped)
    with torch.no_grad():
        assert float((trained(loc, vel, charges) - y).abs().max()) > 1e-3  # the hazard is real
    other = build(2)
    with pytest.raises(RuntimeError, match=r"\(J, d_in, d_out\) = \(1, 1, 1\)\).*CACHE_PATH"):
        other.load_state_dict(trained.state_dict())
    old = {k: v for k, v in trained.state_dict().items() if k != "library_bases"}
    with pytest.warns(RuntimeWarning, match="cannot be checked"):
        other.load_state_dict(old)
