"""Relaxed steerable convolutions (RelaxedR2Conv), the defect operator, the field-wise layers and
SteerableCNN: exact 90° invariance at θ = 0 and after projection (and that the check can fail), the
defect against direct rotations, R_LD = 0 for equivariant B, the data-mode regulariser, errors."""
import math

import pytest
import torch

from relaxeq_fast import functional
from relaxeq_fast.models import SteerableCNN
from relaxeq_fast.regularizer import combine_regularizers
from relaxeq_fast.steerable import (FieldBatchNorm, FieldNonLinearity, FieldType, GroupPool, R2Conv, RelaxedR2Conv,
                                    SpatialPool2d, _grid_points, _rot2, _smooth_family, kernel_basis, kernel_defect,
                                    rot90_equivariance_error, spatial_rotation_generator, spatial_rotation_operator)
from relaxeq_fast.vn import model_regularizers, project, relax, relaxed_layers, set_theta

# small float64 ops: one thread is faster (conftest restores the count after each test)
pytestmark = pytest.mark.usefixtures("single_thread")
DT = torch.float64
EXACT = 1e-10  # float64, exact symmetries (quarter turns, equivariant kernels)


def mixed_type(G):
    t = FieldType.trivial(G, 2) + FieldType.irreps(G, [1])
    return t + (FieldType.irreps(G, [2]) if G is None else FieldType.regular(G, 1))


def rotate_field(x, ftype, k):
    rho = ftype.representation(k * math.pi / 2).to(x.dtype)
    return torch.einsum("oc,bchw->bohw", rho, torch.rot90(x, k, dims=(-2, -1)))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def smooth_kernel(tin, tout, k, gen):
    """A random non-equivariant continuous kernel f (from the smooth family) and its grid samples."""
    C = torch.randn(tout.dim, tin.dim, _smooth_family(k, _grid_points(k)).shape[1], dtype=DT, generator=gen)
    f = lambda pts: torch.einsum("oif,pf->oip", C, _smooth_family(k, pts)).reshape(tout.dim, tin.dim, k, k)
    return f, f(_grid_points(k))


# ---- the defect operator ---------------------------------------------------------------------------------

@pytest.mark.parametrize("G", [2, 4])
def test_defect_is_the_pixel_permutation_for_quarter_and_half_turns(G):
    gen = torch.Generator().manual_seed(0)
    t = mixed_type(G)
    B = torch.randn(t.dim, t.dim, 5, 5, dtype=DT, generator=gen)
    k = 4 // G  # rotation by 2π/G in quarter turns
    direct = torch.einsum("op,pqhw,iq->oihw", t.representation(2 * math.pi / G), torch.rot90(B, k, dims=(-2, -1)),
                          t.representation(2 * math.pi / G)) - B
    assert torch.equal(spatial_rotation_operator(5, 2 * math.pi / G).abs().sum(0), torch.ones(25, dtype=DT))
    err = (kernel_defect(B, t, t) - direct).abs().max().item()
    print(f"C_{G}: max |D(B) - direct| = {err:.2e}")
    assert err < 1e-14


@pytest.mark.parametrize("G", [3, 6, 8])
def test_defect_matches_direct_rotation_of_a_continuous_kernel(G):
    """C_N off the quarter turns: D(B) = ρ_out(g) f(R_g^{-1} p) ρ_in(g)^{-1} − f(p) exactly for a kernel
    sampled from a smooth continuous f (the interpolation is exact on that family)."""
    gen = torch.Generator().manual_seed(1)
    t, k, g = mixed_type(G), 5, 2 * math.pi / G
    f, B = smooth_kernel(t, t, k, gen)
    rotated = f(_grid_points(k) @ _rot2(-g).T)
    direct = torch.einsum("op,pqhw,iq->oihw", t.representation(g), rotated, t.representation(g)) - B
    err = rel(kernel_defect(B, t, t), direct)
    print(f"C_{G}: relative |D(B) - direct| = {err:.2e}")
    assert err < EXACT


