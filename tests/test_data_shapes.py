"""relaxeq_fast.data.shapes: the procedural shape classes (determinism, balance, normalisation, noise,
area-uniform surface sampling against exact and meshed areas, the chiral pair) and load_dataset("shapes")."""
import itertools
import math

import numpy as np
import pytest
import torch

from relaxeq_fast.data import SHAPE_CLASSES, LabeledData, load_dataset, make_shapes
from relaxeq_fast.data import shapes
from testing import assert_fraction, binomial_tol


def raw(name: str, n_points: int, seed: int = 0) -> np.ndarray:
    """Canonical, noise-free surface samples of one class: [n_points, 3]."""
    return shapes.sample_surface(name, 1, n_points, np.random.default_rng(seed))[0]


def mesh_area_fraction(surface, u_range, v_range, region, n: int = 600) -> float:
    """Area fraction of a parametric surface inside `region`, from a fine triangle mesh.

    surface(u, v) -> [..., 3]; region(points [..., 3]) -> bool, evaluated at triangle centroids.
    """
    u, v = np.meshgrid(np.linspace(*u_range, n + 1), np.linspace(*v_range, n + 1), indexing="ij")
    p = surface(u, v)
    a, b, c, d = p[:-1, :-1], p[1:, :-1], p[1:, 1:], p[:-1, 1:]
    areas, inside = [], []
    for t0, t1, t2 in ((a, b, c), (a, c, d)):
        areas.append(0.5 * np.linalg.norm(np.cross(t1 - t0, t2 - t0), axis=-1))
        inside.append(region((t0 + t1 + t2) / 3))
    areas, inside = np.stack(areas), np.stack(inside)
    return float(areas[inside].sum() / areas.sum())


def test_shape_classes():
    assert len(SHAPE_CLASSES) >= 12
    assert len(set(SHAPE_CLASSES)) == len(SHAPE_CLASSES)
    assert shapes.__doc__ is not None and all(name in shapes.__doc__ for name in SHAPE_CLASSES)


def test_make_shapes_deterministic_per_seed():
    x1, y1 = make_shapes(2, 128, seed=3)
    x2, y2 = make_shapes(2, 128, seed=3)
    x3, y3 = make_shapes(2, 128, seed=4)
    assert x1.dtype == np.float32 and y1.dtype == np.int64
    assert x1.shape == (2 * len(SHAPE_CLASSES), 128, 3) and y1.shape == (2 * len(SHAPE_CLASSES),)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(x1[np.argsort(y1, kind="stable")], x3[np.argsort(y3, kind="stable")])


def test_make_shapes_balanced_labels():
    _, y = make_shapes(5, 64, seed=0)
    counts = np.bincount(y, minlength=len(SHAPE_CLASSES))
    assert counts.tolist() == [5] * len(SHAPE_CLASSES)


@pytest.mark.parametrize("noise", [0.0, 0.01, 0.05])
def test_make_shapes_normalised(noise):
    x, _ = make_shapes(3, 256, seed=1, noise=noise)
    norms = np.linalg.norm(x, axis=2)
    centroid_err = np.abs(x.mean(axis=1)).max()
    print(f"noise {noise}: max |centroid| {centroid_err:.2e}, max norm range [{norms.max(1).min():.7f}, "
          f"{norms.max(1).max():.7f}]")
    assert centroid_err < 1e-5
    assert norms.max() <= 1 + 1e-5
    np.testing.assert_allclose(norms.max(axis=1), 1.0, atol=1e-5)


