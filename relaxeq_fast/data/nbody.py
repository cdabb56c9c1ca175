"""The charged N-body task, simulated here (issue 14): NRI's charged-particle system in 3D without a box, as
the E(n)-GNN and SEGNN papers (and the relaxation paper's ``Nbody_sim/``) use it.

Physics of one simulation (float64):

* n = 5 particles of unit mass with charges q_i = ±1 (each with probability 1/2);
* positions x_i(0) ~ N(0, loc_std² I₃) with loc_std = 1; velocities v_i(0) = vel_norm · u_i / |u_i|,
  u_i ~ N(0, I₃), vel_norm = 0.5 (every particle starts at speed 0.5, in a random direction);
* force F_i = c Σ_{j≠i} q_i q_j (x_i − x_j) / |x_i − x_j|³ with c = 1 (like charges repel), each component
  clipped to ±max_F = 0.1 / Δt as in the public generator (only close encounters reach it);
* symplectic Euler with Δt = 0.001 as the public generator steps: v += Δt F(x) once at the start, then per step
  x += Δt v, record (x, v) every 100 steps, v += Δt F(x).

The task: from frame 30 (positions, velocities, charges) predict the positions at frame 40, 1000 steps later
(frames are 100 steps apart; only the first 40 are simulated). Sizes: 3000 training, 2000 validation and 2000
test simulations, each split from its own seed.

    train, val, test = load_nbody(seed=0)          # NBodyData(loc, vel, charges, target), [N, 5, 3] / [N, 5, 1]

Generated on first use (~10–30 s on 2 cores) and cached under ``cache_dir`` (default
``~/.cache/relaxeq_fast/nbody``), keyed by every parameter.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import NamedTuple, Optional

import numpy as np
import torch

INPUT_FRAME, TARGET_FRAME, STEPS_PER_FRAME = 30, 40, 100
SIZES = {"train": 3000, "val": 2000, "test": 2000}


class NBodyData(NamedTuple):
    """One split: loc, vel [N, n, 3] float32 at the input frame, charges [N, n, 1] float32 (±1), target
    [N, n, 3] float32 (the positions at the target frame)."""
    loc: torch.Tensor
    vel: torch.Tensor
    charges: torch.Tensor
    target: torch.Tensor


def _pairs(loc: torch.Tensor, charges: torch.Tensor):
    """(x_i − x_j [..., n, n, 3], |x_i − x_j| clamped away from 0 [..., n, n], q_i q_j [..., n, n])."""
    diff = loc[..., :, None, :] - loc[..., None, :, :]
    return diff, diff.norm(dim=-1).clamp_min(1e-12), charges[..., :, None] * charges[..., None, :]


def coulomb_forces(loc: torch.Tensor, charges: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """F [..., n, 3] = strength Σ_{j≠i} q_i q_j (x_i − x_j) / |x_i − x_j|³ for loc [..., n, 3], charges [..., n]."""
    diff, dist, qq = _pairs(loc, charges)
    eye = torch.eye(loc.shape[-2], dtype=torch.bool, device=loc.device)
    inv_cube = torch.where(eye, torch.zeros_like(dist), dist ** -3)
    return strength * ((qq * inv_cube)[..., None] * diff).sum(-2)


def energy(loc: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Total energy [...]: Σ |v_i|²/2 + strength Σ_{i<j} q_i q_j / |x_i − x_j| (unit masses)."""
    kinetic = 0.5 * vel.square().sum((-1, -2))
    _diff, dist, qq = _pairs(loc, charges)
    upper = torch.triu(torch.ones(dist.shape[-2:], dtype=torch.bool, device=loc.device), 1)
    return kinetic + strength * torch.where(upper, qq / dist, torch.zeros_like(dist)).sum((-1, -2))


