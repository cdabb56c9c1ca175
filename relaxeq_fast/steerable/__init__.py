"""Steerable 2D convolutions for G = C_N (rotations by 2πj/N) or SO(2), in pure PyTorch.

Conventions
-----------
* Plane coordinates of a pixel (row a, col b) in a k×k kernel with centre c = (k-1)/2 are
  x = b - c, y = c - a (y points up). With these, ``torch.rot90(t, 1, dims=(-2, -1))`` is the
  rotation by +π/2 (counter-clockwise as displayed).
* A field f transforms as (g·f)(x) = ρ(g) f(R_g^{-1} x).
* A kernel K (cross-correlation, as in ``F.conv2d``) is equivariant iff
  K(R_g x) = ρ_out(g) K(x) ρ_in(g)^{-1}.

API
---
``FieldType`` (frozen, hashable)::

    FieldType.trivial(G, n)                  # n scalar fields (dim 1 each)
    FieldType.irreps(G, [m1, m2], mult=1)     # each frequency m repeated `mult` times, in order
    FieldType.regular(N, n)                  # n regular fields of C_N (dim N each); C_N only
    t1 + t2                                  # concatenation (same group)

``G`` is an int N ≥ 1 for C_N, or ``None`` / ``0`` for SO(2). Fields are tuples
``("trivial", 0)``, ``("irrep", m)``, ``("regular", N)``. For ``irrep(m)``: m ≥ 1 and, for C_N,
2m ≤ N; 2m == N is the 1-dim sign rep ρ(2πj/N) = (-1)^j, otherwise ρ(θ) is the 2×2 rotation by mθ.
Frequencies m > N/2 for C_N are rejected (they are equivalent to N - m or aliases).

``kernel_basis(in_type, out_type, kernel_size)`` -> ``[n_basis, out_dim, in_dim, k, k]`` float64,
orthonormal (Frobenius), cached.

``R2Conv(in_type, out_type, kernel_size, padding=None, bias=True)``.

Modules: ``fields`` (FieldType, representations), ``basis`` (the kernel basis), ``conv`` (R2Conv, the
defect operator, RelaxedR2Conv), ``rsteer`` (RSteer's position-dependent coefficients: RSteerConv,
RelaxedRSteerConv), ``norm`` (FieldBatchNorm), ``nonlinear`` (FieldNonLinearity), ``pool``
(group / spatial / invariant pooling and the quarter-turn certificate).
"""
from .basis import evaluate_kernel_basis, kernel_basis
from .conv import (R2Conv, RelaxedR2Conv, defect_matrices, kernel_defect, spatial_rotation_generator,
                   spatial_rotation_operator)
from .fields import FieldType
from .nonlinear import FieldNonLinearity
from .norm import FieldBatchNorm
from .pool import GroupPool, InvariantPool, SpatialPool2d, rot90_equivariance_error
from .rsteer import RelaxedRSteerConv, RSteerConv
# internals the tests reach (the cached basis solvers, grid helpers)
from .basis import _block_atoms, _block_basis, _block_layout, _canonical_basis, _grid_points  # noqa: F401
from .conv import _smooth_family  # noqa: F401
from .fields import _rot2  # noqa: F401

__all__ = ["FieldType", "kernel_basis", "evaluate_kernel_basis", "R2Conv", "RelaxedR2Conv", "kernel_defect",
           "defect_matrices", "spatial_rotation_operator", "spatial_rotation_generator", "FieldBatchNorm",
           "FieldNonLinearity", "GroupPool", "SpatialPool2d", "InvariantPool", "rot90_equivariance_error",
           "RSteerConv", "RelaxedRSteerConv"]
