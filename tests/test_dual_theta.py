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
from relaxeq_fast.relaxation import DualTheta
from relaxeq_fast.reps import VN, random_rotation
from relaxeq_fast.vn import model_regularizers, project

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