def simulate(n_sims: int, seed: int, n_particles: int = 5, n_frames: int = TARGET_FRAME + 1,
             steps_per_frame: int = STEPS_PER_FRAME, dt: float = 1e-3, loc_std: float = 1.0, vel_norm: float = 0.5,
             strength: float = 1.0, clip: bool = True, initial: Optional[tuple] = None):
    """Trajectories of ``n_sims`` independent simulations (the module docstring's physics), float64.

    initial: (loc [n_sims, n, 3], vel [n_sims, n, 3], charges [n_sims, n]) to start from instead of the
    seeded draw (e.g. a rotated copy of another start).

    Returns (loc [n_sims, n_frames, n, 3], vel [n_sims, n_frames, n, 3], charges [n_sims, n], clipped
    [n_sims] bool: whether a force component reached the clip). Frame 0 is the initial state.
    """
    for name, value in (("n_sims", n_sims), ("n_particles", n_particles), ("n_frames", n_frames),
                        ("steps_per_frame", steps_per_frame)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"simulate: {name} must be a positive int, got {value!r}")
    if not dt > 0:
        raise ValueError(f"simulate: dt must be positive, got {dt!r}")
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64
    charges = torch.where(torch.rand(n_sims, n_particles, generator=gen, dtype=f64) < 0.5, -1.0, 1.0).to(f64)
    loc = torch.randn(n_sims, n_particles, 3, generator=gen, dtype=f64) * loc_std
    u = torch.randn(n_sims, n_particles, 3, generator=gen, dtype=f64)
    vel = vel_norm * u / u.norm(dim=-1, keepdim=True)
    if initial is not None:
        loc, vel, charges = (t.to(f64) for t in initial)
        if loc.shape != (n_sims, n_particles, 3) or vel.shape != loc.shape or charges.shape != loc.shape[:2]:
            raise ValueError(f"simulate: initial must be (loc, vel) [{n_sims}, {n_particles}, 3] and charges "
                             f"[{n_sims}, {n_particles}], got {[list(t.shape) for t in initial]}")
    max_f = 0.1 / dt
    clipped = torch.zeros(n_sims, dtype=torch.bool)

    def force(x):
        nonlocal clipped
        F = coulomb_forces(x, charges, strength)
        if clip:
            clipped = clipped | (F.abs() > max_f).flatten(1).any(1)
            F = F.clamp(-max_f, max_f)
        return F

    locs, vels = [loc], [vel]
    vel = vel + dt * force(loc)
    for step in range(1, (n_frames - 1) * steps_per_frame + 1):
        loc = loc + dt * vel
        if step % steps_per_frame == 0:  # recorded between the drift and the kick, as the public generator
            locs.append(loc)
            vels.append(vel)
        vel = vel + dt * force(loc)
    return torch.stack(locs, 1), torch.stack(vels, 1), charges, clipped


def _split_seeds(seed: int) -> dict[str, int]:
    children = np.random.SeedSequence(seed).spawn(len(SIZES))
    return {name: int(child.generate_state(1)[0]) for name, child in zip(SIZES, children)}


def make_split(n: int, seed: int) -> NBodyData:
    loc, vel, charges, _clipped = simulate(n, seed)
    f32 = torch.float32
    return NBodyData(loc[:, INPUT_FRAME].to(f32), vel[:, INPUT_FRAME].to(f32), charges[..., None].to(f32),
                     loc[:, TARGET_FRAME].to(f32))


def cache_path(seed: int = 0, cache_dir: Optional[str] = None) -> str:
    """Where :func:`load_nbody` keeps the splits of ``seed``: a file named by every generation parameter."""
    cache_dir = os.path.expanduser(cache_dir or os.path.join("~", ".cache", "relaxeq_fast", "nbody"))
    key = hashlib.sha256(json.dumps({"seed": seed, "sizes": SIZES, "frames": [INPUT_FRAME, TARGET_FRAME],
                                     "steps_per_frame": STEPS_PER_FRAME, "version": 1}).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"charged5_{key}.pt")


def load_nbody(seed: int = 0, n_train: Optional[int] = None, n_val: Optional[int] = None,
               n_test: Optional[int] = None, cache_dir: Optional[str] = None) -> tuple[NBodyData, NBodyData, NBodyData]:
    """(train, val, test) of the charged N-body task (sizes default to 3000 / 2000 / 2000), generated on first
    use and cached. A smaller split is the first n simulations of the full one (same seed)."""
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    for name, n in sizes.items():
        if n is not None and not (isinstance(n, int) and 1 <= n <= SIZES[name]):
            raise ValueError(f"load_nbody: n_{name} must be an int in [1, {SIZES[name]}], got {n!r}")
    path = cache_path(seed, cache_dir)
    if os.path.isfile(path):
        splits = torch.load(path, weights_only=True)
    else:
        seeds = _split_seeds(seed)
        splits = {name: make_split(SIZES[name], seeds[name])._asdict() for name in SIZES}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        torch.save(splits, tmp)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the whole file or none
    out = []
    for name in SIZES:
        n = sizes[name] or SIZES[name]
        out.append(NBodyData(**{k: v[:n] for k, v in splits[name].items()}))
    return tuple(out)