def test_so2_defect_is_the_derivative_of_the_rotation():
    gen = torch.Generator().manual_seed(2)
    t, k, h = mixed_type(None), 5, 1e-4
    f, B = smooth_kernel(t, t, k, gen)

    def rotated(a):
        ro, ri = t.representation(a), t.representation(a)
        return torch.einsum("op,pqhw,iq->oihw", ro, f(_grid_points(k) @ _rot2(-a).T), ri)

    central = (rotated(h) - rotated(-h)) / (2 * h)  # O(h²) ≈ 1e-8
    err = rel(kernel_defect(B, t, t), central)
    print(f"SO(2): relative |D(B) - central difference| = {err:.2e}")
    assert err < 1e-6
    # the generator is the derivative of the (hybrid) rotation operator for any kernel, smooth or not
    Sdot = spatial_rotation_generator(k)
    fd = (spatial_rotation_operator(k, h) - spatial_rotation_operator(k, -h)) / (2 * h)
    assert rel(fd, Sdot) < 1e-6


@pytest.mark.parametrize("G", [4, 8, 6, None])
def test_defect_vanishes_on_equivariant_kernels_only(G):
    gen = torch.Generator().manual_seed(3)
    tin, tout = mixed_type(G), mixed_type(G) + FieldType.trivial(G, 1)
    basis = kernel_basis(tin, tout, 5)
    B = torch.einsum("b,boikl->oikl", torch.randn(basis.shape[0], dtype=DT, generator=gen), basis)
    d_eq = kernel_defect(B, tin, tout).norm().item() / B.norm().item()
    Bn = torch.randn(B.shape, dtype=DT, generator=gen)
    d_rand = kernel_defect(Bn, tin, tout).norm().item() / Bn.norm().item()
    print(f"G={G}: defect of an equivariant kernel {d_eq:.1e}, of a random one {d_rand:.2f}")
    assert d_eq < EXACT and d_rand > 0.5
    # R_LD of the layer in both modes is 0 for an equivariant B
    conv = RelaxedR2Conv(tin, tout, 5, dtype=DT)
    with torch.no_grad():
        conv.weight_relax.copy_(B)
    x = torch.randn(2, tin.dim, 7, 7, dtype=DT, generator=gen)
    conv(x)
    assert conv.regularizers("data").lie_derivative.item() < EXACT ** 2 * x.square().sum().item() * B.square().sum().item()
    assert conv.regularizers("weight").lie_derivative.item() < EXACT ** 2


# ---- the relaxed layer --------------------------------------------------------------------------------------

