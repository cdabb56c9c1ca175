"""Seeded procedural 3D shapes: an embedded, offline stand-in for ModelNet40.

Every class has its own *intrinsic* geometry, so a rotation-invariant classifier (which sees each
cloud in a random orientation) can still tell the classes apart. Clouds come out in a canonical
orientation: the trainer's rotation protocol (aligned / z / SO(3)) rotates them, not this module.

Classes (``SHAPE_CLASSES``, in label order)::

     0 sphere              ellipsoid, semi-axes 1 : 1 : 1
     1 oblate_ellipsoid    ellipsoid, semi-axes 1 : 1 : 0.4
     2 triaxial_ellipsoid  ellipsoid, semi-axes 1 : 0.6 : 0.3
     3 cube                box surface, sides 1 : 1 : 1
     4 plate               box surface, sides 1 : 1 : 0.2
     5 rod                 box surface, sides 1 : 0.3 : 0.3
     6 torus               major radius 1, tube radius 0.35
     7 cylinder            closed (with both caps), radius 0.5, height 1
     8 cone                lateral surface + base disk, base radius 0.6, height 1.2
     9 capsule             cylinder of radius 0.35, length 1, with two hemispherical ends
    10 helix               open tube of radius 0.25 around a 2-turn helix (radius 1, rise 0.25 per radian)
    11 tetris_L            polycube surfaces (unit cubes, faces shared by two cubes removed) ...
    12 tetris_T
    13 tetris_S            (the planar S/Z piece: achiral in 3D, it is its own mirror image)
    14 tetris_chiral_a     ... and the chiral pair: 14 and 15 are mirror images of each other and no
    15 tetris_chiral_b         rotation maps one onto the other (an SO(3)-invariant model can separate them)

Sampling is uniform with respect to surface area, exactly: composite shapes pick a part (face, cap,
lateral surface, ...) with probability proportional to its area and sample uniformly inside it; curved
parametric surfaces (ellipsoid, torus, cone, helix tube) use the inverse CDF or rejection by the area
element. Then, per cloud: centring on the centroid and scaling into the unit sphere, Gaussian noise of
std ``noise`` (relative to that unit radius), and centring and scaling again, so the largest point
norm is exactly 1. No random scale/aspect jitter is applied (it would blur sphere /
oblate / triaxial and cube / plate, which differ only by their aspect ratios).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

__all__ = ["SHAPE_CLASSES", "TETRIS_CUBES", "make_shapes", "sample_surface"]

# Unit cubes (integer corner coordinates) of the polycube classes. chiral_b is chiral_a mirrored in y.
TETRIS_CUBES: dict[str, tuple[tuple[int, int, int], ...]] = {
    "tetris_L": ((0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 0)),
    "tetris_T": ((0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 1, 1)),
    "tetris_S": ((0, 0, 0), (1, 0, 0), (1, 1, 0), (2, 1, 0)),
    "tetris_chiral_a": ((0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 1, 0)),
    "tetris_chiral_b": ((0, 0, 0), (0, 0, 1), (1, 0, 0), (1, -1, 0)),
}

# Geometry of the continuous classes (used by the samplers below and by the tests' analytic areas).
ELLIPSOID_AXES = {"sphere": (1.0, 1.0, 1.0), "oblate_ellipsoid": (1.0, 1.0, 0.4),
                  "triaxial_ellipsoid": (1.0, 0.6, 0.3)}
BOX_SIDES = {"cube": (1.0, 1.0, 1.0), "plate": (1.0, 1.0, 0.2), "rod": (1.0, 0.3, 0.3)}
TORUS = dict(R=1.0, r=0.35)
CYLINDER = dict(radius=0.5, height=1.0)
CONE = dict(radius=0.6, height=1.2)
CAPSULE = dict(radius=0.35, length=1.0)
HELIX = dict(radius=1.0, rise=0.25, turns=2.0, tube=0.25)

Sampler = Callable[[int, np.random.Generator], np.ndarray]  # (number of points, rng) -> [n, 3] float64


# ---------------------------------------------------------------------------------------------------
# Elementary uniform samplers (all return float64 [n, 3] or [n, 2]).

def _unit_sphere(n: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _disk(n: int, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Uniform in a disk of the xy plane: radius ∝ sqrt(u) because the area element is ρ dρ dφ."""
    rho = radius * np.sqrt(rng.random(n))
    phi = rng.uniform(0.0, 2.0 * np.pi, n)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi)], axis=1)


def _rejection(n: int, rng: np.random.Generator, propose: Callable[[int], tuple[np.ndarray, np.ndarray]]
               ) -> np.ndarray:
    """Keep proposals with probability accept ∈ [0, 1] until n are kept (vectorised, few rounds).

    propose(m) returns (points [m, 3], acceptance probabilities [m]).
    """
    kept, total = [], 0
    while total < n:
        m = max(2 * (n - total), 64)
        pts, accept = propose(m)
        pts = pts[rng.random(m) < accept]
        kept.append(pts)
        total += len(pts)
    return np.concatenate(kept)[:n]


