"""Issue 28 item 1, the Python API: relaxeq_fast.relaxation.DualTheta, learned per-layer θ under the constraint
θ_ℓ = 0 by primal–dual training. On a tiny problem whose target is not equivariant (so the task wants θ ≠ 0) the
multipliers grow monotonically while θ_ℓ ≠ 0 and every θ_ℓ is driven towards 0; μ_ℓ's update is exactly
max(0, μ_ℓ + η θ_ℓ²); state round trip; finish() + project() gives an exactly equivariant model (float64); the
penalty and the dual step read nothing back to the host."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from relaxeq_fast.nn import RelaxedLinear
from relaxeq_fast.regularizer import combine_regularizers
from relaxeq_fast.relaxation import DualTheta, ElasticTheta, layer_equivariance_errors
from relaxeq_fast.reps import VN, random_rotation
from relaxeq_fast.steerable import FieldType, RelaxedR2Conv, kernel_basis
from relaxeq_fast.vn import VNLinear, VNLinearLeakyReLU, model_regularizers, project, relax, relaxed_layers

F64 = torch.float64


def toy(seed=0):
    """Two relaxed VN maps and a target that is a fixed non-rotation linear map of the first input vector."""
    torch.manual_seed(seed)
    model = nn.Sequential(RelaxedLinear(VN(2), VN(4), relax_init="default", dtype=F64),
                          RelaxedLinear(VN(4), VN(1), relax_init="default", dtype=F64))
    x = torch.randn(64, 2, 3, dtype=F64)
    y = x[:, :1] @ torch.randn(3, 3, dtype=F64).T
    return model, x, y


def train(model, x, y, dual, steps):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    history = []
    for _ in range(steps):
        loss = ((model(x) - y) ** 2).mean() + combine_regularizers(model_regularizers(model), 1e-2, 1e-2)
        loss = loss + dual.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        before = dual.multipliers.clone()
        dual.dual_step()
        history.append((before, dual.thetas(), dual.multipliers.clone()))
    return history


def test_dual_training_drives_every_theta_towards_zero_with_monotone_multipliers():
    model, x, y = toy()
    dual = DualTheta(model, theta_init=1.0, dual_lr=1.0)
    assert [p.item() for p in dual.parameters()] == [1.0, 1.0]
    ids = {id(p) for p in model.parameters()}
    assert all(id(p) in ids for p in dual.parameters())  # the optimiser over model.parameters() trains θ_ℓ
    history = train(model, x, y, dual, 300)
    for before, thetas, after in history:
        # exactly the projected dual-ascent step, and strictly up while θ_ℓ ≠ 0
        assert torch.equal(after, (before + 1.0 * thetas.square()).clamp_min(0))
        assert ((after > before) | (thetas == 0)).all()
    first, last = history[0][1].abs(), history[-1][1].abs()
    print(f"|θ_ℓ| after step 1: {first.tolist()}, after 300: {last.tolist()}; μ: {history[-1][2].tolist()}")
    assert (last < 0.2 * first).all()
    assert (last < history[-100][1].abs()).all()  # and still falling


def test_state_round_trip_and_finish_gives_an_exactly_equivariant_model():
    model, x, y = toy(1)
    dual = DualTheta(model, theta_init=0.5, dual_lr=0.3)
    train(model, x, y, dual, 20)
    saved_model, saved_dual = copy.deepcopy(model.state_dict()), dual.state_dict()
    fresh, _, _ = toy(1)
    fresh_dual = DualTheta(fresh, theta_init=0.9)
    fresh.load_state_dict(saved_model)
    fresh_dual.load_state_dict(saved_dual)
    assert torch.equal(fresh_dual.multipliers, dual.multipliers) and torch.equal(fresh_dual.thetas(), dual.thetas())
    assert torch.equal(fresh(x), model(x))
    with pytest.raises(ValueError, match=r"multipliers must have shape \[2\]"):
        fresh_dual.load_state_dict({"multipliers": torch.zeros(3, dtype=F64)})
    dual.finish()
    assert (dual.thetas() == 0).all()
    projected = project(copy.deepcopy(model))
    assert not any(isinstance(m, RelaxedLinear) for m in projected.modules())
    R = random_rotation(generator=torch.Generator().manual_seed(2), dtype=F64)
    with torch.no_grad():
        assert torch.allclose(projected(x), model(x), rtol=0, atol=1e-12)
        err = (projected(x @ R.T) - projected(x) @ R.T).abs().max() / projected(x).abs().max()
    assert err < 1e-10


class _HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads += 1
        return func(*args, **(kwargs or {}))


def test_penalty_and_dual_step_stay_on_the_device():
    model, x, y = toy(2)
    dual = DualTheta(model)
    with _HostReads() as mode:
        dual.penalty().backward()
        dual.dual_step()
        dual.step()
    assert mode.reads == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(dual_lr=-1.0), "dual_lr must be >= 0"),
    (dict(theta_init=float("nan")), "theta_init must be a finite number"),
])
def test_bad_arguments(kwargs, message):
    model, _, _ = toy()
    with pytest.raises(ValueError, match=message):
        DualTheta(model, **kwargs)
    with pytest.raises(ValueError, match="no relaxed layers"):
        DualTheta(nn.Linear(2, 2))


# ---- the elastic variant (issue 28 item 2) ----

def test_elastic_dual_step_is_the_ascent_on_the_slackened_constraint():
    model, _, _ = toy(3)
    elastic = ElasticTheta(model, theta_init=0.7, dual_lr=0.4, slack_cost=2.0)
    with torch.no_grad():
        for layer, value in zip(elastic.layers, (0.3, -1.2)):
            layer.theta.fill_(value)
    elastic.multipliers.copy_(torch.tensor([0.5, 0.1], dtype=F64))
    thetas, mu = torch.tensor([0.3, -1.2], dtype=F64), torch.tensor([0.5, 0.1], dtype=F64)
    elastic.dual_step()
    # the slack's best response s = μ/α, then μ ← max(0, μ + η (θ² − s))
    assert torch.allclose(elastic.multipliers, (mu + 0.4 * (thetas ** 2 - mu / 2.0)).clamp_min(0), rtol=1e-15)
    assert torch.allclose(elastic.slacks(), (elastic.multipliers / 2.0).sqrt(), rtol=1e-15)
    elastic.finish()
    assert torch.equal(elastic.thetas(), thetas)  # the elastic model keeps its θ_ℓ
    with _HostReads() as mode:
        elastic.penalty().backward()
        elastic.dual_step()
    assert mode.reads == 0


def train_learnt(make, steps=600, **kwargs):
    """θ_ℓ learnt on make()'s toy: ElasticTheta with ``slack_cost``, or DualTheta without."""
    model, x, y = make()
    cls = ElasticTheta if "slack_cost" in kwargs else DualTheta
    learnt = cls(model, theta_init=1.0, dual_lr=0.5, **kwargs)
    return [thetas.abs() for _, thetas, _ in train(model, x, y, learnt, steps)]