@pytest.mark.parametrize("G", [4, 8])
def test_relaxed_layer_equivariant_at_theta_zero_and_projected(G):
    gen = torch.Generator().manual_seed(4)
    tin, tout = mixed_type(G), mixed_type(G) + FieldType.trivial(G, 1)
    conv = RelaxedR2Conv(tin, tout, 3, relax_init="default", theta=0.7, dtype=DT)
    with torch.no_grad():
        conv.bias.normal_(generator=gen)
    x = torch.randn(2, tin.dim, 9, 9, dtype=DT, generator=gen)
    err_relaxed = rel(conv(rotate_field(x, tin, 1)), rotate_field(conv(x), tout, 1))
    conv.set_theta(0.0)
    y0 = conv(x)
    err_theta0 = max(rel(conv(rotate_field(x, tin, k)), rotate_field(y0, tout, k)) for k in (1, 2, 3))
    plain = conv.project()
    assert type(plain) is R2Conv and set(plain.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(plain(x), y0, rtol=0, atol=1e-13)
    err_proj = max(rel(plain(rotate_field(x, tin, k)), rotate_field(plain(x), tout, k)) for k in (1, 2, 3))
    print(f"C_{G}: θ=0.7 {err_relaxed:.2e}, θ=0 {err_theta0:.1e}, projected {err_proj:.1e}")
    assert err_theta0 < EXACT and err_proj < EXACT and err_relaxed > 1e-2
    # from_plain reproduces the plain layer at any θ while B = 0
    twin = RelaxedR2Conv.from_plain(plain, theta=0.9)
    torch.testing.assert_close(twin(x), plain(x), rtol=0, atol=1e-13)


def test_data_mode_regulariser_equals_explicit_computation():
    gen = torch.Generator().manual_seed(5)
    t = mixed_type(8)
    conv = RelaxedR2Conv(t, t, 5, padding=1, relax_init="default", theta=0.3, dtype=DT)
    x = torch.randn(3, t.dim, 8, 8, dtype=DT, generator=gen, requires_grad=True)
    y = conv(x)
    terms = conv.regularizers()
    D = kernel_defect(conv.weight_relax, t, t)
    explicit = torch.nn.functional.conv2d(x.detach(), D, padding=1).square().sum()
    torch.testing.assert_close(terms.lie_derivative, explicit, rtol=1e-12, atol=0)
    torch.testing.assert_close(terms.projection, conv.weight_relax.square().sum(), rtol=1e-12, atol=0)
    assert terms.n == 3 * y.shape[2] * y.shape[3]
    K, b = conv.expand()
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, K + 0.3 * conv.weight_relax, b, padding=1))
    # gradient of the regulariser goes to B only, and equals that of the explicit form
    g_reg = torch.autograd.grad(terms.lie_derivative, (conv.weight_relax, x), allow_unused=True)
    assert g_reg[1] is None or not g_reg[1].any()
    torch.testing.assert_close(g_reg[0], torch.autograd.grad(explicit, conv.weight_relax)[0])
    weight = conv.regularizers("weight")
    torch.testing.assert_close(weight.lie_derivative, D.square().sum())
    assert weight.n == 1
    combine_regularizers([terms, weight], 1e-2, 1e-3, "mean")  # the VN combiner works unchanged


def test_relax_project_and_theta_through_vn_protocol():
    t = FieldType.regular(4, 2)
    model = torch.nn.Sequential(R2Conv(FieldType.trivial(4, 1), t, 3), FieldBatchNorm(t), FieldNonLinearity(t),
                                R2Conv(t, t, 3))
    relax(model, theta=0.5, relax_init="default")
    layers = list(relaxed_layers(model))
    assert len(layers) == 2 and all(isinstance(m, RelaxedR2Conv) for m in layers)
    set_theta(model, 0.25)
    assert all(float(m.theta) == 0.25 for m in layers)
    model(torch.randn(2, 1, 7, 7))
    terms = model_regularizers(model)
    assert len(terms) == 2 and all(tm.lie_derivative.item() > 0 for tm in terms)
    assert all(tm.n == 1 for tm in model_regularizers(model, data_free=True))
    project(model)
    assert not list(relaxed_layers(model)) and type(model[0]) is R2Conv


# ---- field layers and the model -------------------------------------------------------------------------------

def test_field_layers_are_equivariant_to_quarter_turns():
    gen = torch.Generator().manual_seed(6)
    t = FieldType.trivial(8, 2) + FieldType.irreps(8, [1, 4]) + FieldType.regular(8, 2)
    x = torch.randn(3, t.dim, 6, 6, dtype=DT, generator=gen)
    bn = FieldBatchNorm(t, dtype=DT)
    nl = FieldNonLinearity(t, dtype=DT)
    with torch.no_grad():
        bn.bias.normal_(generator=gen), bn.weight.uniform_(0.5, 2, generator=gen), nl.bias.normal_(generator=gen)
    for layer, out_t in ((bn, t), (nl, t), (GroupPool(t), GroupPool(t).out_type), (SpatialPool2d(t, 2, mode="avg"), t)):
        y = layer(x)
        for k in (1, 2, 3):
            assert rel(layer(rotate_field(x, t, k)), rotate_field(y, out_t, k)) < EXACT, (layer, k)
    bn.eval()
    assert rel(bn(rotate_field(x, t, 1)), rotate_field(bn(x), t, 1)) < EXACT


# Independent float64 references for the field layers (the test above checks only equivariance, which
# a wrong statistic, momentum or gate can keep). Written from the class docstrings with plain torch.
BN_TYPE = FieldType.trivial(8, 2) + FieldType.irreps(8, [1, 4]) + FieldType.regular(8, 2)


