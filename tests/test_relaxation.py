"""θ schedules, the θ scheduler and the projection error."""
import copy
import math

import pytest
import torch

from relaxeq_fast.models import VNPointNet
from relaxeq_fast.relaxation import (Constant, Cosine, HoldThenLinearDecay, ThetaScheduler, Triangle,
                                     make_schedule, projection_error)
from relaxeq_fast.vn import project, relaxed_layers

ALL = [Triangle, HoldThenLinearDecay, Constant, Cosine]


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("total", [1, 2, 7, 1000])
def test_every_schedule_ends_at_exactly_zero(cls, total):
    s = cls(total, theta_max=0.8)
    assert s(total - 1) == 0.0 and s(total) == 0.0 and s(10 * total) == 0.0
    assert all(0.0 <= s(t) <= 0.8 for t in range(total))


def test_schedule_shapes():
    tri = Triangle(101)
    assert tri(0) == 0.0 and tri(50) == pytest.approx(1.0) and tri(25) == pytest.approx(0.5)
    hold = HoldThenLinearDecay(101, theta_max=2.0)
    assert hold(0) == hold(50) == 2.0 and hold(75) == pytest.approx(1.0) and hold(99) == pytest.approx(0.04)
    cos = Cosine(101)
    values = [cos(t) for t in range(101)]
    assert values[0] == 1.0 and all(a >= b for a, b in zip(values, values[1:]))
    assert cos(50) == pytest.approx(0.5)
    assert Constant(10, 0.3)(8) == 0.3
    assert math.isclose(HoldThenLinearDecay(11, hold=0.0)(5), 0.5)


@pytest.mark.parametrize("bad,msg", [(lambda: Triangle(0), "total must be a positive int"),
                                     (lambda: Triangle(5, theta_max=-1), "theta_max"),
                                     (lambda: HoldThenLinearDecay(5, hold=1.0), "hold must be"),
                                     (lambda: make_schedule("step", 5), "schedule must be one of"),
                                     (lambda: Triangle(5)(-1), "step must be >= 0")])
def test_schedule_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()


def test_scheduler_sets_theta_everywhere_and_resumes():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=3, k=4, relaxed=True)
    sched = ThetaScheduler(model, make_schedule("triangle", 9))
    thetas = [sched.theta]
    for _ in range(8):
        thetas.append(sched.step())
    assert thetas[-1] == 0.0 and max(thetas) == 1.0
    assert all(float(m.theta) == 0.0 for m in relaxed_layers(model))
    resumed = ThetaScheduler(model, make_schedule("triangle", 9))
    resumed.load_state_dict({"t": 4})
    assert all(float(m.theta) == 1.0 for m in relaxed_layers(model)) and resumed.state_dict() == {"t": 4}
    with pytest.raises(TypeError, match="ThetaSchedule"):
        ThetaScheduler(model, lambda t: 0.0)


def test_projection_error_measures_the_relaxation_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = VNPointNet(num_classes=3, k=4, relaxed=True, relax_kwargs={"relax_init": "default", "theta": 0.5})
    model = model.double().train()
    x = torch.randn(3, 10, 3, dtype=torch.float64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    err = projection_error(model, x)
    assert err > 1e-6  # a nonzero relaxation at θ = 0.5 moves the log-probabilities
    assert model.training, "training flag restored"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    model.eval()
    projected = project(copy.deepcopy(model)).eval()
    want = ((model(x) - projected(x)).norm() / projected(x).norm()).item()
    assert err == pytest.approx(want, rel=1e-12)
    ThetaScheduler(model, Constant(3)).load_state_dict({"t": 2})  # θ = 0
    assert projection_error(model, x) == 0.0