def equivariant_toy():
    """The toy's model with a target every relaxed model fits at θ = 0: 2 × the first input vector."""
    model, x, _ = toy(4)
    return model, x, 2 * x[:, :1]


def test_elastic_keeps_relaxation_where_the_task_needs_it_and_drops_it_where_not():
    cheap, dear, dual = (train_learnt(toy, slack_cost=1.0)[-1], train_learnt(toy, slack_cost=30.0)[-1],
                         train_learnt(toy)[-1])
    symmetric = train_learnt(equivariant_toy, slack_cost=1.0)
    print(f"|θ_ℓ| after 600 steps, non-equivariant target: elastic α=1 {cheap.tolist()}, α=30 {dear.tolist()}, "
          f"dual {dual.tolist()}; equivariant target, α=1: {symmetric[-1].tolist()}")
    # a non-equivariant target: a dearer slack leaves less relaxation, and α → ∞ (dual) the least
    assert (cheap > 0.1).all() and (dear < cheap).all() and (dual < dear).all()
    # an equivariant target: nothing to gain, every θ_ℓ falls well below the non-equivariant run's, and still falls
    assert (symmetric[-1] < 0.5 * cheap).all()
    assert all((b < a).all() for a, b in zip(symmetric[-100:], symmetric[-99:]))