def field_channels(ftype):
    """(first channel, dim, kind) of each field, counted here from the field kinds."""
    out, start = [], 0
    for kind, m in ftype.fields:
        d = 1 if kind == "trivial" else (m if kind == "regular" else (1 if 2 * m == ftype.group else 2))
        out.append((start, d, kind))
        start += d
    return out


def field_moments64(x, ftype):
    """Per field: the mean of all its values (0 for irreps: never centred) and the mean square deviation
    over batch, pixels and the field's channels (for irreps: E‖f‖² / d)."""
    means, vars_ = [], []
    for start, d, kind in field_channels(ftype):
        v = x[:, start:start + d].double()
        mean = v.mean() if kind != "irrep" else v.new_zeros(())
        means.append(mean)
        vars_.append((v - mean).square().mean())
    return torch.stack(means), torch.stack(vars_)


def field_batch_norm64(x, ftype, weight, bias, mean, var, eps):
    """y = (x − mean_field) / √(var_field + eps) · w_field (+ b_field for centred fields)."""
    parts, k = [], 0
    for i, (start, d, kind) in enumerate(field_channels(ftype)):
        y = (x[:, start:start + d] - mean[i]) / (var[i] + eps).sqrt() * weight[i]
        if kind != "irrep":
            y = y + bias[k]
            k += 1
        parts.append(y)
    return torch.cat(parts, 1)


