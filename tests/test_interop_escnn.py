"""escnn / e2cnn interop (relaxeq_fast.interop.escnn): relaxed library R2Convs against the library's own layers.

References: the library itself (its basis expansion, its representations, its GeometricTensor.transform and
check_equivariance), torch.rot90 / flips for the quarter-turn and flip defects, F.conv2d for the fused data-mode
regulariser, finite differences of the library's ρ(t) for the SO(2) Lie derivative. Everything in float64:
e2cnn allocates its multi-block kernels in the default dtype, so the tests set it (fixture ``float64``); escnn
builds its bases in float32 whatever the default, so its models are built in float32 and cast, and where the
defect operator is a pixel permutation (C_4, D_4) its kernels keep their float32 rounding: ``BASIS_DEFECT``.

e2cnn 0.2.3 builds C_N kernels under numpy 2 but not D_N, SO(2), O(2) ones (its basis hashing calls
``ndarray.tostring``, removed in numpy 2): those cases skip with that reason for e2cnn and run for escnn where
escnn imports.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

from relaxeq_fast.interop.escnn import _element, _expand, _kernel_samples, basis_coefficients, is_library_r2conv
from relaxeq_fast.relaxation import DualTheta, ThetaScheduler, make_schedule, relaxation_report
from relaxeq_fast.vn import model_regularizers, project, relax, set_theta
from testing import RecordOps

LIBS = ("e2cnn", "escnn")
# (group, fields): C_N with regular fields (exact pixel permutations for N = 4; the library-family interpolation
# for N = 8), irreps, D_4 (a rotation and a flip generator), SO(2) with bandlimited irreps (the Lie form)
CASES = [("C4", "regular"), ("C8", "regular"), ("C8", "irreps"), ("C3", "irreps"), ("D4", "regular"),
         ("SO2", "irreps")]
EXACT_CHECK = {"C4", "D4"}
# the relative defect of the library's own kernels: float64 bases (e2cnn here) have rounding; escnn's bases are
# float32 numbers, exactly symmetric under a fitted operator (C_8, SO(2)) but not under an exact permutation
BASIS_DEFECT = {"e2cnn": 1e-12, "escnn": 1e-6}  # groups whose testing elements all permute pixels: the library's check is exact


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _import(name):
    try:
        return importlib.import_module(name), importlib.import_module(f"{name}.nn"), importlib.import_module(
            f"{name}.gspaces")
    except ImportError as e:
        pytest.skip(f"{name} is not importable here ({e}); README 'escnn and e2cnn models' says how to install it")


def _gspace(lib: str, group: str):
    _, _, gspaces = _import(lib)
    e2 = lib == "e2cnn"
    if group.startswith("C"):
        return (gspaces.Rot2dOnR2 if e2 else gspaces.rot2dOnR2)(int(group[1:]))
    if group.startswith("D"):
        return (gspaces.FlipRot2dOnR2 if e2 else gspaces.flipRot2dOnR2)(int(group[1:]))
    if group == "SO2":
        return (gspaces.Rot2dOnR2 if e2 else gspaces.rot2dOnR2)(-1, maximum_frequency=4)
    raise AssertionError(group)


def _irreps(gs, group):
    if group.startswith("D"):
        return [gs.irrep(1, 1), gs.irrep(1, 2)]
    top = 2 if group != "C3" else 1
    return [gs.irrep(m) for m in range(1, top + 1)]


@contextlib.contextmanager
def _building(lib: str):
    """Library layers are built in float32 for escnn (it builds its bases in float32 and refuses another default
    dtype) and in the default float64 for e2cnn; cast with .double() after."""
    old = torch.get_default_dtype()
    if lib == "escnn":
        torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _model(lib: str, group: str, fields: str, seed: int = 0):
    """A small library CNN: R2Conv(5×5) → batch norm → nonlinearity → R2Conv(3×3) → nonlinearity → R2Conv(3×3)."""
    _, enn, _ = _import(lib)
    torch.manual_seed(seed)
    try:
        with _building(lib):
            gs = _gspace(lib, group)
            t0 = enn.FieldType(gs, 2 * [gs.trivial_repr])
            if fields == "regular":
                t1 = enn.FieldType(gs, 2 * [gs.regular_repr])
                layers = [enn.R2Conv(t0, t1, 5, padding=2), enn.InnerBatchNorm(t1), enn.ReLU(t1),
                          enn.R2Conv(t1, t1, 3, padding=1), enn.ReLU(t1), enn.R2Conv(t1, t0, 3, padding=1)]
            else:
                t1 = enn.FieldType(gs, _irreps(gs, group))
                layers = [enn.R2Conv(t0, t1, 5, padding=2), enn.NormBatchNorm(t1), enn.NormNonLinearity(t1),
                          enn.R2Conv(t1, t1, 3, padding=1), enn.NormNonLinearity(t1), enn.R2Conv(t1, t0, 3, padding=1)]
            model = enn.SequentialModule(*layers)
    except (AttributeError, ValueError) as e:
        if lib == "e2cnn" and ("tostring" in str(e) or "copy" in str(e)):
            pytest.skip(f"e2cnn 0.2.3 cannot build {group} kernels under numpy 2 ({e}); escnn can")
        raise
    model = model.double()
    for m in model.modules():  # batch-norm statistics that are not the identity
        if hasattr(m, "running_var") and m.running_var is not None:
            m.running_var.uniform_(0.5, 2.0)
    return model, t0, gs


def _input(lib, t0, seed=1, size=9, requires_grad=False):
    _, enn, _ = _import(lib)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, t0.size, size, size, generator=g).requires_grad_(requires_grad)
    return enn.GeometricTensor(x, t0), x


def _relaxed_convs(model):
    return [m for m in model.modules() if hasattr(m, "weight_relax")]


def _randomise_relaxation(model, seed=2, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in _relaxed_convs(model):
            m.weight_relax.copy_(scale * torch.randn(m.weight_relax.shape, generator=g))


def _quarter_turn(lib, gs, group):
    """The library's element of the rotation by π/2 (every case here contains it)."""
    G = gs.fibergroup
    value = {"C4": 1, "C8": 2, "D4": (0, 1), "SO2": math.pi / 2}.get(group)
    if value is None:
        pytest.skip(f"{group} has no quarter turn")
    return _element(G, lib, value)


