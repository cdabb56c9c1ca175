"""The equivariant kernel basis: the constraint solved per (out field, in field) block, sampled on the grid.

Method (kernel basis)
---------------------
Radial profiles: Gaussian rings g_r(ρ) = exp(-(ρ-r)²/(2σ²)), r = 0, 1, …, (k-1)/2, σ = 0.6.
Angular part: ψ_j(φ) = (cos jφ, sin jφ) for 1 ≤ j ≤ j_max(r), and 1 for j = 0, with
j_max(0) = 0 and j_max(r) = 2r (optionally capped by ``max_frequency``). Non-constant angular
terms are set to 0 at the origin so every function is single-valued on the plane.
For each (ring, j) and each pair (out field, in field), K(x) = Σ_a C_a ψ_{j,a}(φ) g_r(ρ) with
C ∈ R^{dimψ × d_out × d_in}; since ψ_j(φ+θ) = R(jθ) ψ_j(φ) the constraint is linear in C and is
solved exactly (null space by SVD):
  C_N:   (R(2πj/N)ᵀ ⊗ I ⊗ I − I ⊗ ρ_out(2π/N) ⊗ ρ_in(2π/N)) vec C = 0   (the generator)
  SO(2): (j Jᵀ ⊗ I ⊗ I − I ⊗ L_out ⊗ I − I ⊗ I ⊗ L_in) vec C = 0        (Lie algebra generator)
This allows every frequency alias m_out − m_in ± tN automatically. The resulting continuous
kernels are exactly equivariant; sampled on the grid they satisfy the constraint exactly for any
group element that permutes pixels (multiples of π/2, i.e. all of C_N when N | 4, and the π/2
subgroup when 4 | N). The sampled atoms of each block pair span a space (an SVD finds its rank,
dropping grid aliases, relative tolerance 1e-8) whose basis is chosen canonically (the eigenvectors
of a fixed generic diagonal operator compressed to the space), so it does not depend on the thread
count or the LAPACK build; blocks of different field pairs have disjoint support, so the full basis is orthonormal.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch

from .fields import Field, FieldType, _DT, _J, _check_types, _field_dim, _field_lie, _field_rep, _rot2

__all__ = ["evaluate_kernel_basis", "kernel_basis"]


_SIGMA = 0.6


def _jmax(r: int, max_frequency: Optional[int]) -> int:
    j = 0 if r == 0 else 2 * r
    return j if max_frequency is None else min(j, max_frequency)


def _grid_points(k: int) -> torch.Tensor:
    """[k*k, 2] (x, y) plane coordinates of the k×k pixel grid, row-major over (row, col)."""
    c = (k - 1) / 2
    a, b = torch.meshgrid(torch.arange(k, dtype=_DT), torch.arange(k, dtype=_DT), indexing="ij")
    return torch.stack([(b - c).reshape(-1), (c - a).reshape(-1)], dim=1)


def _null_space(M: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """Orthonormal basis of the null space of M, as rows [n, M.shape[1]]."""
    if M.shape[0] == 0:
        return torch.eye(M.shape[1], dtype=_DT)
    _, S, Vh = torch.linalg.svd(M, full_matrices=True)
    rank = int((S > tol).sum())
    return Vh[rank:]


def _check_k(kernel_size) -> int:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 \
            or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    return kernel_size


@functools.lru_cache(maxsize=None)
def _block_atoms(group, fout: Field, fin: Field, k: int, max_frequency):
    """Solve the constraint for one (out field, in field) pair.

    Returns a list of (r, j, C) with C [dimψ_j, d_out, d_in] (exactly equivariant coefficients).
    """
    do, di = _field_dim(group, fout), _field_dim(group, fin)
    atoms = []
    for r in range((k - 1) // 2 + 1):
        for j in range(_jmax(r, max_frequency) + 1):
            dpsi = 1 if j == 0 else 2
            Ipsi, Io, Ii = torch.eye(dpsi, dtype=_DT), torch.eye(do, dtype=_DT), torch.eye(di, dtype=_DT)
            if group is None:
                Lpsi = j * _J if j > 0 else torch.zeros(1, 1, dtype=_DT)
                M = (torch.kron(torch.kron(Lpsi.T.contiguous(), Io), Ii)
                     - torch.kron(torch.kron(Ipsi, _field_lie(fout)), Ii)
                     - torch.kron(torch.kron(Ipsi, Io), _field_lie(fin)))
            else:
                th = 2 * math.pi / group
                Rpsi = _rot2(j * th) if j > 0 else torch.ones(1, 1, dtype=_DT)
                M = (torch.kron(torch.kron(Rpsi.T.contiguous(), Io), Ii)
                     - torch.kron(Ipsi, torch.kron(_field_rep(group, fout, th), _field_rep(group, fin, th))))
            for v in _null_space(M):
                atoms.append((r, j, v.reshape(dpsi, do, di)))
    return atoms


def _polar(points: torch.Tensor):
    x, y = points[:, 0].to(_DT), points[:, 1].to(_DT)
    rho = torch.sqrt(x * x + y * y)
    return rho, torch.atan2(y, x), rho < 1e-12


def _psi(r: int, j: int, rho, phi, at_origin, d_phi: bool = False) -> torch.Tensor:
    """The scalar functions ψ_j(φ) g_r(ρ) at points -> [dimψ_j, P]; with ``d_phi`` their angular
    derivative ∂_φ (exact: j (−sin jφ, cos jφ) g_r; 0 for j = 0 and at the origin)."""
    radial = torch.exp(-(rho - r) ** 2 / (2 * _SIGMA ** 2))
    if j == 0:
        return torch.zeros_like(radial)[None] if d_phi else radial[None]
    c, s = torch.cos(j * phi), torch.sin(j * phi)
    psi = torch.stack([-j * s, j * c] if d_phi else [c, s]) * radial
    return torch.where(at_origin, torch.zeros_like(psi), psi)


def _eval_atoms(atoms, points: torch.Tensor) -> torch.Tensor:
    """Evaluate continuous atoms at points [P, 2] -> [n_atoms, d_out, d_in, P]."""
    rho, phi, at_origin = _polar(points)
    out = []
    for r, j, C in atoms:
        out.append(torch.einsum("aoi,ap->oip", C, _psi(r, j, rho, phi, at_origin)))
    if not out:
        return torch.zeros(0, 0, 0, points.shape[0], dtype=_DT)
    return torch.stack(out)


@functools.lru_cache(maxsize=None)
def _block_basis(group, fout: Field, fin: Field, k: int, max_frequency):
    """Orthonormalised sampled basis of one block pair.

    Returns (samples [nb, d_out, d_in, k, k], mix [nb, n_atoms]) with samples = mix @ atoms(grid).
    """
    do, di = _field_dim(group, fout), _field_dim(group, fin)
    atoms = _block_atoms(group, fout, fin, k, max_frequency)
    if not atoms:
        return torch.zeros(0, do, di, k, k, dtype=_DT), torch.zeros(0, 0, dtype=_DT)
    A = _eval_atoms(atoms, _grid_points(k)).reshape(len(atoms), -1)
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    rank = int((S > 1e-8 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
    samples = _canonical_basis(Vh[:rank])
    # samples = mix @ A: mix = samples A⁺ with A⁺ = V S⁻¹ Uᵀ on the rank
    mix = (samples @ Vh[:rank].T / S[:rank]) @ U[:, :rank].T
    return samples.reshape(rank, do, di, k, k).contiguous(), mix


def _canonical_basis(V: torch.Tensor) -> torch.Tensor:
    """The orthonormal basis [r, n] of the row space of V [r, n] (orthonormal rows) that depends on the
    space alone: the eigenvectors of a fixed generic diagonal operator D compressed to the space
    (V D Vᵀ, distinct eigenvalues), signed so each has a positive product with a fixed generic vector.

    An SVD returns any orthonormal basis of a degenerate singular subspace, and which one depended on
    the thread count (0.77 apart at 1 vs 2 threads): a seed then gave different models in different
    processes. This basis is a function of the space, which rounding moves by ~1e-15 only.
    """
    r, n = V.shape
    gen = torch.Generator().manual_seed(n)  # the CPU generator's stream is the same on every machine
    diagonal, reference = torch.rand(n, generator=gen, dtype=V.dtype), torch.randn(n, generator=gen, dtype=V.dtype)
    _, W = torch.linalg.eigh((V * diagonal) @ V.T)
    Q = W.T @ V
    return Q * torch.sign(Q @ reference)[:, None]


def _blocks(in_type, out_type, k, max_frequency):
    for fo, oo, do in zip(out_type.fields, out_type.offsets(), out_type.dims):
        for fi, oi, di in zip(in_type.fields, in_type.offsets(), in_type.dims):
            yield fo, oo, do, fi, oi, di


@functools.lru_cache(maxsize=None)
def kernel_basis(in_type: FieldType, out_type: FieldType, kernel_size: int,
                 max_frequency: Optional[int] = None) -> torch.Tensor:
    """Equivariant kernel basis, [n_basis, out_type.dim, in_type.dim, k, k] float64, orthonormal.

    Spans the kernels satisfying K(R_g x) = ρ_out(g) K(x) ρ_in(g)^{-1} (see module docstring),
    sampled on the k×k grid (k odd). ``max_frequency`` optionally caps the angular frequency.
    Cached (lru_cache): the same arguments return the same tensor object; do not modify it in place.
    """
    k = _check_k(kernel_size)
    _check_types(in_type, out_type)
    parts = []
    for fo, oo, do, fi, oi, di in _blocks(in_type, out_type, k, max_frequency):
        samples, _ = _block_basis(in_type.group, fo, fi, k, max_frequency)
        if samples.shape[0] == 0:
            continue
        full = torch.zeros(samples.shape[0], out_type.dim, in_type.dim, k, k, dtype=_DT)
        full[:, oo:oo + do, oi:oi + di] = samples
        parts.append(full)
    if not parts:
        return torch.zeros(0, out_type.dim, in_type.dim, k, k, dtype=_DT)
    return torch.cat(parts)


def evaluate_kernel_basis(in_type: FieldType, out_type: FieldType, kernel_size: int,
                          points: torch.Tensor, max_frequency: Optional[int] = None) -> torch.Tensor:
    """The continuous basis functions behind ``kernel_basis`` at plane points [P, 2] (x, y).

    Returns [n_basis, out_dim, in_dim, P] float64; at the grid points it equals ``kernel_basis``.
    """
    k = _check_k(kernel_size)
    _check_types(in_type, out_type)
    P = points.shape[0]
    parts = []
    for fo, oo, do, fi, oi, di in _blocks(in_type, out_type, k, max_frequency):
        _, mix = _block_basis(in_type.group, fo, fi, k, max_frequency)
        if mix.shape[0] == 0:
            continue
        vals = _eval_atoms(_block_atoms(in_type.group, fo, fi, k, max_frequency), points)
        vals = torch.einsum("ba,aoip->boip", mix, vals)
        full = torch.zeros(mix.shape[0], out_type.dim, in_type.dim, P, dtype=_DT)
        full[:, oo:oo + do, oi:oi + di] = vals
        parts.append(full)
    if not parts:
        return torch.zeros(0, out_type.dim, in_type.dim, P, dtype=_DT)
    return torch.cat(parts)


@functools.lru_cache(maxsize=None)
def _block_layout(in_type: FieldType, out_type: FieldType, k: int, max_frequency):
    """The basis of ``kernel_basis`` grouped by (out field kind, in field kind), without the dense tensor.

    Returns (n_basis, groups) with one group per kind pair that has basis elements:
    (samples [nb, d_out, d_in, k, k] float64, gather [n_out_fields, n_in_fields, nb] long — the
    position of each coefficient in the flat weight, in ``kernel_basis`` order —, out channels
    [n_out_fields·d_out] long, in channels [n_in_fields·d_in] long). A layer of many fields of a few
    kinds then expands its kernel with one einsum per kind pair (memory O(weights + kernel), where the
    dense basis would be O(n_basis · kernel)).
    """
    offset, table = 0, {}
    for p, (fo, oo, do) in enumerate(zip(out_type.fields, out_type.offsets(), out_type.dims)):
        for q, (fi, oi, di) in enumerate(zip(in_type.fields, in_type.offsets(), in_type.dims)):
            nb = _block_basis(in_type.group, fo, fi, k, max_frequency)[0].shape[0]
            if nb:
                entry = table.setdefault((fo, fi), {})
                entry[(p, q)] = (offset, oo, do, oi, di)
            offset += nb
    groups = []
    for (fo, fi), entries in table.items():
        samples = _block_basis(in_type.group, fo, fi, k, max_frequency)[0]
        nb, do, di = samples.shape[:3]
        ps = sorted({p for p, _ in entries})
        qs = sorted({q for _, q in entries})
        # every (out field of kind fo, in field of kind fi) pair has this block basis
        gather = torch.tensor([[list(range(entries[(p, q)][0], entries[(p, q)][0] + nb)) for q in qs] for p in ps],
                              dtype=torch.long).reshape(len(ps), len(qs), nb)
        out_ch = torch.tensor([entries[(p, qs[0])][1] + c for p in ps for c in range(do)], dtype=torch.long)
        in_ch = torch.tensor([entries[(ps[0], q)][3] + c for q in qs for c in range(di)], dtype=torch.long)
        groups.append((samples, gather, out_ch, in_ch))
    return offset, tuple(groups)