def _random_field_bn(gen, eps, momentum):
    bn = FieldBatchNorm(BN_TYPE, eps=eps, momentum=momentum, dtype=DT)
    centred = torch.tensor([kind != "irrep" for _, _, kind in field_channels(BN_TYPE)])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2, generator=gen)
        bn.bias.normal_(generator=gen)
        # running means of irrep fields stay 0 (training lerps them towards 0): set only centred ones
        bn.running_mean.copy_(torch.randn(len(centred), dtype=DT, generator=gen) * 0.1 * centred)
        bn.running_var.uniform_(0.005, 0.02, generator=gen)
    return bn


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_field_batch_norm_matches_float64_reference(train):
    # Non-default eps and momentum: x is scaled to a variance ~ 1e-2, so eps = 1e-2 halves 1/√(var+eps)
    # and a layer using the default 1e-5 fails; momentum 0.3 against the default 0.1 likewise.
    gen = torch.Generator().manual_seed(20)
    eps, momentum = 1e-2, 0.3
    bn = _random_field_bn(gen, eps, momentum).train(train)
    x = 0.1 * torch.randn(3, BN_TYPE.dim, 5, 5, dtype=DT, generator=gen) + 0.05
    x.requires_grad_()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x)
    gy = torch.randn(y.shape, dtype=DT, generator=gen)
    grads = torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)

    x64, w64, b64 = (t.detach().clone().requires_grad_() for t in (x, bn.weight, bn.bias))
    if train:
        mean, var = field_moments64(x64, BN_TYPE)
        count = torch.tensor([3 * 25 * d for _, d, _ in field_channels(BN_TYPE)], dtype=DT)
        unbiased = torch.tensor([c / (c - 1) if kind != "irrep" else 1.0
                                 for c, (_, _, kind) in zip(count.tolist(), field_channels(BN_TYPE))], dtype=DT)
        rm_want = (1 - momentum) * rm0 + momentum * mean.detach()
        rv_want = (1 - momentum) * rv0 + momentum * var.detach() * unbiased
    else:
        mean, var, rm_want, rv_want = rm0, rv0, rm0, rv0
    want = field_batch_norm64(x64, BN_TYPE, w64, b64, mean, var, eps)
    grads_want = torch.autograd.grad(want, (x64, w64, b64), gy)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for name, got, ref in zip(("x", "weight", "bias"), grads, grads_want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    torch.testing.assert_close(bn.running_mean, rm_want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bn.running_var, rv_want, rtol=1e-12, atol=1e-14)
    # non-vacuous: eps is not negligible against these variances
    assert (field_batch_norm64(x64, BN_TYPE, w64, b64, mean, var, 1e-5) - want).abs().max() > 1e-1


def test_field_batch_norm_stats_reducer_gives_the_concatenated_batch():
    # FieldBatchNorm.stats_reducer (distributed.sync_batch_norms sets it): a reducer merging the local
    # moments with a fixed second "virtual rank" batch (Chan's formula) must give the batch norm of the
    # concatenated batch on the local samples, gradients through the local moments included.
    gen = torch.Generator().manual_seed(21)
    eps, momentum = 1e-2, 0.3
    bn = _random_field_bn(gen, eps, momentum).train()
    x = 0.1 * torch.randn(2, BN_TYPE.dim, 4, 4, dtype=DT, generator=gen)
    x_virtual = 0.3 * torch.randn(3, BN_TYPE.dim, 4, 4, dtype=DT, generator=gen) + 0.1
    mean_v, var_v = field_moments64(x_virtual, BN_TYPE)
    n_v = 3 * 16
    calls = []

    def reducer(mean, var, n):
        calls.append(n)
        total = n + n_v
        delta = mean_v - mean
        return mean + delta * (n_v / total), (n * var + n_v * var_v) / total + delta.square() * (n * n_v / total ** 2), total

    bn.stats_reducer = reducer
    x.requires_grad_()
    rm0, rv0 = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x)
    assert calls == [2 * 16]
    gy = torch.randn(y.shape, dtype=DT, generator=gen)
    grads = torch.autograd.grad(y, (x, bn.weight, bn.bias), gy)

    x64, w64, b64 = (t.detach().clone().requires_grad_() for t in (x, bn.weight, bn.bias))
    mean, var = field_moments64(torch.cat([x64, x_virtual]), BN_TYPE)
    want = field_batch_norm64(x64, BN_TYPE, w64, b64, mean, var, eps)
    grads_want = torch.autograd.grad(want, (x64, w64, b64), gy)
    local_mean, local_var = field_moments64(x64, BN_TYPE)
    assert (field_batch_norm64(x64, BN_TYPE, w64, b64, local_mean, local_var, eps) - want).abs().max() > 1e-1
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for name, got, ref in zip(("x", "weight", "bias"), grads, grads_want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    count = torch.tensor([5 * 16 * d for _, d, _ in field_channels(BN_TYPE)], dtype=DT)
    centred = torch.tensor([kind != "irrep" for _, _, kind in field_channels(BN_TYPE)])
    unbiased = torch.where(centred, count / (count - 1), torch.ones_like(count))
    torch.testing.assert_close(bn.running_mean, (1 - momentum) * rm0 + momentum * mean.detach())
    torch.testing.assert_close(bn.running_var, (1 - momentum) * rv0 + momentum * var.detach() * unbiased)


def test_field_nonlinearity_matches_float64_reference():
    # ReLU on trivial / regular channels; on an irrep field f the norm gate ReLU(‖f‖ + b) f / ‖f‖, with
    # biases of both signs (the default 0 makes the gate 1 and hides a wrong sign or a missing b).
    gen = torch.Generator().manual_seed(22)
    nl = FieldNonLinearity(BN_TYPE, dtype=DT)
    with torch.no_grad():
        nl.bias.copy_(torch.tensor([0.7, -0.8], dtype=DT))
    x = torch.randn(2, BN_TYPE.dim, 4, 4, dtype=DT, generator=gen, requires_grad=True)
    y = nl(x)
    gy = torch.randn(y.shape, dtype=DT, generator=gen)
    grads = torch.autograd.grad(y, (x, nl.bias), gy)

    x64, b64 = x.detach().clone().requires_grad_(), nl.bias.detach().clone().requires_grad_()
    parts, k = [], 0
    for start, d, kind in field_channels(BN_TYPE):
        f = x64[:, start:start + d]
        if kind == "irrep":
            norm = f.square().sum(1, keepdim=True).sqrt()
            parts.append(f * torch.relu(norm + b64[k]) / norm)
            k += 1
        else:
            parts.append(torch.relu(f))
    want = torch.cat(parts, 1)
    grads_want = torch.autograd.grad(want, (x64, b64), gy)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for name, got, ref in zip(("x", "bias"), grads, grads_want):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10, msg=f"grad {name}")
    # non-vacuous: the gates both cut (b < 0) and pass (b > 0) irrep fields
    irreps = torch.cat([want[:, s:s + d] for s, d, kind in field_channels(BN_TYPE) if kind == "irrep"], 1)
    assert (irreps == 0).any() and (irreps != 0).any()