def _pick_parts(n: int, areas: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Index of the part of each point, drawn with probability ∝ part area."""
    return rng.choice(len(areas), size=n, p=np.asarray(areas, float) / np.sum(areas))


# ---------------------------------------------------------------------------------------------------
# Surfaces. Each returns a sampler for points of one canonical shape.

def _ellipsoid(a: float, b: float, c: float) -> Sampler:
    # Map the unit sphere u -> diag(a, b, c) u. The area of the image of the sphere's area element is
    # scaled by abc * |diag(1/a, 1/b, 1/c) u|, so rejection by that factor makes the ellipsoid uniform.
    inv = 1.0 / np.array([a, b, c])

    def sample(n, rng):
        def propose(m):
            u = _unit_sphere(m, rng)
            g = np.linalg.norm(u * inv, axis=1)
            return u * np.array([a, b, c]), g / inv.max()
        return _rejection(n, rng, propose)
    return sample


def _box_faces(sides) -> tuple[np.ndarray, np.ndarray]:
    """Six faces of a box centred at 0: (axis normal to the face, sign) and their areas."""
    sx, sy, sz = sides
    areas = np.array([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy])
    return np.array([0, 0, 1, 1, 2, 2]), areas


def _box(sides) -> Sampler:
    half = 0.5 * np.asarray(sides, float)
    axes, areas = _box_faces(sides)

    def sample(n, rng):
        face = _pick_parts(n, areas, rng)
        p = rng.uniform(-1.0, 1.0, (n, 3)) * half          # uniform in the box ...
        ax = axes[face]
        sign = np.where(face % 2 == 0, -1.0, 1.0)
        p[np.arange(n), ax] = sign * half[ax]              # ... then pressed onto the chosen face
        return p
    return sample


def _torus(R: float, r: float) -> Sampler:
    # x = ((R + r cos θ) cos φ, (R + r cos θ) sin φ, r sin θ); area element r (R + r cos θ) dθ dφ:
    # φ uniform, θ by rejection with probability (R + r cos θ) / (R + r).
    def sample(n, rng):
        def propose(m):
            th = rng.uniform(0.0, 2.0 * np.pi, m)
            ph = rng.uniform(0.0, 2.0 * np.pi, m)
            rho = R + r * np.cos(th)
            pts = np.stack([rho * np.cos(ph), rho * np.sin(ph), r * np.sin(th)], axis=1)
            return pts, rho / (R + r)
        return _rejection(n, rng, propose)
    return sample


def _cylinder(radius: float, height: float) -> Sampler:
    areas = np.array([2 * np.pi * radius * height, np.pi * radius ** 2, np.pi * radius ** 2])

    def sample(n, rng):
        part = _pick_parts(n, areas, rng)
        phi = rng.uniform(0.0, 2.0 * np.pi, n)
        side = np.stack([radius * np.cos(phi), radius * np.sin(phi),
                         rng.uniform(-height / 2, height / 2, n)], axis=1)
        cap = np.concatenate([_disk(n, radius, rng), np.where(part == 1, -height / 2, height / 2)[:, None]], axis=1)
        return np.where((part == 0)[:, None], side, cap)
    return sample


def _cone(radius: float, height: float) -> Sampler:
    # Lateral surface: a point at fraction t of the way from apex to base lies on a circle of length
    # ∝ t, so t = sqrt(u). Apex at z = height, base disk at z = 0.
    slant = float(np.hypot(radius, height))
    areas = np.array([np.pi * radius * slant, np.pi * radius ** 2])

    def sample(n, rng):
        part = _pick_parts(n, areas, rng)
        t = np.sqrt(rng.random(n))
        phi = rng.uniform(0.0, 2.0 * np.pi, n)
        lateral = np.stack([t * radius * np.cos(phi), t * radius * np.sin(phi), height * (1 - t)], axis=1)
        base = np.concatenate([_disk(n, radius, rng), np.zeros((n, 1))], axis=1)
        return np.where((part == 0)[:, None], lateral, base)
    return sample


def _capsule(radius: float, length: float) -> Sampler:
    # Cylinder side (area 2π r L) and two hemispheres (2π r² each), axis z, centred at 0.
    areas = np.array([2 * np.pi * radius * length, 4 * np.pi * radius ** 2])

    def sample(n, rng):
        part = _pick_parts(n, areas, rng)
        phi = rng.uniform(0.0, 2.0 * np.pi, n)
        side = np.stack([radius * np.cos(phi), radius * np.sin(phi),
                         rng.uniform(-length / 2, length / 2, n)], axis=1)
        u = radius * _unit_sphere(n, rng)                  # a sphere split into its two halves
        u[:, 2] += np.sign(u[:, 2]) * length / 2
        return np.where((part == 0)[:, None], side, u)
    return sample


def _helix_tube(radius: float, rise: float, turns: float, tube: float) -> Sampler:
    # Centre curve c(t) = (R cos t, R sin t, p t), t ∈ [0, 2π turns]: constant speed |c'| = sqrt(R² + p²)
    # and curvature κ = R / (R² + p²). The tube c(t) + a (cos s N + sin s B) (N the principal normal,
    # pointing to the axis) has area element a |c'| (1 - κ a cos s) ds dt: t uniform, s by rejection.
    speed2 = radius ** 2 + rise ** 2
    kappa = radius / speed2
    assert kappa * tube < 1, "the helix tube must not fold onto itself"
    t_max = 2 * np.pi * turns

    def sample(n, rng):
        def propose(m):
            t = rng.uniform(0.0, t_max, m)
            s = rng.uniform(0.0, 2.0 * np.pi, m)
            ct, st = np.cos(t), np.sin(t)
            centre = np.stack([radius * ct, radius * st, rise * t - rise * t_max / 2], axis=1)
            normal = np.stack([-ct, -st, np.zeros(m)], axis=1)
            tangent = np.stack([-radius * st, radius * ct, np.full(m, rise)], axis=1) / np.sqrt(speed2)
            binormal = np.cross(tangent, normal)
            pts = centre + tube * (np.cos(s)[:, None] * normal + np.sin(s)[:, None] * binormal)
            return pts, (1 - kappa * tube * np.cos(s)) / (1 + kappa * tube)
        return _rejection(n, rng, propose)
    return sample


def polycube_faces(cubes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exposed unit faces of a union of unit cubes: (corner [F, 3], normal axis [F], side ±1 [F]).

    A face shared by two cubes is interior and dropped, so the faces tile the surface exactly once.
    """
    occupied = {tuple(c) for c in cubes}
    corner, axis, side = [], [], []
    for c in cubes:
        for ax in range(3):
            for sgn in (-1, 1):
                nb = list(c)
                nb[ax] += sgn
                if tuple(nb) not in occupied:
                    corner.append(c)
                    axis.append(ax)
                    side.append(sgn)
    return np.array(corner, float), np.array(axis), np.array(side, float)


def _polycube(cubes) -> Sampler:
    corner, axis, side = polycube_faces(cubes)             # every face has area 1: pick uniformly

    def sample(n, rng):
        f = rng.integers(0, len(corner), n)
        p = corner[f] + rng.random((n, 3))
        ax = axis[f]
        p[np.arange(n), ax] = corner[f, ax] + (side[f] > 0)
        return p
    return sample


_SAMPLERS: dict[str, Sampler] = {
    **{name: _ellipsoid(*axes) for name, axes in ELLIPSOID_AXES.items()},
    **{name: _box(sides) for name, sides in BOX_SIDES.items()},
    "torus": _torus(**TORUS),
    "cylinder": _cylinder(**CYLINDER),
    "cone": _cone(**CONE),
    "capsule": _capsule(**CAPSULE),
    "helix": _helix_tube(**HELIX),
    **{name: _polycube(cubes) for name, cubes in TETRIS_CUBES.items()},
}

SHAPE_CLASSES: list[str] = list(_SAMPLERS)


# ---------------------------------------------------------------------------------------------------
# Public API

def sample_surface(name: str, n_clouds: int, num_points: int, rng: np.random.Generator) -> np.ndarray:
    """Raw area-uniform samples of one class: float64 [n_clouds, num_points, 3], canonical pose and
    size, no noise and no normalisation (what make_shapes starts from; the tests check it)."""
    if name not in _SAMPLERS:
        raise ValueError(f"shape class must be one of {SHAPE_CLASSES}, got {name!r}")
    return _SAMPLERS[name](n_clouds * num_points, rng).reshape(n_clouds, num_points, 3)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Centre each cloud [N, P, 3] on its centroid and scale it so its largest norm is 1."""
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=2).max(axis=1)[:, None, None]


def make_shapes(n_per_class: int, num_points: int, seed: int = 0, noise: float = 0.01
                ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded point clouds of every class in SHAPE_CLASSES.

    Returns (points float32 [N, num_points, 3], labels int64 [N]) with N = n_per_class * len(SHAPE_CLASSES),
    in a seeded random order (not sorted by class). Each cloud: area-uniform surface samples, centred on
    the centroid and scaled into the unit sphere; then Gaussian noise of std `noise` (so in units of the
    cloud's radius), and centred and scaled again, so that its largest norm is exactly 1. Same seed,
    same arrays.
    """
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = np.random.default_rng(seed)
    clouds = [sample_surface(name, n_per_class, num_points, rng) for name in SHAPE_CLASSES]
    y = np.repeat(np.arange(len(SHAPE_CLASSES), dtype=np.int64), n_per_class)
    order = rng.permutation(len(y))                        # drawn before the noise: same order for any noise
    x = _normalise(np.concatenate(clouds))
    if noise > 0:
        # Noise in the unit-sphere scale, so `noise` means the same for every class; the second
        # normalisation puts the noisy cloud back inside the unit sphere.
        x = _normalise(x + noise * rng.standard_normal(x.shape))
    return x[order].astype(np.float32), y[order]