def test_make_shapes_noise_level():
    """noise is in unit-sphere units, for every class: undoing the final rescale of a noisy cloud leaves
    its clean version (same seed, same surface samples) plus noise of std ≈ noise per coordinate."""
    clean, y_clean = make_shapes(1, 4096, seed=2, noise=0.0)
    for noise in (0.01, 0.03):
        noisy, y = make_shapes(1, 4096, seed=2, noise=noise)
        assert np.array_equal(y, y_clean), "the class order does not depend on the noise"
        a, b = noisy.astype(np.float64), clean.astype(np.float64)
        scale = (a * b).sum((1, 2)) / (a * a).sum((1, 2))      # least squares: scale · noisy ≈ clean
        std = (scale[:, None, None] * a - b).std(axis=(1, 2))
        print(f"noise {noise}: per-class residual std {np.round(std, 4)}")
        assert np.all(np.abs(std - noise) <= 0.1 * noise)


def test_box_face_fractions_match_areas():
    n = 200_000
    for name, sides in shapes.BOX_SIDES.items():
        p = raw(name, n)
        half = np.array(sides) / 2
        on_face = np.isclose(np.abs(p), half, rtol=0, atol=1e-12)
        assert np.all(on_face.sum(axis=1) == 1), f"{name}: every point lies on exactly one face"
        assert np.all(np.abs(p) <= half + 1e-12)
        areas = np.array([sides[1] * sides[2], sides[0] * sides[2], sides[0] * sides[1]])
        for ax in range(3):
            for sign in (-1, 1):
                frac = np.mean(on_face[:, ax] & (np.sign(p[:, ax]) == sign))
                assert_fraction(frac, areas[ax] / (2 * areas.sum()), n, f"{name} face {'-+'[sign > 0]}{'xyz'[ax]}")


def test_torus_outer_half_matches_area():
    # Outer half (ρ > R ⇔ cos θ > 0): area ∝ ∫_{-π/2}^{π/2} (R + r cos θ) dθ = πR + 2r; total 2πR.
    R, r = shapes.TORUS["R"], shapes.TORUS["r"]
    n = 200_000
    p = raw("torus", n)
    rho = np.hypot(p[:, 0], p[:, 1])
    tube_dist = np.hypot(rho - R, p[:, 2])
    np.testing.assert_allclose(tube_dist, r, atol=1e-12)
    assert_fraction(np.mean(rho > R), (math.pi * R + 2 * r) / (2 * math.pi * R), n, "torus outer half")


def test_cylinder_cone_capsule_part_fractions():
    n = 200_000
    rad, h = shapes.CYLINDER["radius"], shapes.CYLINDER["height"]
    p = raw("cylinder", n)
    caps = np.isclose(np.abs(p[:, 2]), h / 2, rtol=0, atol=1e-12)
    assert np.all(np.hypot(p[~caps, 0], p[~caps, 1]) == pytest.approx(rad))
    assert_fraction(caps.mean(), rad / (rad + h), n, "cylinder caps")           # 2πr² / (2πr² + 2πrh)
    assert_fraction(np.mean(p[caps, 2] > 0), 0.5, caps.sum(), "cylinder top cap")
    assert_fraction(np.mean(np.hypot(p[caps, 0], p[caps, 1]) < rad / 2), 0.25, caps.sum(), "cap inner disk")

    rad, h = shapes.CONE["radius"], shapes.CONE["height"]
    slant = math.hypot(rad, h)
    p = raw("cone", n)
    base = p[:, 2] == 0
    assert_fraction(base.mean(), rad / (rad + slant), n, "cone base")             # πr² / (πr² + πrs)
    # Lateral area within distance τ·s of the apex ∝ τ²: the lower half (z < h/2) holds 3/4 of it.
    assert_fraction(np.mean(p[~base, 2] < h / 2), 0.75, (~base).sum(), "cone lateral lower half")

    rad, length = shapes.CAPSULE["radius"], shapes.CAPSULE["length"]
    p = raw("capsule", n)
    ends = np.abs(p[:, 2]) > length / 2
    assert_fraction(ends.mean(), 2 * rad / (2 * rad + length), n, "capsule hemispheres")
    # A hemisphere's zone between heights z and z + dz has area 2πr dz (Archimedes): half above r/2.
    assert_fraction(np.mean(np.abs(p[ends, 2]) - length / 2 > rad / 2), 0.5, ends.sum(), "hemisphere upper zone")


