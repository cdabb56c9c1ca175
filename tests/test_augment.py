"""relaxeq_fast.data.augment: random rotations (SO(3) roughly Haar, z, aligned), point-cloud augmentations
(rotate, point dropout, scale, shift, jitter) and image rotation."""
import math

import pytest
import torch

from relaxeq_fast.data import (anisotropic_scale, isotropic_scale, jitter, point_dropout, random_rotate_images,
                               random_rotations, rotate, rotate_images, shift)
from testing import assert_fraction


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