@pytest.mark.parametrize("G", [4, 8])
def test_steerable_cnn_exactly_invariant_to_quarter_turns(G):
    torch.manual_seed(0)
    model = SteerableCNN(group=G, relaxed=True, width=0.125, relax_kwargs=dict(theta=1.0)).double()
    x = torch.rand(4, 1, 28, 28, dtype=DT)
    model.train()
    model(x)  # move the batch-norm running statistics off their init
    model.eval()
    err_init = rot90_equivariance_error(model, x)  # θ = 1 but B = 0
    with torch.no_grad():
        for m in relaxed_layers(model):
            m.weight_relax.normal_(0, 0.05)
    err_broken = rot90_equivariance_error(model, x)  # B ≠ 0, θ > 0: the check fails
    set_theta(model, 0.0)
    err_theta0 = rot90_equivariance_error(model, x)
    set_theta(model, 0.5)
    projected = project(model)
    err_proj = rot90_equivariance_error(projected, x)
    print(f"C_{G}: B=0 {err_init:.1e}, θ=0 {err_theta0:.1e}, projected {err_proj:.1e}, θ=0.5 with B≠0 {err_broken:.2e}")
    assert max(err_init, err_theta0, err_proj) < EXACT
    assert err_broken > 1e-3
    plain = SteerableCNN(group=G, relaxed=False, width=0.125)
    plain.load_state_dict(projected.state_dict(), strict=True)


def test_errors_name_the_argument():
    t = FieldType.regular(4, 2)
    with pytest.raises(ValueError, match="kernel_size must be a positive odd int"):
        RelaxedR2Conv(t, t, 4)
    with pytest.raises(ValueError, match=r"channels\[1\] must be a positive multiple of the regular field size N = 8"):
        SteerableCNN(group=8, channels=(64, 12, 128, 192))
    with pytest.raises(ValueError, match="channels must be a positive multiple"):
        FieldType.regular_channels(4, 6)
    conv = RelaxedR2Conv(t, t, 3)
    with pytest.raises(ValueError, match=r"x has 9 channels, in_type needs 8.*channels-last\? the layout is \[B, C, H, W\]"):
        conv(torch.randn(2, 9, 9, 8))
    with pytest.raises(ValueError, match=r"x must be \[B, C, H, W\] \(rank 4\)"):
        FieldBatchNorm(t)(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="pooling 2×2 with stride 2 needs"):
        SpatialPool2d(t, 2)(torch.randn(1, 8, 7, 7))
    with pytest.raises(ValueError, match="mode='max' is not equivariant for irrep"):
        SpatialPool2d(FieldType.irreps(4, [1]), 2)
    with pytest.raises(ValueError, match="mode must be 'data' or 'weight'"):
        conv.regularizers("lie")
    with pytest.raises(RuntimeError, match="no data-mode defect"):
        RelaxedR2Conv(t, t, 3).regularizers()
    with pytest.raises(ValueError, match=r"B must have shape \[out_dim = 8, in_dim = 8, k, k\]"):
        kernel_defect(torch.randn(8, 4, 3, 3), t, t)
    with pytest.raises(ValueError, match="relax_init"):
        RelaxedR2Conv(t, t, 3, relax_init="ones")
    # the functional's own checks stay in force (D must match M)
    with pytest.raises(ValueError, match="D must have shape"):
        functional.relaxed_conv2d(torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3), None, torch.randn(8, 8, 5, 5))
