"""Relaxation control: θ schedules, stepping them on a model, and the projection error.

    schedule = HoldThenLinearDecay(total=epochs * steps_per_epoch)      # the paper's text
    theta = ThetaScheduler(model, schedule)                             # sets θ on every relaxed layer
    for batch in data:
        loss = task(model(x)) + combine_regularizers(model_regularizers(model), λ_LD, λ_N)
        ...; optimizer.step(); theta.step()
    # θ is exactly 0 after the last step: project(model) changes no output

Every schedule maps a step t ∈ [0, total − 1] to θ and ends at exactly 0 at t = total − 1 (and after).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

__all__ = ["ThetaSchedule", "Triangle", "HoldThenLinearDecay", "Constant", "Cosine", "ThetaScheduler", "DualTheta",
           "ElasticTheta",
           "layer_equivariance_errors", "projection_error", "relaxation_report", "SCHEDULES", "make_schedule"]


class ThetaSchedule:
    """θ as a function of the step t (optimisation steps or epochs, as the scheduler counts them).

    Args:
        total: number of steps; θ(total − 1) = 0 exactly, and θ(t) = 0 for every later t.
        theta_max: the largest θ.
    """

    def __init__(self, total: int, theta_max: float = 1.0):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive int (steps), got {total!r}")
        if not (isinstance(theta_max, (int, float)) and math.isfinite(theta_max) and theta_max >= 0):
            raise ValueError(f"theta_max must be a finite number >= 0, got {theta_max!r}")
        self.total, self.theta_max = total, float(theta_max)

    def shape(self, u: float) -> float:
        """θ / θ_max at progress u = t / (total − 1) ∈ [0, 1)."""
        raise NotImplementedError

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError(f"step must be >= 0, got {t}")
        if t >= self.total - 1:
            return 0.0
        return self.theta_max * self.shape(t / (self.total - 1))

    def __repr__(self):
        return f"{type(self).__name__}(total={self.total}, theta_max={self.theta_max:g})"


class Triangle(ThetaSchedule):
    """0 → θ_max at mid-training → 0 (the paper's public code)."""

    def shape(self, u):
        """1 − |2u − 1|: 0 at u = 0, 1 at u = 1/2, → 0 at u = 1."""
        return 1.0 - abs(2.0 * u - 1.0)


class HoldThenLinearDecay(ThetaSchedule):
    """θ_max for the first ``hold`` fraction of training, then linear to 0 (the paper's text: half)."""

    def __init__(self, total: int, theta_max: float = 1.0, hold: float = 0.5):
        super().__init__(total, theta_max)
        if not 0.0 <= hold < 1.0:
            raise ValueError(f"hold must be a fraction in [0, 1), got {hold!r}")
        self.hold = hold

    def shape(self, u):
        """1 for u ≤ hold, then (1 − u) / (1 − hold)."""
        return 1.0 if u <= self.hold else (1.0 - u) / (1.0 - self.hold)


class Constant(ThetaSchedule):
    """θ_max throughout, then 0 at the last step (projection after a constant relaxation)."""

    def shape(self, u):
        """1 for every u (θ = 0 only at the last step)."""
        return 1.0


class Cosine(ThetaSchedule):
    """θ_max (1 + cos(π u)) / 2: from θ_max down to 0."""

    def shape(self, u):
        """(1 + cos(π u)) / 2."""
        return 0.5 * (1.0 + math.cos(math.pi * u))


SCHEDULES = {"triangle": Triangle, "hold_linear": HoldThenLinearDecay, "constant": Constant, "cosine": Cosine}


def make_schedule(name: str, total: int, **kwargs) -> ThetaSchedule:
    """A schedule by name: one of ``SCHEDULES`` ("triangle", "hold_linear", "constant", "cosine"), over
    ``total`` steps; ``kwargs`` go to its class (theta_max, and hold for "hold_linear")."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](total, **kwargs)


class ThetaScheduler:
    """Sets θ on every relaxed layer of ``model`` from ``schedule``; call :meth:`step` once per unit.

    The unit is whatever ``schedule.total`` counts (optimisation steps, or epochs if you call step()
    once per epoch). θ(0) is applied at construction. ``state_dict``/``load_state_dict`` make it
    resumable with the rest of a checkpoint.
    """

    def __init__(self, model: nn.Module, schedule: ThetaSchedule):
        if not isinstance(schedule, ThetaSchedule):
            raise TypeError(f"schedule must be a ThetaSchedule, got {type(schedule).__name__}")
        self.model, self.schedule, self.t = model, schedule, 0
        self._apply()

    @property
    def theta(self) -> float:
        """θ at the current step t, ``schedule(t)`` (a float; what the model's layers hold)."""
        return self.schedule(self.t)

    def _apply(self):
        from .vn import set_theta
        set_theta(self.model, self.theta)

    def step(self) -> float:
        """Advance one unit and set the new θ; returns it."""
        self.t += 1
        self._apply()
        return self.theta

    def state_dict(self) -> dict:
        """``{"t": step}``: the scheduler's position (the schedule itself is not saved)."""
        return {"t": self.t}

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state["t"]`` (from :meth:`state_dict`) and set that step's θ on the model."""
        self.t = int(state["t"])
        self._apply()


class DualTheta:
    """Learned per-layer θ under the constraint θ_ℓ = 0, by primal–dual training (issue 28; ACE, Manolache et al.).

    Every relaxed layer ℓ of ``model`` gets its own trainable θ_ℓ (its ``theta`` buffer becomes an nn.Parameter of
    the same name, so state_dicts keep their keys), initialised at ``theta_init``, and a multiplier μ_ℓ ≥ 0
    (initially 0). The loss adds :meth:`penalty` = Σ_ℓ μ_ℓ c(θ_ℓ); after every optimiser step :meth:`dual_step`
    takes a projected dual-ascent step μ_ℓ ← max(0, μ_ℓ + η_μ c(θ_ℓ)).

    c(θ) = θ², the equality θ_ℓ = 0 written as the inequality θ_ℓ² ≤ 0: smooth at 0 (|θ| would make θ chatter
    around 0 with a subgradient step), and never negative, so μ_ℓ only grows while θ_ℓ ≠ 0 and the pull 2 μ_ℓ θ_ℓ on
    θ_ℓ strengthens until the task no longer pays for the relaxation. Nothing forces θ_ℓ to exactly 0: :meth:`finish`
    sets it, and the projection error just before tells what that changed. Every update stays on the device (no host
    reads per step).

    Args:
        model: a model with relaxed layers (:func:`relaxeq_fast.vn.relax`).
        theta_init: every θ_ℓ's initial value.
        dual_lr: η_μ, the multipliers' step size.

    Give :meth:`parameters` (the θ_ℓ) to the optimiser. ``state_dict`` / ``load_state_dict`` hold μ (θ_ℓ is in the
    model's state_dict). :attr:`theta` and :meth:`step` are the :class:`ThetaScheduler` interface the trainer drives
    (θ is learnt, so step() changes nothing).
    """

    def __init__(self, model: nn.Module, theta_init: float = 1.0, dual_lr: float = 1.0):
        from .vn import relaxed_layers
        for name, value in (("theta_init", theta_init), ("dual_lr", dual_lr)):
            if not (isinstance(value, (int, float)) and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if dual_lr < 0:
            raise ValueError(f"dual_lr must be >= 0, got {dual_lr!r}")
        self.layers = list(relaxed_layers(model))
        if not self.layers:
            raise ValueError("model has no relaxed layers: relax it first (relaxeq_fast.vn.relax)")
        self.dual_lr = float(dual_lr)
        for layer in self.layers:
            if not isinstance(layer.theta, nn.Parameter):
                value = layer.theta.detach().clone().fill_(float(theta_init))
                del layer._buffers["theta"]
                layer.theta = nn.Parameter(value)
        first = self.layers[0].theta
        self.multipliers = torch.zeros(len(self.layers), dtype=first.dtype, device=first.device)

    def parameters(self) -> list:
        """The θ_ℓ (0-d nn.Parameters), one per relaxed layer in ``relaxed_layers`` order."""
        return [layer.theta for layer in self.layers]

    @property
    def theta(self) -> float:
        """The mean θ_ℓ (a host read: for reports, not for every step)."""
        return self.thetas().mean().item()

    def step(self) -> None:
        """Nothing to schedule (θ_ℓ are learnt). No host read: the trainer calls it after every optimisation step
        under --theta-unit step."""

    def thetas(self) -> torch.Tensor:
        """[L] the θ_ℓ, detached."""
        return torch.stack([layer.theta.detach() for layer in self.layers])

    def penalty(self) -> torch.Tensor:
        """Σ_ℓ μ_ℓ θ_ℓ² (0-d; differentiable in θ, the multipliers held fixed)."""
        thetas = torch.stack([layer.theta for layer in self.layers])
        return (self.multipliers.to(thetas.dtype) * thetas.square()).sum()

    def constraint(self) -> torch.Tensor:
        """[L] c_ℓ = θ_ℓ² (detached; ≤ 0 is the constraint, met only at θ_ℓ = 0)."""
        return self.thetas().to(self.multipliers.dtype).square()

    @torch.no_grad()
    def dual_step(self) -> None:
        """μ_ℓ ← max(0, μ_ℓ + η_μ c_ℓ), on the device."""
        self.multipliers.copy_((self.multipliers + self.dual_lr * self.constraint()).clamp_min(0))

    @torch.no_grad()
    def finish(self) -> None:
        """θ_ℓ := 0 everywhere (then :func:`relaxeq_fast.vn.project` drops the relaxation as usual)."""
        for layer in self.layers:
            layer.theta.zero_()

    def state_dict(self) -> dict:
        """``{"multipliers": μ}`` (a copy)."""
        return {"multipliers": self.multipliers.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Resume the multipliers from :meth:`state_dict`."""
        mu = state["multipliers"]
        if mu.shape != self.multipliers.shape:
            raise ValueError(f"multipliers must have shape {list(self.multipliers.shape)} (one per relaxed layer), "
                             f"got {list(mu.shape)}")
        self.multipliers.copy_(mu)


class ElasticTheta(DualTheta):
    """:class:`DualTheta` with the constraint relaxed by a learnt slack: |θ_ℓ| ≤ u_ℓ (issue 28's elastic variant,
    for approximately symmetric data; the resilient constraints of Hounie et al. that ACE's elastic variant uses).

    The constraint is written on θ² like DualTheta's: c_ℓ = θ_ℓ² − s_ℓ ≤ 0 with the slack s_ℓ = u_ℓ² ≥ 0 priced at
    slack_cost/2 · s_ℓ². The slack takes its best response to the multiplier, argmin_s (α/2 s² − μ_ℓ s) = μ_ℓ / α
    (α = slack_cost), every step, so the dual step is μ_ℓ ← max(0, μ_ℓ + η_μ (θ_ℓ² − μ_ℓ/α)). At a fixed point
    μ_ℓ = α θ_ℓ²: a layer whose task gradient g_ℓ = ∂L/∂θ_ℓ stays non-zero keeps |θ_ℓ| = (|g_ℓ| / 2α)^(1/3) (the
    pull 2 μ_ℓ θ_ℓ = 2α θ_ℓ³ balances it), a layer the task does not need returns to 0. α → ∞ is DualTheta.

    :meth:`finish` leaves θ_ℓ as learnt: the final model keeps its relaxation (no projection); measure it with
    :func:`layer_equivariance_errors`.
    """

    keeps_relaxation = True

    def __init__(self, model: nn.Module, theta_init: float = 1.0, dual_lr: float = 1.0, slack_cost: float = 1.0):
        if not (isinstance(slack_cost, (int, float)) and math.isfinite(slack_cost) and slack_cost > 0):
            raise ValueError(f"slack_cost must be a finite number > 0, got {slack_cost!r}")
        super().__init__(model, theta_init, dual_lr)
        self.slack_cost = float(slack_cost)

    def slacks(self) -> torch.Tensor:
        """[L] u_ℓ = √s_ℓ = √(μ_ℓ / α): the |θ_ℓ| the constraint allows now."""
        return (self.multipliers / self.slack_cost).sqrt()

    def constraint(self) -> torch.Tensor:
        """[L] c_ℓ = θ_ℓ² − μ_ℓ/α (detached)."""
        return self.thetas().to(self.multipliers.dtype).square() - self.multipliers / self.slack_cost

    def finish(self) -> None:
        """Nothing: the elastic model keeps its learnt θ_ℓ."""


@torch.no_grad()
def layer_equivariance_errors(model: nn.Module, inputs) -> list[dict]:
    """Per relaxed layer, how much of its output on ``inputs`` is not equivariant: ‖f_ℓ(x_ℓ) − f̂_ℓ(x_ℓ)‖ /
    ‖f_ℓ(x_ℓ)‖ with x_ℓ the layer's own inputs in one forward of the model on ``inputs`` and f̂_ℓ the equivariant
    layer nearest to f_ℓ (``project("nearest")``: what is left is θ_ℓ (W − P_eq W) x_ℓ and its bias). 0 exactly
    for an equivariant layer; the report of a model that keeps its relaxation (:class:`ElasticTheta`).

    inputs: the model's input tensor or a tuple of its positional arguments (see :func:`projection_error`).
    Returns one dict per layer, ``relaxed_layers`` order: ``name``, ``theta``, ``error``. Eval mode; the model is
    left as it was.
    """
    from .nn import RelaxedModule
    from .vn import separate_relaxed_calls
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, RelaxedModule)]
    seen: list = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((mod, args, out))) for _, m in layers]
    was_training = model.training
    model.eval()
    try:
        with separate_relaxed_calls():  # fused pairs of maps: each map's own call, for its hook
            model(*(tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    errors: dict = {}
    for mod, args, out in seen:  # a layer called twice in the forward: the sums over both calls
        nearest = mod.project("nearest").eval()
        diff, ref = errors.get(id(mod), (0.0, 0.0))
        errors[id(mod)] = (diff + float((out - nearest(*args)).square().sum()), ref + float(out.square().sum()))
    return [dict(name=name or type(m).__name__, theta=float(m.theta.detach()),
                 error=(errors[id(m)][0] / max(errors[id(m)][1], 1e-300)) ** 0.5 if id(m) in errors else float("nan"))
            for name, m in layers]


@torch.no_grad()
def projection_error(model: nn.Module, inputs, mode: str = "drop") -> float:
    """‖f_θ(x) − f_projected(x)‖ / ‖f_projected(x)‖ on ``inputs``: how far the relaxed model is from
    the equivariant model it will be projected to (0 at θ = 0).

    inputs: the model's input tensor (e.g. points [B, P, 3] for VNPointNet/VNDGCNN, images
    [B, C, H, W] for SteerableCNN), or a tuple of its positional arguments (e.g. an N-body model's
    (loc [B, n, 3], vel [B, n, 3], charges [B, n, 1])). The model's output may have any shape.
    mode: the projection, "drop" or "nearest" (see :func:`relaxeq_fast.project`).
    Returns a float.

    Both are evaluated in eval mode (running batch-norm statistics, no updates); the model is left as it
    was, training flag included.
    """
    from .vn import project
    was_training = model.training
    model.eval()
    try:
        projected = project(copy.deepcopy(model), mode)
        args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        ref = projected(*args)
        out = model(*args)
    finally:
        model.train(was_training)
    return ((out - ref).norm() / ref.norm().clamp_min(torch.finfo(ref.dtype).tiny)).item()


@torch.no_grad()
def relaxation_report(model: nn.Module) -> list[dict]:
    """Per relaxed layer of ``model``: how large its relaxation is and how much of it is equivariant (which
    "drop" projection throws away and "nearest" keeps).

    Returns one dict per layer: ``name`` (module path), ``theta``, ``relative_size`` ‖W‖/‖W_eq‖ (W the
    relaxation weight as the forward applies it: W_r, or its complement; the branch is θ times this size),
    ``equivariant_share`` ‖P_eq W‖²/‖W‖²
    (NaN for W = 0; a random VN W_r has 1/9 in expectation, the complement 0) and ``relax_norm`` ‖W‖.
    """
    from .nn import RelaxedModule
    out = []
    for name, m in model.named_modules():
        if isinstance(m, RelaxedModule):
            W_eq, W, PW = m.relaxation_parts()
            w2 = float((W * W).sum())
            out.append(dict(name=name or type(m).__name__, theta=float(m.theta.detach()),
                            relative_size=w2 ** 0.5 / max(float(W_eq.norm()), 1e-300),
                            equivariant_share=float((PW * PW).sum()) / w2 if w2 > 0 else float("nan"),
                            relax_norm=w2 ** 0.5))
    return out
