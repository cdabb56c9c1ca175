"""Batched data augmentations of the paper's experiments, in torch.

Every random draw comes from the `generator` argument (a torch.Generator) when one is given, so a run
is reproducible from its seeds; with generator=None the global torch RNG is used. Draws are made in
float64 on the generator's device and then cast, so the same generator state gives the same
transformation for float32 and float64 inputs.

Point clouds are [B, P, 3]; images are [B, C, H, W].
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ROTATION_KINDS", "anisotropic_scale", "isotropic_scale", "jitter", "point_dropout", "random_rotate_images",
           "random_rotations", "rotate", "rotate_images", "shift"]

ROTATION_KINDS = ("so3", "z", "aligned")


def _draw(fn, shape, generator: torch.Generator | None, device, dtype) -> torch.Tensor:
    """fn(shape) ∈ {torch.rand, torch.randn} drawn in float64 where the generator lives, then moved."""
    where = generator.device if generator is not None else (device if device is not None else "cpu")
    out = fn(shape, generator=generator, dtype=torch.float64, device=where)
    return out.to(device=device if device is not None else out.device, dtype=dtype)


def _check_points(points: torch.Tensor, name: str = "points") -> None:
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [B, P, 3], got {list(points.shape)}")


def random_rotations(n: int, kind: str = "so3", generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """[n, 3, 3] rotation matrices.

    kind "so3": Haar-uniform on SO(3) (normalised Gaussian quaternions are uniform on S³, and S³ → SO(3)
    is the double cover carrying the Haar measure); "z": rotation about the z axis by an angle uniform in
    [0, 2π); "aligned": the identity (no random draw).
    """
    if kind not in ROTATION_KINDS:
        raise ValueError(f"kind must be one of {list(ROTATION_KINDS)}, got {kind!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if kind == "aligned":
        return torch.eye(3, dtype=dtype, device=device).expand(n, 3, 3).clone()
    if kind == "z":
        angle = 2 * math.pi * _draw(torch.rand, (n,), generator, device, torch.float64)
        c, s = angle.cos(), angle.sin()
        zero, one = torch.zeros_like(c), torch.ones_like(c)
        rot = torch.stack([c, -s, zero, s, c, zero, zero, zero, one], dim=-1).reshape(n, 3, 3)
        return rot.to(dtype)
    q = _draw(torch.randn, (n, 4), generator, device, torch.float64)
    w, x, y, z = (q / q.norm(dim=-1, keepdim=True)).unbind(-1)
    rot = torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(n, 3, 3)
    return rot.to(dtype)


def rotate(points: torch.Tensor, kind: str = "so3", generator: torch.Generator | None = None,
           *, return_rotations: bool = False):
    """Rotate each cloud [B, P, 3] by its own random rotation R_b: out_b = points_b @ R_bᵀ.

    With return_rotations=True returns (rotated, R [B, 3, 3]).
    """
    _check_points(points)
    rot = random_rotations(points.shape[0], kind, generator, dtype=points.dtype, device=points.device)
    out = points @ rot.transpose(-1, -2)
    return (out, rot) if return_rotations else out


def point_dropout(points: torch.Tensor, max_ratio: float = 0.875,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """PointNet++-style random input dropout, shape-preserving.

    Per cloud, a ratio r ~ U[0, max_ratio) is drawn and each point is dropped with probability r by
    overwriting it with the cloud's first point (so duplicates, not fewer points). Other points are
    left bit-for-bit unchanged.
    """
    _check_points(points)
    if not 0 <= max_ratio < 1:
        raise ValueError(f"max_ratio must be in [0, 1), got {max_ratio}")
    b, p, _ = points.shape
    ratio = max_ratio * _draw(torch.rand, (b, 1), generator, points.device, torch.float64)
    drop = _draw(torch.rand, (b, p), generator, points.device, torch.float64) < ratio
    return torch.where(drop.unsqueeze(-1), points[:, :1], points)


def anisotropic_scale(points: torch.Tensor, low: float = 2.0 / 3.0, high: float = 1.5,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each axis of each cloud by its own factor ~ U[low, high).

    Note: a per-axis scale does not commute with rotations, so it breaks the exact rotation
    equivariance of the data distribution. The paper's ModelNet setup applies it (as the PointNet++
    training code does) in the aligned protocol; do not use it when measuring equivariance.
    """
    _check_points(points)
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    scale = low + (high - low) * _draw(torch.rand, (points.shape[0], 1, 3), generator, points.device, points.dtype)
    return points * scale


def isotropic_scale(points: torch.Tensor, low: float = 0.8, high: float = 1.25,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale each cloud by one factor ~ U[low, high) (commutes with rotations)."""
    _check_points(points)
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got low={low}, high={high}")
    factor = low + (high - low) * _draw(torch.rand, (points.shape[0], 1, 1), generator, points.device, points.dtype)
    return points * factor


def shift(points: torch.Tensor, max_shift: float = 0.2, generator: torch.Generator | None = None) -> torch.Tensor:
    """Translate each cloud by a vector with coordinates ~ U[-max_shift, max_shift)."""
    _check_points(points)
    offset = max_shift * (2 * _draw(torch.rand, (points.shape[0], 1, 3), generator, points.device, points.dtype) - 1)
    return points + offset


def jitter(points: torch.Tensor, sigma: float = 0.01, clip: float = 0.05,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Add clip(sigma · N(0, 1), -clip, clip) independently to every coordinate."""
    _check_points(points)
    if sigma < 0 or clip < 0:
        raise ValueError(f"sigma and clip must be >= 0, got sigma={sigma}, clip={clip}")
    noise = (sigma * _draw(torch.randn, tuple(points.shape), generator, points.device, points.dtype))
    return points + noise.clamp(-clip, clip)


def rotate_images(images: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each image [B, C, H, W] about its centre by angles[b] radians, counter-clockwise as
    displayed (row 0 at the top), like torch.rot90(images, 1, dims=(-2, -1)) for an angle of π/2.

    Bilinear interpolation, zeros outside the image (grid_sample, align_corners=False: the centre is
    the middle of the pixel grid, so a quarter turn of a square image is an exact pixel permutation).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {list(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point, got {images.dtype}")
    b, _, h, w = images.shape
    angles = torch.as_tensor(angles, dtype=images.dtype, device=images.device).reshape(-1)
    if angles.shape[0] != b:
        raise ValueError(f"angles must have shape [B] with B = images.shape[0] = {b}, got {list(angles.shape)}")
    # Output pixel p (pixel units, x right, y down, origin at the centre) samples the input at R p,
    # with R = [[cos, -sin], [sin, cos]] acting on (x, y_down): a counter-clockwise turn on screen.
    # grid_sample works in normalised coordinates x_n = x / (W/2), y_n = y / (H/2).
    c, s = angles.cos(), angles.sin()
    theta = torch.zeros(b, 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = c
    theta[:, 0, 1] = -s * h / w
    theta[:, 1, 0] = s * w / h
    theta[:, 1, 1] = c
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotate_images(images: torch.Tensor, generator: torch.Generator | None = None, *,
                         return_angles: bool = False):
    """Rotate each image by its own angle ~ U[0, 2π) (see rotate_images). With return_angles=True
    returns (rotated, angles [B])."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape [B, C, H, W], got {list(images.shape)}")
    angles = 2 * math.pi * _draw(torch.rand, (images.shape[0],), generator, images.device, torch.float64)
    out = rotate_images(images, angles.to(images.dtype))
    return (out, angles) if return_angles else out