def vn_nonequivariant_part(layer: RelaxedLinear, x: torch.Tensor) -> torch.Tensor:
    """θ (W − P_eq W) x + θ b for a VN layer, written independently: VN(C) → VN(C') maps are W ⊗ I_3, so the
    equivariant part of each 3×3 block of W is (tr/3) I_3, and a VN bias has no equivariant part."""
    W, b = layer.weight_relax, layer.bias_relax
    blocks = W.reshape(W.shape[0] // 3, 3, W.shape[1] // 3, 3)
    trace = blocks.diagonal(dim1=1, dim2=3).sum(-1) / 3  # [C', C]
    neq = (blocks - trace[:, None, :, None] * torch.eye(3, dtype=W.dtype)[None, :, None, :]).reshape_as(W)
    out = x.reshape(len(x), -1) @ neq.T + (0 if b is None else b)
    return (layer.theta * out).detach().reshape(len(x), -1, 3)


def test_layer_equivariance_errors_against_an_independent_reference():
    torch.manual_seed(5)
    block = VNLinearLeakyReLU(3, 4, dtype=F64)  # its two maps run as one fused call when relaxed
    model = relax(nn.Sequential(block, VNLinear(4, 2, dtype=F64)), relax_init="default")
    layers = list(relaxed_layers(model))
    with torch.no_grad():
        for layer, value in zip(layers, (0.5, 0.0, 0.8)):
            layer.theta.fill_(value)
            if layer.bias_relax is not None:
                layer.bias_relax.normal_()
    x = torch.randn(10, 3, 3, dtype=F64)
    report = layer_equivariance_errors(model, x)
    assert [r["name"] for r in report] == ["0.map_to_feat", "0.map_to_dir", "1"]
    inputs = [x, x, block.eval()(x)]
    for r, layer, inp in zip(report, layers, inputs):
        out = layer(inp).detach()
        expected = float(vn_nonequivariant_part(layer, inp).norm() / out.norm())
        assert r["error"] == pytest.approx(expected, rel=1e-10, abs=1e-15), r
        assert r["theta"] == float(layer.theta)
    assert report[1]["error"] == 0.0 and report[0]["error"] > 0.01 and report[2]["error"] > 0.01


def test_layer_equivariance_errors_of_a_steerable_layer_against_least_squares():
    # P_eq of a C_4 kernel by least squares on the dense steerable basis, written here: E^T (E E^T)^{-1} E B
    tin, tout = FieldType.regular(4, 1) + FieldType.trivial(4, 1), FieldType.regular(4, 1) + FieldType.irreps(4, [1])
    torch.manual_seed(6)
    layer = RelaxedR2Conv(tin, tout, 3, relax_init="default", theta=0.6, dtype=F64)
    x = torch.randn(2, tin.dim, 7, 7, dtype=F64)
    E = kernel_basis(tin, tout, 3).reshape(layer.n_basis, -1)
    B = layer.weight_relax.detach().reshape(-1)
    B_neq = (B - E.T @ torch.linalg.solve(E @ E.T, E @ B)).reshape(layer.weight_relax.shape)
    with torch.no_grad():
        out = layer.eval()(x)
        expected = float((0.6 * torch.nn.functional.conv2d(x, B_neq, padding=1)).norm() / out.norm())
    (report,) = layer_equivariance_errors(nn.Sequential(layer), x)
    assert report["error"] == pytest.approx(expected, rel=1e-10) and report["error"] > 1e-3
    with torch.no_grad():  # an equivariant relaxation: nothing non-equivariant left
        layer.weight_relax.copy_((B.reshape(-1) - B_neq.reshape(-1)).reshape(B_neq.shape))
    assert layer_equivariance_errors(nn.Sequential(layer), x)[0]["error"] < 1e-12
