"""Vector-Neuron layers and VN-PointNet: equivariance, relaxation, projection, regularisers."""
import pytest
import torch

from relaxeq_fast import VN, random_rotation, use_backend
from relaxeq_fast.models import VNPointNet
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear
from relaxeq_fast.vn import (VNBatchNorm, VNLeakyReLU, VNLinear, VNLinearLeakyReLU, VNMaxPool, VNStdFeature,
                             graph_feature_cross, knn_indices, model_regularizers, project, relax,
                             relaxed_layers, set_theta, vn_mean_pool)

from testing import assert_close_scaled

F64 = torch.float64


def rotations(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [random_rotation(generator=g) for _ in range(n)]


def rel_err(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def equivariance_error(f, x, out_rotates=True, n=3):
    worst = 0.0
    for R in rotations(n):
        R = R.to(x.dtype)
        lhs = f(x @ R.T)
        rhs = f(x) @ R.T if out_rotates else f(x)
        worst = max(worst, rel_err(lhs, rhs))
    return worst


def randomize_relaxation(model, theta):
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in relaxed_layers(model):
            m.weight_relax.copy_(torch.randn(m.weight_relax.shape, generator=g, dtype=F64) * 0.3)
            m.bias_relax.copy_(torch.randn(m.bias_relax.shape, generator=g, dtype=F64) * 0.3)
    set_theta(model, theta)


LAYERS = {
    "VNLinear": lambda: VNLinear(6, 4, dtype=F64),
    "VNBatchNorm": lambda: VNBatchNorm(6, dtype=F64),
    "VNLeakyReLU": lambda: VNLeakyReLU(6, dtype=F64),
    "VNLeakyReLU_shared": lambda: VNLeakyReLU(6, share_nonlinearity=True, dtype=F64),
    "VNLinearLeakyReLU": lambda: VNLinearLeakyReLU(6, 5, dtype=F64),
    "VNLinearLeakyReLU_nobn_shared": lambda: VNLinearLeakyReLU(6, 5, share_nonlinearity=True, use_batchnorm=False,
                                                               dtype=F64),
    "VNMaxPool": lambda: VNMaxPool(6, dtype=F64),
}


# float32: one rotation's rounding through a few layers (~1e-7 per op), with margin.
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_equivariance_float32(name, train):
    torch.manual_seed(0)
    layer = relax(LAYERS[name]().float().train(train), theta=0.0)
    x = torch.randn(4, 9, 6, 3)
    assert equivariance_error(layer, x) < 1e-5
    assert equivariance_error(project(layer), x) < 1e-5


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_equivariance_plain_relaxed_projected(name, train):
    torch.manual_seed(0)
    layer = LAYERS[name]().train(train)
    x = torch.randn(4, 9, 6, 3, dtype=F64)
    plain_err = equivariance_error(layer, x)
    relaxed = relax(layer, theta=0.0)
    has_relaxed = any(True for _ in relaxed_layers(relaxed))
    randomize_relaxation(relaxed, 0.0)
    relaxed_err = equivariance_error(relaxed, x)
    set_theta(relaxed, 0.7)
    broken_err = equivariance_error(relaxed, x)
    projected_err = equivariance_error(project(relaxed), x)
    print(f"{name}: plain {plain_err:.1e} relaxed θ=0 {relaxed_err:.1e} θ=0.7 {broken_err:.1e} "
          f"projected {projected_err:.1e}")
    assert max(plain_err, relaxed_err, projected_err) < 1e-10
    if has_relaxed:
        assert broken_err > 1e-4, "a random relaxation at θ = 0.7 must break equivariance"


def test_maxpool_map_is_not_relaxed():
    pool = relax(VNMaxPool(4))
    assert not any(True for _ in relaxed_layers(pool))


def test_mean_pool_and_maxpool_shapes():
    x = torch.randn(2, 7, 4, 3)
    assert vn_mean_pool(x).shape == (2, 4, 3) and VNMaxPool(4)(x).shape == (2, 4, 3)
    with pytest.raises(ValueError, match=r"\[\.\.\., P, C, 3\]"):
        VNMaxPool(4)(torch.randn(4, 3))


def test_maxpool_picks_the_largest_dot_product():
    pool = VNMaxPool(2, dtype=F64)
    x = torch.randn(3, 5, 2, 3, dtype=F64)
    d = pool.map_to_dir(x)
    dot = (x * d).sum(-1)  # [3, 5, 2]
    out = pool(x)
    for b in range(3):
        for c in range(2):
            assert torch.equal(out[b, c], x[b, dot[b, :, c].argmax(), c])


def test_std_feature_is_invariant_and_frame_equivariant():
    torch.manual_seed(1)
    std = VNStdFeature(8, dtype=F64).eval()
    x = torch.randn(2, 6, 8, 3, dtype=F64)
    assert equivariance_error(lambda v: std(v)[0], x, out_rotates=False) < 1e-10
    assert equivariance_error(lambda v: std(v)[1], x) < 1e-10


def test_joint_relaxed_maps_equal_separate_maps_and_share_statistics():
    torch.manual_seed(2)
    block = relax(VNLinearLeakyReLU(5, 7, dtype=F64))
    randomize_relaxation(block, 0.6)
    x = torch.randn(3, 11, 5, 3, dtype=F64)
    joint = block(x)
    stats = block.map_to_feat.last_stats
    assert block.map_to_dir.last_stats is stats, "both maps must get the one set of statistics"
    # The unfused composition of the same maps (each its own relaxed_linear call):
    from relaxeq_fast import functional as F
    separate_p, separate_d = block.map_to_feat(x), block.map_to_dir(x)
    expected = F.vn_leaky_relu(block.batchnorm(separate_p), separate_d, block.negative_slope, block.eps)
    assert_close_scaled(joint, expected, 1e-12, "joint vs separate")
    xf = x.reshape(-1, 15)
    assert_close_scaled(stats.G, xf.T @ xf, 1e-12, "G")
    assert stats.n == 33


# ---- an independent float64 reference for the VN block ------------------------------------------------
#
# Written from the math (DESIGN.md §1, Deng et al. 2021) with plain torch only: no relaxeq op, no
# relaxeq_fast.functional / .reference. Features [..., C, 3], flattened channel-major (index 3c + d).

def relaxed_vn_linear64(x, W, W_r=None, b_r=None, theta=0.0):
    """(W ⊗ I_3) x + θ (W_r x + b_r) on x [..., C_in, 3] with W [C_out, C_in], W_r [3 C_out, 3 C_in]."""
    y = torch.einsum("oi,...id->...od", W, x)
    if W_r is not None:
        flat = torch.einsum("pq,...q->...p", W_r, x.reshape(*x.shape[:-2], -1)) + b_r
        y = y + theta * flat.reshape(y.shape)
    return y


def vn_batch_norm64(p, weight, bias, running_mean, running_var, training, momentum, eps, norm_eps):
    """BatchNorm1d of the norms ‖p_c‖ + norm_eps over every leading position, vectors rescaled to the new
    norms. Returns (out, new running mean, new running var); training: batch stats, running stats moved
    by momentum towards (mean, unbiased var); eval: running stats."""
    norm = (p * p).sum(-1).sqrt() + norm_eps
    rows = norm.reshape(-1, norm.shape[-1])
    if training:
        mean, var = rows.mean(0), (rows - rows.mean(0)).square().mean(0)
        n = rows.shape[0]
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    else:
        mean, var, new_mean, new_var = running_mean, running_var, running_mean, running_var
    normalised = (norm - mean) / (var + eps).sqrt() * weight + bias
    return p * (normalised / norm).unsqueeze(-1), new_mean, new_var


def vn_leaky_relu64(p, d, slope, eps):
    """Keep p where ⟨p, d⟩ ≥ 0; else blend p with its projection off d: slope p + (1 − slope)(p − ⟨p,d⟩ d/(‖d‖²+ε))."""
    dot = (p * d).sum(-1, keepdim=True)
    projected = p - dot / ((d * d).sum(-1, keepdim=True) + eps) * d
    return torch.where(dot < 0, slope * p + (1 - slope) * projected, p)


@pytest.mark.parametrize("backend", ["native", "reference"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("use_bn", [True, False], ids=["bn", "nobn"])
@pytest.mark.parametrize("shared", [False, True], ids=["perchannel", "shared"])
@pytest.mark.parametrize("relaxed", [True, False], ids=["relaxed", "plain"])
def test_vn_block_matches_independent_float64_composition(relaxed, shared, use_bn, train, backend):
    # Non-default slope / eps / batch-norm eps and momentum throughout: a layer that dropped one of them
    # and used the default would fail. eps = 0.5 is comparable to ‖d‖² here (d = W_dir x, ‖d‖² ~ 1).
    g = torch.Generator().manual_seed(7)
    c_in, c_out, slope, eps = 5, 4, 0.3, 0.5
    block = VNLinearLeakyReLU(c_in, c_out, share_nonlinearity=shared, use_batchnorm=use_bn, negative_slope=slope,
                              eps=eps, dtype=F64)
    if relaxed:
        block = relax(block, theta=0.6)
        randomize_relaxation(block, 0.6)
    bn = block.batchnorm
    if bn is not None:
        bn.eps, bn.momentum = 1e-3, 0.3
        with torch.no_grad():
            bn.weight.copy_(torch.rand(c_out, generator=g, dtype=F64) + 0.5)
            bn.bias.copy_(torch.randn(c_out, generator=g, dtype=F64))
            bn.running_mean.copy_(torch.rand(c_out, generator=g, dtype=F64) + 1.0)
            bn.running_var.copy_(torch.rand(c_out, generator=g, dtype=F64) + 0.5)
    block.train(train)
    x = torch.randn(3, 7, c_in, 3, generator=g, dtype=F64, requires_grad=True)
    params = [p for p in block.parameters()]
    names = [n for n, _ in block.named_parameters()]
    running = None if bn is None else (bn.running_mean.clone(), bn.running_var.clone())

    with use_backend(backend):
        out = block(x)
    gy = torch.randn(out.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad(out, [x] + params, gy)

    # the expected value, from the parameters only
    x64 = x.detach().clone().requires_grad_()
    p64 = [p.detach().clone().requires_grad_() for p in params]
    P = dict(zip(names, p64))

    def linear(name, v):
        return relaxed_vn_linear64(v, P[f"{name}.weights.0"], P.get(f"{name}.weight_relax"),
                                   P.get(f"{name}.bias_relax"), 0.6)

    feat, direction = linear("map_to_feat", x64), linear("map_to_dir", x64)
    new_running = None
    if bn is not None:
        feat, *new_running = vn_batch_norm64(feat, P["batchnorm.weight"], P["batchnorm.bias"], *running, train,
                                             0.3, 1e-3, bn.norm_eps)
    want = vn_leaky_relu64(feat, direction, slope, eps)
    grads_want = torch.autograd.grad(want, [x64] + p64, gy)

    assert_close_scaled(out, want, 1e-12, "block output")
    for name, got, ref in zip(["x"] + names, grads, grads_want):
        assert_close_scaled(got, ref, 1e-10, f"grad {name}")
    if bn is not None:
        assert_close_scaled(bn.running_mean, new_running[0], 1e-12, "running_mean")
        assert_close_scaled(bn.running_var, new_running[1], 1e-12, "running_var")
    # non-vacuous: the leaky ReLU changed a visible share of the vectors, and eps matters at this scale
    assert (want - feat).abs().max() > 1e-2
    assert (vn_leaky_relu64(feat, direction, slope, 1e-6) - want).abs().max() > 1e-3


def test_model_regularizer_is_sum_of_layers_and_matches_jvp_per_layer():
    torch.manual_seed(3)
    net = torch.nn.Sequential(VNLinearLeakyReLU(3, 6, dtype=F64), VNLinearLeakyReLU(6, 4, dtype=F64),
                              VNLinear(4, 2, dtype=F64))
    relax(net)
    randomize_relaxation(net, 0.5)
    seen = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.__setitem__(id(mod), args[0])) for m in net]
    x = torch.randn(2, 10, 3, 3, dtype=F64)
    with use_backend("reference"):
        net(x)
        for h in hooks:
            h.remove()
        # both maps of a VNLinearLeakyReLU read the block's input (one fused call)
        inputs = {id(net[2]): seen[id(net[2])]}
        for block in (net[0], net[1]):
            inputs[id(block.map_to_feat)] = inputs[id(block.map_to_dir)] = seen[id(block)]
        terms = model_regularizers(net)
        total = sum(t.lie_derivative for t in terms)
        jvp_total = 0.0
        for layer in relaxed_layers(net):
            xin = inputs[id(layer)]
            xf = xin.reshape(-1, layer.irreps_in.dim)

            def f(v, layer=layer, shape=xin.shape):
                return layer(v.reshape(shape)).reshape(len(v), -1)

            layer_total = 0.0
            for k in range(3):
                fx, jv = torch.func.jvp(f, (xf,), (layer.irreps_in.apply_generator(k, xf),))
                layer_total += ((jv - layer.irreps_out.apply_generator(k, fx)) ** 2).sum()
            own = layer.regularizers()  # model_regularizers batches same-shape layers into one entry
            assert_close_scaled(0.25 * own.lie_derivative, layer_total, 1e-10, "θ² R_LD vs jvp")
            jvp_total = jvp_total + layer_total
    assert_close_scaled(0.25 * total, jvp_total, 1e-10, "model R_LD")


def test_knn_matches_brute_force_and_checks_k():
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(2, 300, 3, generator=g, dtype=F64)
    idx = knn_indices(pts, 5, chunk=64)
    brute = torch.cdist(pts, pts).topk(5, dim=-1, largest=False).indices
    assert torch.equal(idx.sort(-1).values, brute.sort(-1).values)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, P\] = \[1, 300\]"):
        knn_indices(pts, 301)


def test_graph_feature_cross_layout_and_equivariance():
    x = torch.randn(2, 12, 2, 3, dtype=F64)
    feat = graph_feature_cross(x, 4)
    assert feat.shape == (2, 12, 4, 6, 3)
    assert torch.equal(feat[:, :, 0, 2:4], x), "the centre x_i is channels C..2C"
    assert equivariance_error(lambda v: graph_feature_cross(v, 4), x) < 1e-12


def test_duplicated_points_and_zero_vectors_stay_finite():
    torch.manual_seed(4)
    pts = torch.randn(2, 1, 3).expand(2, 24, 3).contiguous()  # every point the same
    model = VNPointNet(num_classes=3, k=4).double().eval()
    out = model(pts.double())
    assert torch.isfinite(out).all()
    zeros = torch.zeros(3, 5, 4, 3, dtype=F64)
    assert torch.isfinite(VNLinearLeakyReLU(4, 4, dtype=F64)(zeros)).all()


def test_batchnorm_single_vector_in_training_is_an_error():
    with pytest.raises(ValueError, match="more than one value per channel"):
        VNBatchNorm(3).train()(torch.randn(1, 3, 3))


@pytest.fixture(scope="module")
def pointnet_pair():
    torch.manual_seed(0)
    plain = VNPointNet(num_classes=5, k=6).double()
    relaxed = relax(VNPointNet(num_classes=5, k=6).double())
    relaxed.load_state_dict(plain.state_dict(), strict=False)
    return plain, relaxed


def test_pointnet_invariance_plain_relaxed_projected(pointnet_pair):
    plain, relaxed = pointnet_pair
    x = torch.randn(2, 24, 3, dtype=F64)
    plain.eval()
    relaxed.eval()
    randomize_relaxation(relaxed, 0.0)
    errs = {"plain": equivariance_error(plain, x, out_rotates=False),
            "relaxed θ=0": equivariance_error(relaxed, x, out_rotates=False)}
    set_theta(relaxed, 0.5)
    broken = equivariance_error(relaxed, x, out_rotates=False)
    projected = project(relax(VNPointNet(num_classes=5, k=6).double()).eval())
    errs["projected"] = equivariance_error(projected, x, out_rotates=False)
    print(errs, "θ=0.5:", broken)
    assert max(errs.values()) < 1e-10
    assert broken > 1e-6


def test_relax_is_exact_and_projection_loads_into_plain_class(pointnet_pair):
    plain, relaxed = pointnet_pair
    fresh = relax(VNPointNet(num_classes=5, k=6).double())
    fresh.load_state_dict(plain.state_dict(), strict=False)
    plain.eval()
    fresh.eval()
    x = torch.randn(2, 24, 3, dtype=F64)
    assert_close_scaled(fresh(x), plain(x), 1e-12, "relaxed (W_r = 0) vs plain")
    n_relaxed = len(list(relaxed_layers(fresh)))
    # encoder: 3 VNLinearLeakyReLU x 2 maps + conv3; STN: 5 x 2 + fc3; VNStdFeature: 2 x 2 + vn_lin
    assert n_relaxed == 7 + 11 + 5, n_relaxed
    projected = project(fresh)
    again = VNPointNet(num_classes=5, k=6).double()
    again.load_state_dict(projected.state_dict(), strict=True)
    again.eval()
    assert_close_scaled(again(x), plain(x), 1e-12, "reloaded projected model")


def test_pointnet_relaxed_flag_and_training_step():
    torch.manual_seed(0)
    # the default is the paper's relaxed maps (as relaxeq-train): every VN map but VNStdFeature's last
    every_map = VNPointNet(num_classes=4, k=5, relaxed=True, relaxed_maps="all")
    assert len(list(relaxed_layers(every_map))) == 23
    model = VNPointNet(num_classes=4, k=5, relaxed=True, relax_kwargs={"theta": 1.0})
    assert len(list(relaxed_layers(model))) == 22
    assert not isinstance(model.std_feature.vn_lin, RelaxedLinear)
    x, labels = torch.randn(4, 16, 3), torch.tensor([0, 1, 2, 3])
    loss = torch.nn.functional.nll_loss(model(x), labels)
    from relaxeq_fast import combine_regularizers
    reg = combine_regularizers(model_regularizers(model), 1e-3, 1e-4)
    (loss + reg).backward()
    grads = [m.weight_relax.grad for m in relaxed_layers(model)]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_public_equivariance_error_helper():
    from relaxeq_fast import equivariance_error as public_error
    torch.manual_seed(0)
    model = VNPointNet(num_classes=3, k=4).double().eval()
    x = torch.randn(2, 12, 3, dtype=F64)
    with pytest.raises(ValueError, match="cannot tell"):
        public_error(model, x)  # 3 logits look like xyz
    assert public_error(model, x, output="invariant") < 1e-10
    assert public_error(VNPointNet(num_classes=5, k=4).double().eval(), x) < 1e-10  # "auto": invariant
    block = VNLinearLeakyReLU(3, 4, dtype=F64).eval()
    feats = torch.randn(5, 3, 3, dtype=F64)
    assert public_error(block, feats, output="equivariant") < 1e-10
    broken = relax(VNLinearLeakyReLU(3, 4, dtype=F64), relax_init="default", theta=1.0).eval()
    assert public_error(broken, feats, output="equivariant") > 1e-3
    with pytest.raises(ValueError, match="xyz last"):
        public_error(block, torch.randn(5, 3, 4))


def test_pointnet_bad_inputs():
    model = VNPointNet(num_classes=3, k=8)
    with pytest.raises(ValueError, match=r"points must have shape \[B, P, 3\]"):
        model(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match="k = 8 neighbours needs at least 8 points"):
        model(torch.randn(2, 5, 3))


def test_dgcnn_invariance_relaxation_and_projection():
    from relaxeq_fast.models import VNDGCNN
    torch.manual_seed(0)
    plain = VNDGCNN(num_classes=4, k=5).double().eval()
    relaxed = relax(VNDGCNN(num_classes=4, k=5).double()).eval()
    relaxed.load_state_dict(plain.state_dict(), strict=False)
    # 5 VNLinearLeakyReLU x 2 maps + VNStdFeature (2 x 2 + 1)
    assert len(list(relaxed_layers(relaxed))) == 10 + 5
    x = torch.randn(2, 20, 3, dtype=F64)
    assert equivariance_error(plain, x, out_rotates=False) < 1e-10
    assert_close_scaled(relaxed(x), plain(x), 1e-12, "relaxed at init vs plain")
    randomize_relaxation(relaxed, 0.5)
    assert equivariance_error(relaxed, x, out_rotates=False) > 1e-6
    projected = project(relaxed)
    again = VNDGCNN(num_classes=4, k=5).double().eval()
    again.load_state_dict(projected.state_dict(), strict=True)
    assert equivariance_error(again, x, out_rotates=False) < 1e-10


def test_torch_compile_fullgraph_vn_pointnet():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=4, k=5, relaxed=True,
                       relax_kwargs={"theta": 0.5, "relax_init": "default"}).eval()
    x = torch.randn(2, 16, 3)
    compiled = torch.compile(model, fullgraph=True)
    assert_close_scaled(compiled(x), model(x), 1e-5, "compiled VN-PointNet")