def _transform(geo, element) -> torch.Tensor:
    """The library's own action ρ(g) f(g⁻¹ ·) on a GeometricTensor, in its dtype (e2cnn's ``transform`` returns
    float32: its numpy action is called directly)."""
    if type(geo).__module__.startswith("e2cnn"):
        t = geo.type
        moved = t.gspace.featurefield_action(geo.tensor.detach().numpy(), t.representation, element)
        return torch.from_numpy(moved.copy()).to(geo.tensor.dtype)
    return geo.transform(element).tensor


def _equivariance_error(model, x_geo, element) -> float:
    """max |f(g·x) − g·f(x)| / max |f(x)|, g acting through the library's own action."""
    model.eval()
    with torch.no_grad():
        y = model(x_geo)
        moved = type(x_geo)(_transform(x_geo, element), x_geo.type)
        err = (model(moved).tensor - _transform(y, element)).abs().max()
    return float(err / y.tensor.abs().max())


def _library_check(model, atol):
    """The library's own ``check_equivariance`` (raises AssertionError when it fails). It builds float32 inputs
    (e2cnn), so it runs on a float32 copy (made in training mode: e2cnn's eval-mode kernel cache is a non-leaf
    tensor, which deepcopy refuses)."""
    model.train()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        copy.deepcopy(model).float().eval().check_equivariance(atol=atol, rtol=atol)
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group,fields", CASES)
def test_relaxed_at_theta_zero_is_the_original(lib, group, fields, float64):
    """At θ = 0 (random B), and at B = 0 (θ = 1), outputs and input gradients equal the library model's, 1e-10."""
    model, t0, _ = _model(lib, group, fields)
    original = copy.deepcopy(model)
    relaxed = relax(model)
    assert len(_relaxed_convs(relaxed)) == 3
    assert all(is_library_r2conv(m) is False and isinstance(m, type(c)) for m, c in
               zip(_relaxed_convs(relaxed), [c for c in original.modules() if is_library_r2conv(c)]))
    for setting in ("theta0", "b0"):
        if setting == "theta0":
            _randomise_relaxation(relaxed)
            set_theta(relaxed, 0.0)
        else:
            set_theta(relaxed, 1.0)
            for m in _relaxed_convs(relaxed):
                m.weight_relax.data.zero_()
        for train in (True, False):
            relaxed.train(train), original.train(train)
            x_geo, x = _input(lib, t0, requires_grad=True)
            y_ref = original(x_geo).tensor
            (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
            y = relaxed(x_geo).tensor
            (g,) = torch.autograd.grad(y.square().sum(), x)
            torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-10)
            torch.testing.assert_close(g, g_ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group,fields", CASES)
def test_random_relaxation_breaks_equivariance_and_projection_restores_it(lib, group, fields, float64):
    """θ = 1 with a random B: not equivariant (the library's own check fails where it is exact); the projected
    model is the library's class again, its state_dict loads into the original architecture, and it is exactly
    equivariant: the quarter turn through the library's own action, as the library model itself (float64: 1e-10
    for e2cnn's float64 bases, ~1e-7 for escnn's float32 ones), and the library's check_equivariance where that is
    exact (float32, 1e-5)."""
    model, t0, gs = _model(lib, group, fields)
    fresh, _, _ = _model(lib, group, fields, seed=5)
    x_geo, _ = _input(lib, t0)
    g = _quarter_turn(lib, gs, group)
    # the library model's own error: rounding (float64 bases), or escnn's float32 bases (~1e-7)
    baseline = max(_equivariance_error(model, x_geo, g), 1e-11)
    assert baseline <= max(1e-11, 10 * BASIS_DEFECT[lib])
    model.train()
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    assert _equivariance_error(relaxed, x_geo, g) > 1e-3
    if group in EXACT_CHECK:
        with pytest.raises(AssertionError):
            _library_check(relaxed, 1e-4)
    for mode in ("drop", "nearest"):
        relaxed.train()  # (e2cnn's eval-mode cache is a non-leaf tensor: no deepcopy in eval mode)
        projected = project(copy.deepcopy(relaxed), mode)
        convs = [m for m in projected.modules() if is_library_r2conv(m)]
        assert len(convs) == 3 and not _relaxed_convs(projected)
        assert all(type(c).__module__.startswith(f"{lib}.") for c in convs)
        assert _equivariance_error(projected, x_geo, g) < 10 * baseline
        if group in EXACT_CHECK:
            _library_check(projected, 1e-5)  # float32
        fresh.eval(), projected.eval()  # the library's state_dict layout depends on the mode (its eval cache)
        sd = projected.state_dict()
        assert set(sd) == set(fresh.state_dict())
        fresh.load_state_dict(sd)  # strict: the original layout
        fresh.train(), fresh.eval()  # rebuild the library's kernel cache from the loaded weights
        with torch.no_grad():
            torch.testing.assert_close(fresh(x_geo).tensor, projected(x_geo).tensor, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group,fields", CASES)
def test_regulariser_vanishes_on_the_librarys_equivariant_kernels(lib, group, fields, float64):
    """R_LD (data and weight mode) of B = the library's own kernel (random coefficients) is 0 to rounding, relative
    to a random B's; the library's kernels have no defect under the operator (``basis_defect``)."""
    model, t0, _ = _model(lib, group, fields)
    relaxed = relax(model)
    x_geo, _ = _input(lib, t0)
    r = {}
    for which in ("equivariant", "random"):
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in _relaxed_convs(relaxed):
                w = torch.randn(m.weights.shape, generator=g)
                m.weight_relax.copy_(_expand(m, w) if which == "equivariant" else torch.randn(m.weight_relax.shape,
                                                                                              generator=g))
        relaxed.train()
        relaxed(x_geo)
        r[which] = ([float(t.lie_derivative) for t in model_regularizers(relaxed)],
                    [float(t.lie_derivative) for t in model_regularizers(relaxed, data_free=True)])
    tol = BASIS_DEFECT[lib]
    for mode in (0, 1):
        for eq, rand in zip(r["equivariant"][mode], r["random"][mode]):
            assert rand > 1e-3 and eq < tol ** 2 * rand, (mode, eq, rand)  # R_LD is quadratic in the defect
    assert all(m.basis_defect < tol for m in _relaxed_convs(relaxed))


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group,fields", CASES)
def test_data_mode_regulariser_is_the_defect_convolution(lib, group, fields, float64):
    """The fused pass's R_LD equals Σ conv2d(x̂, D(B))² (F.conv2d) with D(B) stacked over the generators, and its
    gradient in B equals that of the direct form."""
    model, t0, _ = _model(lib, group, fields)
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    conv = _relaxed_convs(relaxed)[0]
    x_geo, x = _input(lib, t0)
    conv.train()
    conv(x_geo)
    r, rows = conv.last_defect
    D = conv.defect()
    n_generators = 2 if group.startswith("D") else 1
    assert D.shape[0] == n_generators * conv.out_type.size
    direct = F.conv2d(x, D, padding=conv.padding).square().sum()
    torch.testing.assert_close(r, direct, rtol=1e-12, atol=0)
    assert rows == x.shape[0] * x.shape[2] * x.shape[3]
    (g_fused,) = torch.autograd.grad(r, conv.weight_relax)
    (g_direct,) = torch.autograd.grad(direct, conv.weight_relax)
    torch.testing.assert_close(g_fused, g_direct, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group", ["C4", "D4"])
def test_quarter_turn_and_flip_defects_are_the_rotated_kernels(lib, group, float64):
    """For C_4 / D_4 the defect is exact: ρ_out(g) B(g⁻¹·) ρ_in(g)⁻¹ − B with the pixels moved by torch.rot90 (and
    the library's flip, checked against torch.flip), not through the package's operators."""
    model, _, gs = _model(lib, group, "regular")
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    conv = _relaxed_convs(relaxed)[1]
    B = conv.weight_relax.detach()
    O = conv.out_type.size
    G = gs.fibergroup
    rot = _element(G, lib, 1 if group == "C4" else (0, 1))
    rho = lambda t, g: torch.as_tensor(t.representation(g))  # noqa: E731
    expected = [torch.einsum("oa,aikl,bi->obkl", rho(conv.out_type, rot), torch.rot90(B, 1, dims=(-2, -1)),
                             rho(conv.in_type, rot)) - B]
    if group == "D4":
        flip = _element(G, lib, (1, 0))
        # the library's flip of the plane, as it moves a test image
        img = torch.arange(25.0).reshape(1, 1, 5, 5)
        _, enn, _ = _import(lib)
        moved = _transform(enn.GeometricTensor(img, enn.FieldType(gs, [gs.trivial_repr])), flip)
        dims = [d for d in (-2, -1) if torch.equal(moved, torch.flip(img, dims=(d,)))]
        assert len(dims) == 1, "the library's flip is an axis flip of the pixel grid"
        expected.append(torch.einsum("oa,aikl,bi->obkl", rho(conv.out_type, flip), torch.flip(B, dims=(dims[0],)),
                                     rho(conv.in_type, flip)) - B)
    D = conv.defect()
    torch.testing.assert_close(D, torch.cat(expected), rtol=0, atol=1e-12)
    assert D.shape[0] == len(expected) * O


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("fields", ["regular", "irreps"])
def test_c8_rotation_squares_to_the_quarter_turn_on_the_librarys_kernels(lib, fields, float64):
    """The C_8 step's spatial operator, built from the library's kernels, is the exact rotation on them: applied
    twice it moves their pixel slices as torch.rot90 does."""
    model, _, _ = _model(lib, "C8", fields)
    relaxed = relax(model)
    for conv in _relaxed_convs(relaxed):
        S = conv.defect_spatial_0
        k = conv.kernel_size
        Ks = _kernel_samples(conv)
        slices = Ks.reshape(-1, k * k).T
        turned = torch.rot90(Ks, 1, dims=(-2, -1)).reshape(-1, k * k).T
        tol = max(1e-10, BASIS_DEFECT[lib])  # escnn: the float32 kernels are only that close to rotated copies
        torch.testing.assert_close(S @ S @ slices, turned, rtol=0, atol=tol * float(slices.abs().max()))


@pytest.mark.parametrize("lib", LIBS)
def test_so2_defect_is_the_derivative_of_the_library_rotation(lib, float64):
    """SO(2): D(B) = d/dt [ρ_out(t) S_t B ρ_in(t)⁻¹] at t = 0, by a central difference (h = 1e-4) of the library's ρ(±h)
    and the finite-angle interpolation S_±h built, like the operator, from the library's kernels."""
    from relaxeq_fast.interop.escnn import _FAMILY_RTOL, _matrix, _rotation
    from relaxeq_fast.steerable.basis import _grid_points
    from relaxeq_fast.steerable.conv import _hybrid, _rbf
    model, _, gs = _model(lib, "SO2", "irreps")
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    conv = _relaxed_convs(relaxed)[1]
    k = conv.kernel_size
    Ks = _kernel_samples(conv)
    X = Ks.reshape(-1, k * k).T
    grid = _grid_points(k)
    B = conv.weight_relax.detach()

    def rotated(t):
        r_out, r_in = _matrix(conv.out_type, _rotation(gs, lib, t)), _matrix(conv.in_type, _rotation(gs, lib, t))
        Y = torch.einsum("op,dpikl,iq->doqkl", torch.linalg.inv(r_out), Ks, r_in)
        pts = grid @ torch.tensor([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])  # R_t⁻¹ p
        S = _hybrid(k, Y.reshape(-1, k * k).T, _rbf(k, pts), family=X, rtol=_FAMILY_RTOL)
        SB = (B.reshape(*B.shape[:2], k * k) @ S.T).reshape(B.shape)
        return torch.einsum("oa,aikl,ib->obkl", r_out, SB, torch.linalg.inv(r_in))

    h = 1e-4
    expected = (rotated(h) - rotated(-h)) / (2 * h)
    torch.testing.assert_close(conv.defect(), expected, rtol=0, atol=1e-6 * float(expected.abs().max()))


@pytest.mark.parametrize("lib", LIBS)
def test_nearest_projection_is_the_least_squares_fit_on_the_librarys_basis(lib, float64):
    """basis_coefficients: the residual of a random kernel is orthogonal to every basis kernel, and a kernel of the
    basis is reproduced; "nearest" adds θ P_eq(B) to the library's weights."""
    model, t0, _ = _model(lib, "C8", "regular")
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    set_theta(relaxed, 0.4)
    conv = _relaxed_convs(relaxed)[1]
    B = conv.weight_relax.detach()
    c = basis_coefficients(conv, B)
    residual = B - _expand(conv, c)
    n = conv.weights.numel()
    basis = torch.stack([_expand(conv, e) for e in torch.eye(n)])  # [n, O, I, k, k]
    gram_residual = torch.einsum("noikl,oikl->n", basis, residual)
    assert float(gram_residual.abs().max()) < 1e-9 * float(B.norm())
    target = _expand(conv, torch.randn(n))
    torch.testing.assert_close(_expand(conv, basis_coefficients(conv, target)), target, rtol=0, atol=1e-9)
    nearest = conv.project("nearest")
    torch.testing.assert_close(nearest.weights, conv.weights + 0.4 * c, rtol=0, atol=1e-12)
    drop = conv.project("drop")
    torch.testing.assert_close(drop.weights, conv.weights, rtol=0, atol=0)


@pytest.mark.parametrize("lib", LIBS)
def test_fused_forward_reads_the_input_once(lib, float64):
    """A relaxed layer's training forward makes one pass over its input (the fused relaxed_conv2d: output and
    R_LD together), the library layer one (its conv2d)."""
    model, t0, _ = _model(lib, "C4", "regular")
    conv = [m for m in model.modules() if is_library_r2conv(m)][1]
    t1 = conv.in_type
    _, enn, _ = _import(lib)
    x = enn.GeometricTensor(torch.randn(2, t1.size, 16, 16), t1)
    size = x.tensor.numel()
    with RecordOps(data_size=size) as plain:
        conv(x)
    relaxed = relax(copy.deepcopy(conv))
    with RecordOps(data_size=size) as fused:
        relaxed(x)
    assert len(plain.data_ops) == 1 and len(fused.data_ops) == 1, (plain.data_ops, fused.data_ops)
    assert "relaxeq.relaxed_conv2d" in fused.data_ops[0] or fused.data_ops[0].startswith("aten.")
    assert relaxed.last_defect is not None


@pytest.mark.parametrize("lib", LIBS)
def test_eval_mode_reuses_the_librarys_kernel_cache(lib, float64):
    """In eval mode the relaxed layer reads the library's cached ``filter`` (no basis expansion per forward) and
    computes filter + θB."""
    model, t0, _ = _model(lib, "C4", "regular")
    relaxed = relax(model)
    _randomise_relaxation(relaxed)
    conv = _relaxed_convs(relaxed)[0]
    relaxed.eval()
    calls = []
    handle = conv.basisexpansion.register_forward_hook(lambda *a: calls.append(1))
    x_geo, x = _input(lib, t0)
    with torch.no_grad():
        y = conv(x_geo).tensor
    handle.remove()
    assert calls == []
    expected = F.conv2d(x, conv.filter + conv.theta * conv.weight_relax, conv.expanded_bias, padding=conv.padding)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("lib", LIBS)
def test_strided_and_padded_layers(lib, float64):
    """Stride 2 (outside the fused op) and reflect padding give conv2d of K + θB, and R_LD the defect convolution."""
    _, enn, _ = _import(lib)
    gs = _gspace(lib, "C4")
    t0, t1 = enn.FieldType(gs, [gs.trivial_repr]), enn.FieldType(gs, [gs.regular_repr])
    for kwargs in ({"stride": 2, "padding": 1}, {"padding": 1, "padding_mode": "reflect"}):
        with _building(lib):
            plain = enn.R2Conv(t0, t1, 3, **kwargs)
        conv = relax(plain.double())
        _randomise_relaxation(conv)
        x = torch.randn(2, 1, 9, 9)
        y = conv(enn.GeometricTensor(x, t0)).tensor
        M = conv.expand_parameters()[0] + conv.theta * conv.weight_relax
        b = conv.expand_parameters()[1]
        xp, pad = (F.pad(x, (1, 1, 1, 1), mode="reflect"), 0) if "padding_mode" in kwargs else (x, 1)
        stride = kwargs.get("stride", 1)
        torch.testing.assert_close(y, F.conv2d(xp, M, b, stride=stride, padding=pad), rtol=0, atol=1e-12)
        r, _ = conv.last_defect
        torch.testing.assert_close(r, F.conv2d(xp, conv.defect(), stride=stride, padding=pad).square().sum(),
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("lib", LIBS)
def test_training_tools_work_unchanged(lib, float64):
    """set_theta, ThetaScheduler, model_regularizers and every reduction, relaxation_report, DualTheta (θ_ℓ learnt: dθ flows through the fused op), a
    few optimiser steps that lower the loss, the state_dict, deepcopy and (where the library's models pickle) pickle."""
    from relaxeq_fast import combine_regularizers
    model, t0, _ = _model(lib, "C4", "regular")
    try:  # neither library's models pickle today (their groups hold local functions); where one does, ours must
        pickle.dumps(model)
        library_pickles = True
    except (AttributeError, pickle.PicklingError):
        library_pickles = False
    relaxed = relax(model, relax_init="default")
    report = relaxation_report(relaxed)
    assert len(report) == 3 and all(r["relative_size"] > 0 and 0 <= r["equivariant_share"] <= 1 for r in report)
    scheduler = ThetaScheduler(relaxed, make_schedule("triangle", total=4))
    thetas = []
    for _ in range(4):
        scheduler.step()
        thetas.append(sorted({float(m.theta) for m in _relaxed_convs(relaxed)}))
    assert thetas[-1] == [0.0] and all(len(t) == 1 for t in thetas) and max(t[0] for t in thetas) > 0
    x_geo, _ = _input(lib, t0)
    relaxed.train()
    relaxed(x_geo)
    terms = model_regularizers(relaxed)
    for reduction in ("paper", "sum", "mean", "layer_mean"):
        assert torch.isfinite(combine_regularizers(terms, lambda_ld=1.0, lambda_n=1.0, reduction=reduction))
    dual = DualTheta(relaxed, theta_init=0.5)
    opt = torch.optim.Adam(list(relaxed.parameters()), lr=1e-2)
    target = torch.randn(2, t0.size, 9, 9, generator=torch.Generator().manual_seed(7))
    losses = []
    for _ in range(5):
        opt.zero_grad()
        task = (relaxed(x_geo).tensor - target).square().mean()
        loss = task + combine_regularizers(model_regularizers(relaxed), lambda_ld=1e-3, lambda_n=1e-3) + dual.penalty()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dual.parameters())
        opt.step()
        dual.dual_step()
        losses.append(float(task))
    assert losses[-1] < losses[0]
    state = relaxed.state_dict()
    assert any(k.endswith("weight_relax") for k in state) and any(k.endswith("theta") for k in state)
    copies = [copy.deepcopy(relaxed)] + ([pickle.loads(pickle.dumps(relaxed))] if library_pickles else [])
    relaxed.eval()
    with torch.no_grad():
        y = relaxed(x_geo).tensor
        for other in copies:
            torch.testing.assert_close(other.eval()(x_geo).tensor, y, rtol=0, atol=0)


@pytest.mark.parametrize("lib", LIBS)
def test_unsupported_layers_are_refused_by_name(lib, float64):
    """Grouped and dilated convolutions, the complement space and the trivial group: one line naming the value."""
    _, enn, gspaces = _import(lib)
    gs = _gspace(lib, "C4")
    t = enn.FieldType(gs, 2 * [gs.regular_repr])
    with _building(lib):
        grouped, dilated, plain = (enn.R2Conv(t, t, 3, groups=2), enn.R2Conv(t, t, 3, dilation=2),
                                   enn.R2Conv(t, t, 3))
        trivial_space = gspaces.TrivialOnR2() if lib == "e2cnn" else gspaces.trivialOnR2()
        tt = enn.FieldType(trivial_space, [trivial_space.trivial_repr])
        trivial = enn.R2Conv(tt, tt, 3)
    with pytest.raises(ValueError, match="groups=2"):
        relax(grouped)
    with pytest.raises(ValueError, match="dilation=2"):
        relax(dilated)
    with pytest.raises(ValueError, match="relax_space='complement'"):
        relax(plain, relax_space="complement")
    with pytest.raises(ValueError, match="not supported"):
        relax(trivial)


# the e2cnn / escnn settings whose kernel space is the package's (Gaussian rings of width 0.6 at radii 0…(k−1)/2,
# frequencies up to 2r): swap() converts exactly these layers
OUR_BASIS = {"sigma": 0.6, "frequencies_cutoff": 2.0}


@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("group", ["C4", "C8", "SO2"])
def test_swap_converts_exactly_the_layers_with_our_kernel_space(lib, group, float64):
    """swap(): a library R2Conv whose kernel space is ours becomes the package's R2Conv (in an adapter keeping the
    GeometricTensor interface; outputs and input gradients to 1e-10); one with the library's default basis stays;
    relax / project then act on the package's layer, and the projected model is equivariant."""
    from relaxeq_fast.interop import swap
    from relaxeq_fast.interop.escnn import to_package_conv
    from relaxeq_fast.steerable import R2Conv, RelaxedR2Conv
    _, enn, _ = _import(lib)
    try:
        with _building(lib):
            gs = _gspace(lib, group)
            t0 = enn.FieldType(gs, [gs.trivial_repr])
            t1 = enn.FieldType(gs, ([gs.regular_repr] if group != "SO2" else []) + [gs.irrep(1), gs.trivial_repr])
            ours = dict(OUR_BASIS, rings=[0, 1, 2])
            model = enn.SequentialModule(enn.R2Conv(t0, t1, 5, padding=2, **ours), enn.R2Conv(t1, t1, 5, padding=2),
                                         enn.R2Conv(t1, t0, 5, padding=2, **ours))
    except (AttributeError, ValueError) as e:
        if lib == "e2cnn" and "tostring" in str(e):
            pytest.skip(f"e2cnn 0.2.3 cannot build {group} kernels under numpy 2 ({e}); escnn can")
        raise
    model = model.double()
    assert to_package_conv(model[1] if hasattr(model, "__getitem__") else list(model.children())[1]) is None
    original = copy.deepcopy(model)
    swapped = swap(model)
    kinds = [type(c).__name__ for c in swapped.children()]
    assert kinds[0] == kinds[2] == f"PackageR2Conv_{lib}" and kinds[1] == "R2Conv", kinds
    assert all(isinstance(c.conv, R2Conv) for c in swapped.children() if hasattr(c, "conv"))
    x_geo, x = _input(lib, t0, requires_grad=True)
    y_ref = original(x_geo).tensor
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    y = swapped(x_geo).tensor
    (g,) = torch.autograd.grad(y.square().sum(), x)
    tol = max(1e-10, BASIS_DEFECT[lib])  # escnn: its float32 basis against our float64 one
    torch.testing.assert_close(y, y_ref, rtol=0, atol=tol * float(y_ref.abs().max()))
    torch.testing.assert_close(g, g_ref, rtol=0, atol=tol * float(g_ref.abs().max()))
    relaxed = relax(swapped)
    assert sum(isinstance(m, RelaxedR2Conv) for m in relaxed.modules()) == 2 and len(_relaxed_convs(relaxed)) == 3
    _randomise_relaxation(relaxed)
    projected = project(relaxed)
    x_geo, _ = _input(lib, t0)
    assert _equivariance_error(projected, x_geo, _quarter_turn(lib, gs, group)) < 10 * tol


@pytest.mark.parametrize("lib", LIBS)
def test_no_exact_package_layer_for_default_bases_other_groups_or_strides(lib, float64):
    """to_package_conv is None for the libraries' default basis (other ring widths: a different kernel space), for
    D_4 (a group the package's R2Conv does not have) and for stride 2."""
    from relaxeq_fast.interop.escnn import to_package_conv
    _, enn, _ = _import(lib)
    with _building(lib):
        gs = _gspace(lib, "C4")
        t = enn.FieldType(gs, [gs.regular_repr])
        default, strided = enn.R2Conv(t, t, 3), enn.R2Conv(t, t, 3, stride=2, sigma=0.6, frequencies_cutoff=2.0,
                                                            rings=[0, 1])
        matching = enn.R2Conv(t, t, 3, sigma=0.6, frequencies_cutoff=2.0, rings=[0, 1])
    assert to_package_conv(default.double()) is None
    assert to_package_conv(strided.double()) is None
    assert to_package_conv(matching.double()) is not None
    if lib == "escnn":
        with _building(lib):
            gd = _gspace(lib, "D4")
            td = enn.FieldType(gd, [gd.regular_repr])
            dihedral = enn.R2Conv(td, td, 3, sigma=0.6, frequencies_cutoff=2.0, rings=[0, 1])
        assert to_package_conv(dihedral.double()) is None