def test_ellipsoid_area_uniform_against_mesh():
    n = 200_000
    for name, (a, b, c) in shapes.ELLIPSOID_AXES.items():
        p = raw(name, n)
        np.testing.assert_allclose(((p / [a, b, c]) ** 2).sum(1), 1.0, atol=1e-12)

        def surface(th, ph):
            return np.stack([a * np.sin(th) * np.cos(ph), b * np.sin(th) * np.sin(ph), c * np.cos(th)], -1)

        for label, region in (("|z| > c/2", lambda q: np.abs(q[..., 2]) > c / 2),
                              ("x > a/2", lambda q: q[..., 0] > a / 2)):
            expected = mesh_area_fraction(surface, (0, math.pi), (0, 2 * math.pi), region)
            assert_fraction(np.mean(region(p)), expected, n, f"{name} {label}", extra=2e-3)


def test_helix_tube_area_uniform_against_mesh():
    R, rise, turns, a = (shapes.HELIX[k] for k in ("radius", "rise", "turns", "tube"))
    speed = math.hypot(R, rise)
    n = 200_000
    p = raw("helix", n)

    def surface(t, s):
        centre = np.stack([R * np.cos(t), R * np.sin(t), rise * t], -1)
        normal = np.stack([-np.cos(t), -np.sin(t), np.zeros_like(t)], -1)
        binormal = np.stack([rise * np.sin(t), -rise * np.cos(t), np.full_like(t, R)], -1) / speed
        return centre + a * (np.cos(s)[..., None] * normal + np.sin(s)[..., None] * binormal)

    # The side facing the axis has less area than the outer side (factor 1 - κ a cos s).
    inner = mesh_area_fraction(surface, (0, 2 * math.pi * turns), (0, 2 * math.pi),
                               lambda q: np.hypot(q[..., 0], q[..., 1]) < R, n=800)
    assert inner < 0.47, f"the test region must discriminate: mesh inner fraction {inner:.4f}"
    assert_fraction(np.mean(np.hypot(p[:, 0], p[:, 1]) < R), inner, n, "helix tube inner side", extra=2e-3)


def test_polycube_faces_uniform():
    for name, cubes in shapes.TETRIS_CUBES.items():
        corner, axis, side = shapes.polycube_faces(cubes)
        shared = sum(1 for c1, c2 in itertools.combinations(cubes, 2) if np.abs(np.subtract(c1, c2)).sum() == 1)
        assert len(corner) == 6 * len(cubes) - 2 * shared, name
        n = 90_000
        p = raw(name, n)
        # Which face each point lies on: on the face's plane, and inside the face's unit square.
        plane = corner[np.arange(len(corner)), axis] + (side > 0)                      # [F]
        on_plane = np.isclose(p[:, axis], plane, rtol=0, atol=1e-12)                    # [n, F]
        inside = np.all((p[:, None] >= corner - 1e-12) & (p[:, None] <= corner + 1 + 1e-12), axis=2)
        face_of = on_plane & inside
        assert np.all(face_of.sum(1) >= 1), f"{name}: some points lie on no exposed face"
        counts = face_of.sum(0)
        expected = 1 / len(corner)
        for f, cnt in enumerate(counts):
            assert abs(cnt / n - expected) <= binomial_tol(expected, n), \
                f"{name} face {f}: {cnt / n:.4f} vs {expected:.4f}"


def kabsch_rmsd(a: np.ndarray, b: np.ndarray, proper: bool) -> float:
    """RMSD after the best orthogonal map (det +1 only if proper) of centred a onto centred b."""
    a, b = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.eye(3)
    if proper and np.linalg.det(u @ vt) < 0:
        d[2, 2] = -1
    rot = u @ d @ vt
    return float(np.sqrt(((a @ rot - b) ** 2).sum(1).mean()))


def signed_permutations(det: int):
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((-1, 1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if round(np.linalg.det(m)) == det:
                yield m


def test_chiral_pair_is_mirror_not_rotation():
    a = np.array(shapes.TETRIS_CUBES["tetris_chiral_a"], float)
    b = np.array(shapes.TETRIS_CUBES["tetris_chiral_b"], float)
    # Cube centres, over every correspondence: the best rotation leaves a large residual, an orthogonal
    # map with a reflection aligns them exactly.
    best_rot = min(kabsch_rmsd(a, b[list(p)], proper=True) for p in itertools.permutations(range(4)))
    best_ortho = min(kabsch_rmsd(a, b[list(p)], proper=False) for p in itertools.permutations(range(4)))
    print(f"cube centres: best rotation rmsd {best_rot:.3f}, best orthogonal rmsd {best_ortho:.2e}")
    assert best_rot > 0.2 and best_ortho < 1e-9

    # The sampled, normalised clouds: a congruence of polycubes maps face normals to face normals, so it
    # is a signed permutation. No rotation of that kind brings a onto b; a reflection does.
    x, y = make_shapes(1, 2048, seed=5, noise=0.0)
    pa = torch.from_numpy(x[y == SHAPE_CLASSES.index("tetris_chiral_a")][0])
    pb = torch.from_numpy(x[y == SHAPE_CLASSES.index("tetris_chiral_b")][0])

    def chamfer(p, q):
        """99th percentile of the nearest-neighbour distances both ways (a Hausdorff distance that
        ignores the few points nearest to misplaced parts)."""
        d = torch.cdist(p, q)
        return torch.cat([d.min(0).values, d.min(1).values]).quantile(0.99).item()

    via_rot = min(chamfer(pa @ torch.from_numpy(m).float().T, pb) for m in signed_permutations(+1))
    via_mirror = min(chamfer(pa @ torch.from_numpy(m).float().T, pb) for m in signed_permutations(-1))
    x6, y6 = make_shapes(1, 2048, seed=6, noise=0.0)
    baseline = chamfer(pb, torch.from_numpy(x6[y6 == SHAPE_CLASSES.index("tetris_chiral_b")][0]))
    print(f"distance: best rotation {via_rot:.4f}, best reflection {via_mirror:.4f}, "
          f"resampled same class {baseline:.4f}")
    assert via_mirror < 1.5 * baseline
    assert via_rot > 3 * baseline


def test_load_dataset_shapes_defaults_complete():
    train, test = load_dataset("shapes")
    assert isinstance(train, LabeledData)
    assert train.x.shape == (1200, 1024, 3) and test.x.shape == (480, 1024, 3)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.class_names == SHAPE_CLASSES
    assert torch.bincount(train.y).tolist() == [1200 // len(SHAPE_CLASSES)] * len(SHAPE_CLASSES)
    assert torch.isfinite(train.x).all()


def test_load_dataset_shapes_sizes_and_seeds():
    c = len(SHAPE_CLASSES)
    tr, te = load_dataset("shapes", num_points=32, n_train=100, n_test=3, seed=7)
    assert tr.x.shape == (round(100 / c) * c, 32, 3)
    assert te.x.shape == (c, 32, 3), "at least one sample per class"
    tr2, te2 = load_dataset("shapes", root="/ignored", num_points=32, n_train=100, n_test=3, seed=7)
    assert torch.equal(tr.x, tr2.x) and torch.equal(te.x, te2.x)
    # Train and test come from different seeds, and the seed matters.
    trc, tec = load_dataset("shapes", num_points=32, n_train=c, n_test=c, seed=7)
    assert not torch.equal(trc.x[trc.y.argsort()], tec.x[tec.y.argsort()])
    tr8, _ = load_dataset("shapes", num_points=32, n_train=c, n_test=c, seed=8)
    assert not torch.equal(trc.x[trc.y.argsort()], tr8.x[tr8.y.argsort()])
