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
of a fixed generic diagonal operator compressed to the space), so it does not depend on the thread count or the LAPACK
build; blocks of different field pairs have disjoint support, so the full basis is orthonormal.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .functional import relaxed_conv2d
from .nn import RelaxedModule
from .regularizer import RegularizerTerms

__all__ = ["FieldType", "kernel_basis", "evaluate_kernel_basis", "R2Conv", "RelaxedR2Conv", "kernel_defect",
           "defect_matrices", "spatial_rotation_operator", "spatial_rotation_generator", "FieldBatchNorm",
           "FieldNonLinearity", "GroupPool", "SpatialPool2d", "InvariantPool", "rot90_equivariance_error"]

Field = Tuple[str, int]
_DT = torch.float64
_J = torch.tensor([[0.0, -1.0], [1.0, 0.0]], dtype=_DT)


def _norm_group(G) -> Optional[int]:
    if G is None or G == 0:
        return None
    if isinstance(G, bool) or not isinstance(G, int) or G < 0:
        raise ValueError(f"group must be an int N >= 1 (C_N) or None/0 (SO(2)), got {G!r}")
    return G


def _rot2(a: float) -> torch.Tensor:
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, -s], [s, c]], dtype=_DT)


def _field_dim(group: Optional[int], f: Field) -> int:
    kind, m = f
    if kind == "trivial":
        return 1
    if kind == "irrep":
        return 1 if (group is not None and 2 * m == group) else 2
    return m  # regular: m == N


def _field_rep(group: Optional[int], f: Field, theta: float) -> torch.Tensor:
    kind, m = f
    if kind == "trivial":
        return torch.ones(1, 1, dtype=_DT)
    if kind == "irrep":
        if group is not None and 2 * m == group:
            return torch.tensor([[math.cos(m * theta)]], dtype=_DT)
        return _rot2(m * theta)
    # regular: theta must be a multiple of 2π/N; ρ(2πj/N) e_i = e_{(i+j) mod N}
    N = m
    jf = theta * N / (2 * math.pi)
    j = round(jf)
    if abs(jf - j) > 1e-9:
        raise ValueError(f"regular rep of C_{N} is only defined at multiples of 2π/{N}, got theta={theta}")
    P = torch.zeros(N, N, dtype=_DT)
    idx = torch.arange(N)
    P[(idx + j) % N, idx] = 1.0
    return P


def _field_lie(f: Field) -> torch.Tensor:
    kind, m = f
    if kind == "trivial":
        return torch.zeros(1, 1, dtype=_DT)
    if kind == "irrep":
        return m * _J
    raise ValueError("regular fields have no SO(2) Lie generator")


@dataclass(frozen=True)
class FieldType:
    """A direct sum of fields over the plane for G = C_N (``group = N``) or SO(2) (``group = None``).

    Attributes: ``group`` (int N or None), ``fields`` (tuple of (kind, m)). ``dim`` is the total
    fibre dimension; ``representation(theta)`` is the block-diagonal [dim, dim] float64 matrix.
    """

    group: Optional[int]
    fields: Tuple[Field, ...]

    def __post_init__(self):
        g = _norm_group(self.group)
        object.__setattr__(self, "group", g)
        fields = tuple((str(k), int(m)) for k, m in self.fields)
        for kind, m in fields:
            if kind == "trivial":
                if m != 0:
                    raise ValueError("trivial field must be ('trivial', 0)")
            elif kind == "irrep":
                if m < 1:
                    raise ValueError(f"irrep frequency must be >= 1, got {m}")
                if g is not None and 2 * m > g:
                    raise ValueError(f"irrep frequency m={m} for C_{g} must satisfy 2m <= N "
                                     "(higher frequencies are equivalent/aliased)")
            elif kind == "regular":
                if g is None:
                    raise ValueError("regular fields need a finite group C_N, not SO(2)")
                if m != g:
                    raise ValueError(f"regular field of C_{g} must be ('regular', {g})")
            else:
                raise ValueError(f"unknown field kind {kind!r}")
        object.__setattr__(self, "fields", fields)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def trivial(cls, G, n: int) -> "FieldType":
        return cls(G, (("trivial", 0),) * n)

    @classmethod
    def regular(cls, N: int, n: int) -> "FieldType":
        if N is None or N == 0:
            raise ValueError("regular fields need a finite group C_N, not SO(2)")
        return cls(N, (("regular", N),) * n)

    @classmethod
    def regular_channels(cls, N: int, channels: int, name: str = "channels") -> "FieldType":
        """channels / N regular fields of C_N; ``channels`` must be a positive multiple of N."""
        if isinstance(N, bool) or not isinstance(N, int) or N < 1:
            raise ValueError(f"regular fields need a finite group C_N with an int N >= 1, got {N!r}")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < N or channels % N:
            raise ValueError(f"{name} must be a positive multiple of the regular field size N = {N}, got {channels!r}")
        return cls.regular(N, channels // N)

    @classmethod
    def irreps(cls, G, ms: Iterable[int], multiplicity: int = 1) -> "FieldType":
        return cls(G, tuple(("irrep", int(m)) for m in ms for _ in range(multiplicity)))

    def __add__(self, other: "FieldType") -> "FieldType":
        if not isinstance(other, FieldType):
            return NotImplemented
        if other.group != self.group:
            raise ValueError(f"cannot concatenate field types of groups {self.group} and {other.group}")
        return FieldType(self.group, self.fields + other.fields)

    # ---- properties ---------------------------------------------------------------------------
    @property
    def dims(self) -> Tuple[int, ...]:
        return tuple(_field_dim(self.group, f) for f in self.fields)

    @property
    def dim(self) -> int:
        return sum(self.dims)

    def offsets(self) -> Tuple[int, ...]:
        out, o = [], 0
        for d in self.dims:
            out.append(o)
            o += d
        return tuple(out)

    def representation(self, theta: float) -> torch.Tensor:
        """ρ(θ) as a block-diagonal [dim, dim] float64 matrix (regular fields: θ ∈ 2πℤ/N)."""
        if self.dim == 0:
            return torch.zeros(0, 0, dtype=_DT)
        return torch.block_diag(*[_field_rep(self.group, f, float(theta)) for f in self.fields])


# ---- kernel basis ----------------------------------------------------------------------------------
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


def _check_field_input(x, ftype: "FieldType", who: str, name: str = "x"):
    """x must be [B, ftype.dim, H, W] (channels first); the message names the argument and the layout."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{who}: {name} must be [B, C, H, W] (rank 4), got rank {x.dim()} with shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != ftype.dim:
        hint = " (channels-last? the layout is [B, C, H, W])" if x.shape[-1] == ftype.dim else ""
        raise ValueError(f"{who}: {name} has {x.shape[1]} channels, in_type needs {ftype.dim}: {name} must be "
                         f"[B, C = {ftype.dim}, H, W], got {list(x.shape)}{hint}")


def _check_types(in_type, out_type):
    if not isinstance(in_type, FieldType) or not isinstance(out_type, FieldType):
        raise TypeError("in_type and out_type must be FieldType")
    if in_type.group != out_type.group:
        raise ValueError(f"in_type group {in_type.group} != out_type group {out_type.group}")


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


# ---- the module ------------------------------------------------------------------------------------
class R2Conv(nn.Module):
    """Steerable convolution x [B, in_type.dim, H, W] -> [B, out_type.dim, H', W'].

    Parameters: ``weight`` [n_basis] (coefficients, in ``kernel_basis`` order); ``bias`` [n_bias] or
    None. The kernel [out_dim, in_dim, k, k] equals ``einsum('b,boikl->oikl', weight, kernel_basis(...))``
    but is expanded per (out kind, in kind) pair of fields (:func:`_block_layout`: one einsum per kind
    pair, never the dense basis, whose size grows as fields⁴); the block bases are non-persistent
    buffers ``block_basis_<i>`` with their index buffers.

    Bias: one scalar per trivial output field, and one scalar per regular output field shared by
    its N channels (both equivariant); irrep fields (incl. the 1-dim sign rep) get no bias.

    Init: the basis is orthonormal, so with w ~ N(0, σ²) the kernel has E‖K‖² = σ² n_basis, i.e.
    on average σ² n_basis / out_dim per output channel. σ² = out_dim / n_basis makes the output
    variance ≈ the input variance for unit-variance i.i.d. inputs (no ReLU gain). Bias starts at 0.

    Eval-mode cache: when not training and autograd is off (or the weight needs no grad), the
    expanded kernel is cached, keyed on the weight/bias/basis ``_version`` and storage; ``train()``
    clears it.
    """

    def __init__(self, in_type: FieldType, out_type: FieldType, kernel_size: int,
                 padding: Optional[int] = None, bias: bool = True, max_frequency: Optional[int] = None,
                 device=None, dtype=None):
        super().__init__()
        k = _check_k(kernel_size)
        _check_types(in_type, out_type)
        if padding is not None and (isinstance(padding, bool) or not isinstance(padding, int) or padding < 0):
            raise ValueError(f"padding must be an int >= 0 (or None for kernel_size // 2), got {padding!r}")
        self.in_type, self.out_type, self.kernel_size = in_type, out_type, k
        self.max_frequency = max_frequency
        self.padding = k // 2 if padding is None else padding
        dtype = dtype or torch.get_default_dtype()
        self._constants = self._float64_constants()
        for name, t in self._constants.items():
            t = None if t is None else t.to(device, dtype if t.is_floating_point() else t.dtype).clone()
            self.register_buffer(name, t, persistent=False)
        n = self.n_basis
        std = math.sqrt(out_type.dim / n) if n > 0 else 0.0
        self.weight = nn.Parameter(torch.randn(n, device=device, dtype=dtype) * std)
        if bias and self.bias_map is not None:
            self.bias = nn.Parameter(torch.zeros(self.bias_map.shape[1], device=device, dtype=dtype))
        else:
            self.bias_map = None
            self.register_parameter("bias", None)
        self._cache = None

    def _float64_constants(self) -> dict:
        """The fixed float64 tensors behind the non-persistent buffers (name -> tensor or None)."""
        # bias expansion: bias_map [out_dim, n_bias], out_bias = bias_map @ bias
        cols = []
        for f, o, d in zip(self.out_type.fields, self.out_type.offsets(), self.out_type.dims):
            if f[0] in ("trivial", "regular"):
                col = torch.zeros(self.out_type.dim, dtype=_DT)
                col[o:o + d] = 1.0
                cols.append(col)
        n_basis, groups = _block_layout(self.in_type, self.out_type, self.kernel_size, self.max_frequency)
        self._n_basis, self._n_groups = n_basis, len(groups)
        self._single_block = len(groups) == 1 and torch.equal(groups[0][2], torch.arange(self.out_type.dim)) \
            and torch.equal(groups[0][3], torch.arange(self.in_type.dim))
        out = {"bias_map": torch.stack(cols, dim=1) if cols else None}
        for i, (samples, gather, out_ch, in_ch) in enumerate(groups):
            out.update({f"block_basis_{i}": samples, f"block_gather_{i}": gather, f"block_out_{i}": out_ch,
                        f"block_in_{i}": in_ch})
        return out

    def _load_constants(self):
        # Rebuilt from float64 on every dtype/device change: ``.double()`` of a float32 layer gets the
        # exact float64 basis, not a float32-rounded one (the C_N defect is exact only on the former).
        for name, t in self._constants.items():
            old = getattr(self, name)
            if old is not None:
                setattr(self, name, t.to(old.device, old.dtype).clone())

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._load_constants()
        self._cache = None
        return out

    @property
    def n_basis(self) -> int:
        return self._n_basis

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _key(self):
        ts = [self.weight] + [getattr(self, f"block_basis_{i}") for i in range(self._n_groups)] \
            + ([self.bias] if self.bias is not None else [])
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in ts)

    def expand(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(kernel [out_dim, in_dim, k, k], bias [out_dim] or None)."""
        O, I, k = self.out_type.dim, self.in_type.dim, self.kernel_size
        blocks = []
        for i in range(self._n_groups):
            samples, gather = getattr(self, f"block_basis_{i}"), getattr(self, f"block_gather_{i}")
            out_ch, in_ch = getattr(self, f"block_out_{i}"), getattr(self, f"block_in_{i}")
            blk = torch.einsum("pqb,boikl->poqikl", self.weight[gather], samples)
            blocks.append((blk.reshape(out_ch.numel(), in_ch.numel(), k, k), out_ch, in_ch))
        if self._single_block:
            kernel = blocks[0][0]  # one kind pair in field order (e.g. regular → regular): no scatter
        else:
            kernel = self.weight.new_zeros(O, I, k, k)
            for blk, out_ch, in_ch in blocks:
                kernel = kernel.index_put((out_ch[:, None], in_ch[None, :]), blk)
        b = self.bias_map @ self.bias if self.bias is not None else None
        return kernel, b

    def _check_input(self, x: torch.Tensor):
        _check_field_input(x, self.in_type, type(self).__name__)

    def _kernel(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``expand()``, served from the eval-mode cache when that is valid."""
        cacheable = not self.training and not (torch.is_grad_enabled() and self.weight.requires_grad)
        if not cacheable:
            return self.expand()
        key = self._key()
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.expand())
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        kernel, b = self._kernel()
        return F.conv2d(x, kernel, b, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_type.dim}, out_dim={self.out_type.dim}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, n_basis={self.n_basis}, group={self.in_type.group}")


# ---- the equivariance defect of a free kernel --------------------------------------------------------
#
# Spatial operators act on a kernel flattened over its k×k pixels (row-major, as ``_grid_points``):
# (S_t B)(p) = B(R_t^{-1} p) is the spatial part of rotating B by t, and Ṡ = d/dt S_t at t = 0.
# Off the quarter turns these need values of B between pixels, so B is read as a continuous function
# by a fixed hybrid interpolation:
#   * its least-squares projection onto the smooth family {ψ_j(φ) g_r(ρ)} — the Gaussian rings ×
#     circular harmonics that every equivariant kernel of this module is built from (full column rank
#     on the grid for k = 3…9: measured σ_min ≈ 0.91) — is rotated / differentiated exactly, in
#     closed form (∂_φ of cos jφ is −j sin jφ). So the defect of any kernel in the span of
#     ``kernel_basis`` is exactly 0 (up to rounding) for every C_N and for SO(2);
#   * the residual (what the smooth family cannot represent: grid-scale detail) is interpolated by
#     Gaussian RBFs centred on the pixels (σ = 0.6 px, an invertible Gram matrix) and rotated /
#     differentiated exactly as that interpolant. So a non-smooth B is still penalised.
_RBF_SIGMA = 0.6


def _smooth_family(k: int, points: torch.Tensor, d_phi: bool = False) -> torch.Tensor:
    """[P, n_f]: the scalar family ψ_j(φ) g_r(ρ), r = 0…(k−1)/2, j ≤ 2r (or its ∂_φ) at points [P, 2]."""
    rho, phi, at_origin = _polar(points)
    cols = [_psi(r, j, rho, phi, at_origin, d_phi) for r in range((k - 1) // 2 + 1) for j in range(_jmax(r, None) + 1)]
    return torch.cat(cols).T


def _rbf(k: int, points: torch.Tensor, d_t: bool = False) -> torch.Tensor:
    """[P, k²]: Gaussian RBFs centred on the pixels at points [P, 2]; with ``d_t`` the derivative of
    φ_p(R_t^{-1} x) at t = 0, which is (p_x y − p_y x) φ_p(x) / σ²."""
    c = _grid_points(k)
    pts = points.to(_DT)
    diff = pts[:, None, :] - c[None, :, :]
    phi = torch.exp(-(diff * diff).sum(-1) / (2 * _RBF_SIGMA ** 2))
    if not d_t:
        return phi
    cross = c[None, :, 0] * pts[:, None, 1] - c[None, :, 1] * pts[:, None, 0]
    return cross * phi / _RBF_SIGMA ** 2


def _hybrid(k: int, smooth_at: torch.Tensor, rbf_at: torch.Tensor) -> torch.Tensor:
    """Operator [k², k²]: smooth part through ``smooth_at`` [k², n_f], residual through ``rbf_at`` [k², k²]."""
    grid = _grid_points(k)
    E = _smooth_family(k, grid)
    E_pinv = torch.linalg.pinv(E)
    residual = torch.eye(k * k, dtype=_DT) - E @ E_pinv
    return smooth_at @ E_pinv + rbf_at @ torch.linalg.solve(_rbf(k, grid), residual)


@functools.lru_cache(maxsize=None)
def spatial_rotation_operator(kernel_size: int, angle: float) -> torch.Tensor:
    """S [k², k²] float64 with (S vec B)(p) = B(R_angle^{-1} p): an exact pixel permutation (rot90)
    for multiples of π/2, the hybrid interpolation of the section comment otherwise. Cached."""
    k = _check_k(kernel_size)
    quarter = angle / (math.pi / 2)
    if abs(quarter - round(quarter)) < 1e-12:
        eye = torch.eye(k * k, dtype=_DT).reshape(k * k, k, k)
        return torch.rot90(eye, round(quarter) % 4, dims=(-2, -1)).reshape(k * k, k * k).T.contiguous()
    pts = _grid_points(k) @ _rot2(-angle).T  # R^{-1} p
    return _hybrid(k, _smooth_family(k, pts), _rbf(k, pts))


@functools.lru_cache(maxsize=None)
def spatial_rotation_generator(kernel_size: int) -> torch.Tensor:
    """Ṡ [k², k²] float64 = d/dt S_t at t = 0 (the infinitesimal rotation of a kernel's pixels):
    −∂_φ exactly on the smooth family, the RBF interpolant's derivative on the residual. Cached."""
    k = _check_k(kernel_size)
    grid = _grid_points(k)
    return _hybrid(k, -_smooth_family(k, grid, d_phi=True), _rbf(k, grid, d_t=True))


def _lie_generator(ftype: FieldType) -> torch.Tensor:
    """dρ(1) [dim, dim] for an SO(2) field type (block-diagonal m J per irrep, 0 per trivial field)."""
    if ftype.dim == 0:
        return torch.zeros(0, 0, dtype=_DT)
    return torch.block_diag(*[_field_lie(f) for f in ftype.fields])


@functools.lru_cache(maxsize=None)
def defect_matrices(in_type: FieldType, out_type: FieldType, kernel_size: int):
    """(A_out [O, O], A_in [I, I], S [k², k²]) float64 defining the defect operator D (see RelaxedR2Conv):
    C_N: A = ρ(2π/N), S = spatial_rotation_operator(k, 2π/N); SO(2): A = dρ, S = spatial_rotation_generator(k)."""
    k = _check_k(kernel_size)
    _check_types(in_type, out_type)
    G = in_type.group
    if G is None:
        return _lie_generator(out_type), _lie_generator(in_type), spatial_rotation_generator(k)
    g = 2 * math.pi / G
    return out_type.representation(g), in_type.representation(g), spatial_rotation_operator(k, g)


def apply_defect(B: torch.Tensor, A_out: torch.Tensor, A_in: torch.Tensor, S: torch.Tensor,
                 group: Optional[int]) -> torch.Tensor:
    """D(B) for B [O, I, k, k] (or [..., O, I, k, k]) from :func:`defect_matrices` (in B's dtype):
    C_N: A_out (S B) A_inᵀ − B;   SO(2): A_out B − B A_in + S B   (S acting on the pixels)."""
    k = B.shape[-1]
    SB = (B.flatten(-2) @ S.T).unflatten(-1, (k, k))
    if group is None:
        return (torch.einsum("op,...pihw->...oihw", A_out, B) - torch.einsum("...oqhw,qi->...oihw", B, A_in) + SB)
    return torch.einsum("op,...pqhw,iq->...oihw", A_out, SB, A_in) - B


def kernel_defect(B: torch.Tensor, in_type: FieldType, out_type: FieldType) -> torch.Tensor:
    """The equivariance defect D(B) [out_dim, in_dim, k, k] of a free kernel B (same shape).

    C_N: D(B) = ρ_out(g) B(R_g^{-1} ·) ρ_in(g)^{-1} − B with g = 2π/N (0 iff B commutes with the
    generator, i.e. with all of C_N); SO(2): D(B) = d/dt [ρ_out(t) B(R_t^{-1} ·) ρ_in(t)^{-1}] at t = 0.
    """
    if B.dim() != 4 or B.shape[:2] != (out_type.dim, in_type.dim) or B.shape[2] != B.shape[3]:
        raise ValueError(f"B must have shape [out_dim = {out_type.dim}, in_dim = {in_type.dim}, k, k], "
                         f"got {list(B.shape)}")
    mats = defect_matrices(in_type, out_type, B.shape[-1])
    return apply_defect(B, *(m.to(B.device, B.dtype) for m in mats), in_type.group)


class RelaxedR2Conv(R2Conv, RelaxedModule):
    """Steerable convolution plus a relaxation branch: kernel ``K_eq + θ B`` with B a free kernel.

    ``y = conv2d(x, K_eq + θ B, b_eq)`` — one convolution. θ is a buffer (``set_theta``); at θ = 0 the
    layer computes exactly the equivariant R2Conv, and :meth:`project` returns that R2Conv (same
    coefficients and bias). There is no relaxation bias: a constant bias is a 1×1 kernel on a
    constant-1 input, and the equivariant bias already covers the trivial / regular outputs.

    Defect operator (a fixed linear map on kernels under the group generator; see
    :func:`kernel_defect`): for C_N the rotation by g = 2π/N, ``D(B) = ρ_out(g) S_g B ρ_in(g)^{-1} − B``,
    with S_g an exact pixel permutation for N ∈ {1, 2, 4} and the hybrid interpolation of
    :func:`spatial_rotation_operator` otherwise; for SO(2) the infinitesimal rotation,
    ``D(B) = dρ_out B − B dρ_in + Ṡ B`` with Ṡ the exact derivative of the same interpolant. For every
    group, D vanishes (to rounding) on the span of ``kernel_basis``.

    Regularisers (:meth:`regularizers`), as RegularizerTerms(lie_derivative, projection, n):
      * mode "data" (default): R_LD = Σ conv2d(x̂, D(B))² over the last training forward's detached
        input x̂ — computed by ``functional.relaxed_conv2d`` in the same pass as the output (the
        defect responses are extra output channels reduced to a scalar, never stored). n = B·H'·W'.
      * mode "weight" (also ``data_free=True``): R_LD = ‖D(B)‖², n = 1.
      * R_N (the analogue of the VN layer's ‖W_r x̂ + b_r‖², the size of the θ-branch) is ‖B‖² in both
        modes: a data-mode ‖conv(x̂, B)‖² would need its own reduction, and the fused op returns one
        scalar; ‖B‖² bounds it (Young: ‖conv(x̂, B)‖ ≤ ‖B‖₁‖x̂‖) at no cost.

    Args: as R2Conv, plus ``relax_init`` ("zeros": B = 0, the relaxed layer starts equivariant;
    "default": uniform ±1/√(in_dim·k²)), ``theta``, ``track_defect`` (compute R_LD in training
    forwards), ``backend`` (for ``relaxed_conv2d``).
    """

    def __init__(self, in_type: FieldType, out_type: FieldType, kernel_size: int, padding: Optional[int] = None,
                 bias: bool = True, max_frequency: Optional[int] = None, relax_init: str = "zeros",
                 theta: float = 1.0, track_defect: bool = True, backend: Optional[str] = None,
                 device=None, dtype=None):
        if relax_init not in ("zeros", "default"):
            raise ValueError(f"relax_init must be 'zeros' or 'default', got {relax_init!r}")
        super().__init__(in_type, out_type, kernel_size, padding, bias, max_frequency, device=device, dtype=dtype)
        factory = {"device": self.weight.device, "dtype": self.weight.dtype}
        self.relax_init, self.track_defect, self.backend = relax_init, track_defect, backend
        k = self.kernel_size
        self.weight_relax = nn.Parameter(torch.empty(out_type.dim, in_type.dim, k, k, **factory))
        self.register_buffer("theta", torch.tensor(float(theta), **factory))
        self.last_defect: Optional[Tuple[torch.Tensor, int]] = None  # (r, rows) of the last training forward
        self.reset_relaxation()

    def _float64_constants(self) -> dict:
        A_out, A_in, S = defect_matrices(self.in_type, self.out_type, self.kernel_size)
        return {**super()._float64_constants(), "defect_out": A_out, "defect_in": A_in, "defect_spatial": S}

    def __getstate__(self):
        # the last defect is part of this step's autograd graph: not copied (deepcopy, pickle)
        return {**super().__getstate__(), "last_defect": None}

    def reset_relaxation(self):
        if self.relax_init == "zeros":
            nn.init.zeros_(self.weight_relax)
        else:
            bound = 1 / math.sqrt(self.in_type.dim * self.kernel_size ** 2)
            nn.init.uniform_(self.weight_relax, -bound, bound)

    def defect(self) -> torch.Tensor:
        """D(B) [out_dim, in_dim, k, k] (differentiable in B)."""
        return apply_defect(self.weight_relax, self.defect_out, self.defect_in, self.defect_spatial,
                            self.in_type.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        kernel, b = self._kernel()
        M = kernel + self.theta * self.weight_relax
        if self.training and self.track_defect:
            y, r = relaxed_conv2d(x, M, b, self.defect(), self.padding, backend=self.backend)
            self.last_defect = (r, y.shape[0] * y.shape[2] * y.shape[3])
            return y
        return relaxed_conv2d(x, M, b, padding=self.padding, backend=self.backend)

    def regularizers(self, mode: str = "data", data_free: bool = False) -> RegularizerTerms:
        """(R_LD, R_N, n); see the class docstring. ``data_free=True`` means mode "weight"."""
        if mode not in ("data", "weight"):
            raise ValueError(f"mode must be 'data' or 'weight', got {mode!r}")
        B = self.weight_relax.to(torch.promote_types(self.weight_relax.dtype, torch.float32))
        r_n = (B * B).sum()
        if data_free or mode == "weight":
            Dw = self.defect()
            return RegularizerTerms((Dw * Dw).sum().to(B.dtype), r_n, 1)
        if self.last_defect is None:
            raise RuntimeError("no data-mode defect: run a forward pass in training mode with track_defect=True "
                               "first, or use mode='weight'")
        r, rows = self.last_defect
        return RegularizerTerms(r, r_n.to(r.dtype), rows)

    @classmethod
    def from_plain(cls, layer: R2Conv, **kwargs) -> "RelaxedR2Conv":
        """A relaxed twin of ``layer`` with its coefficients (outputs unchanged at θ = 0 or B = 0)."""
        out = cls(layer.in_type, layer.out_type, layer.kernel_size, layer.padding, bias=layer.bias is not None,
                  max_frequency=layer.max_frequency, device=layer.weight.device, dtype=layer.weight.dtype, **kwargs)
        out.load_state_dict(layer.state_dict(), strict=False)
        return out.train(layer.training)

    def project(self) -> R2Conv:
        """θ := 0 and B removed: the plain R2Conv with the same coefficients and bias."""
        plain = R2Conv(self.in_type, self.out_type, self.kernel_size, self.padding, bias=self.bias is not None,
                       max_frequency=self.max_frequency, device=self.weight.device, dtype=self.weight.dtype)
        plain.load_state_dict({k: v for k, v in self.state_dict().items()
                               if not k.startswith(("weight_relax", "theta"))})
        return plain.train(self.training)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", theta={float(self.theta):g}, backend={self.backend or 'auto'}"


# ---- field-wise layers ---------------------------------------------------------------------------------

def _field_index(ftype: FieldType) -> torch.Tensor:
    """[dim] long: the field each channel belongs to."""
    return torch.repeat_interleave(torch.arange(len(ftype.fields)), torch.tensor(ftype.dims, dtype=torch.long))


def _is_norm_field(f: Field) -> bool:
    """Irreps (incl. the 1-dim sign rep) are handled through their norm; trivial / regular fields pointwise."""
    return f[0] == "irrep"


class FieldBatchNorm(nn.Module):
    """Batch norm per field, x [B, C, H, W] → same; equivariant for any field type.

    Trivial and regular fields: mean and variance shared by the field's channels (over batch, pixels
    and the N channels of a regular field — a permutation of them leaves the statistics unchanged),
    affine scale and bias per field. Irreps: no centring (a mean vector is not invariant); the field is
    divided by √(E‖f‖²/d + ε), scale per field, no bias. Eval mode uses running statistics (unbiased
    variance for centred fields). ``stats_reducer`` (set by :func:`relaxeq_fast.distributed.sync_batch_norms`)
    combines the per-rank moments into those of the global batch.
    """

    def __init__(self, ftype: FieldType, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(ftype, FieldType):
            raise TypeError(f"ftype must be a FieldType, got {type(ftype).__name__}")
        factory = {"device": device, "dtype": dtype}
        self.ftype, self.eps, self.momentum = ftype, eps, momentum
        n_fields = len(ftype.fields)
        centred = torch.tensor([not _is_norm_field(f) for f in ftype.fields])
        self.register_buffer("field_of", _field_index(ftype).to(device), persistent=False)
        self.register_buffer("centred", centred.to(device), persistent=False)
        self.register_buffer("field_dims", torch.tensor(ftype.dims, device=device), persistent=False)
        self.register_buffer("centred_index", torch.nonzero(centred).flatten().to(device), persistent=False)
        self.weight = nn.Parameter(torch.ones(n_fields, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(int(centred.sum()), **factory)) if affine else None
        self.register_buffer("running_mean", torch.zeros(n_fields, **factory))
        self.register_buffer("running_var", torch.ones(n_fields, **factory))
        self.stats_reducer = None

    def _field_mean(self, per_channel: torch.Tensor) -> torch.Tensor:
        """Mean over each field's channels of a per-channel vector [C] → [F]."""
        total = per_channel.new_zeros(len(self.ftype.fields)).index_add(0, self.field_of, per_channel)
        return total / self.field_dims.to(per_channel.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_field_input(x, self.ftype, type(self).__name__)
        if self.training:
            n = x.shape[0] * x.shape[2] * x.shape[3]
            if n * min(self.ftype.dims, default=1) < 2:
                raise ValueError(f"FieldBatchNorm: x {list(x.shape)} has one value per channel; batch norm "
                                 "needs at least 2 in training mode")
            mean = self._field_mean(x.mean((0, 2, 3))) * self.centred.to(x.dtype)
            xc = x - mean[self.field_of].view(1, -1, 1, 1)
            var = self._field_mean(xc.square().mean((0, 2, 3)))
            if self.stats_reducer is not None:
                mean, var, n = self.stats_reducer(mean, var, n)
                xc = x - mean[self.field_of].view(1, -1, 1, 1)
            with torch.no_grad():
                count = (n * self.field_dims).to(x.dtype)
                unbiased = torch.where(self.centred, count / (count - 1).clamp_min(1), torch.ones_like(count))
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(var.detach() * unbiased, self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
            xc = x - mean[self.field_of].view(1, -1, 1, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        y = xc * scale[self.field_of].view(1, -1, 1, 1)
        if self.bias is not None:
            shift = self.bias.new_zeros(len(self.ftype.fields)).index_put((self.centred_index,), self.bias)
            y = y + shift[self.field_of].view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        return f"fields={len(self.ftype.fields)}, dim={self.ftype.dim}, eps={self.eps}, momentum={self.momentum}"


class FieldNonLinearity(nn.Module):
    """ReLU on trivial and regular fields (pointwise: commutes with channel permutations); on irreps the
    norm nonlinearity f ↦ ReLU(‖f‖ + b) f / ‖f‖ with a learned bias b per irrep field (init 0)."""

    def __init__(self, ftype: FieldType, norm_eps: float = 1e-12, device=None, dtype=None):
        super().__init__()
        if not isinstance(ftype, FieldType):
            raise TypeError(f"ftype must be a FieldType, got {type(ftype).__name__}")
        self.ftype, self.norm_eps = ftype, norm_eps
        norm_fields = [i for i, f in enumerate(ftype.fields) if _is_norm_field(f)]
        self.register_buffer("field_of", _field_index(ftype).to(device), persistent=False)
        pointwise = torch.tensor([not _is_norm_field(ftype.fields[i]) for i in _field_index(ftype).tolist()],
                                 dtype=torch.bool)
        self.register_buffer("pointwise", pointwise.view(1, -1, 1, 1).to(device), persistent=False)
        self.register_buffer("norm_index", torch.tensor(norm_fields, dtype=torch.long, device=device), persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(norm_fields), device=device, dtype=dtype)) if norm_fields else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_field_input(x, self.ftype, type(self).__name__)
        if self.bias is None:
            return torch.relu(x)
        n_fields = len(self.ftype.fields)
        sq = x.new_zeros(x.shape[0], n_fields, *x.shape[2:]).index_add(1, self.field_of, x.square())
        norm = sq.clamp_min(self.norm_eps ** 2).sqrt()
        b = self.bias.new_zeros(n_fields).index_put((self.norm_index,), self.bias).view(1, -1, 1, 1)
        gate = (torch.relu(norm + b) / norm)[:, self.field_of]
        return torch.where(self.pointwise, torch.relu(x), x * gate)


class GroupPool(nn.Module):
    """Invariant per field: max over a regular field's N channels, ‖f‖ of an irrep, a trivial field as is.
    x [B, in_type.dim, H, W] → [B, n_fields, H, W] (``out_type``: trivial fields)."""

    def __init__(self, in_type: FieldType):
        super().__init__()
        if not isinstance(in_type, FieldType):
            raise TypeError(f"in_type must be a FieldType, got {type(in_type).__name__}")
        self.in_type = in_type
        self.out_type = FieldType.trivial(in_type.group, len(in_type.fields))
        kinds = {f for f in in_type.fields}
        self._uniform_regular = len(kinds) == 1 and next(iter(kinds))[0] == "regular"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_field_input(x, self.in_type, type(self).__name__)
        if self._uniform_regular:
            return x.unflatten(1, (len(self.in_type.fields), self.in_type.dims[0])).amax(2)
        outs = []
        for f, o, d in zip(self.in_type.fields, self.in_type.offsets(), self.in_type.dims):
            part = x[:, o:o + d]
            outs.append(part.amax(1, keepdim=True) if f[0] == "regular" else
                        part if f[0] == "trivial" else part.norm(dim=1, keepdim=True))
        return torch.cat(outs, 1)


class SpatialPool2d(nn.Module):
    """Spatial max / average pooling per channel that keeps exact 90° symmetry.

    Pooling acts per channel, so it commutes with the fibre action of trivial and regular fields
    (permutations); max pooling of irrep components would not, so mode "max" rejects irreps ("avg"
    is linear and fine). The windows must tile the image symmetrically: (H − k) % s == 0 and
    (W − k) % s == 0, otherwise the dropped border is on one side only and a rotated input is pooled
    on other windows — an error, not a silent approximation.
    """

    def __init__(self, in_type: FieldType, kernel_size: int = 2, stride: Optional[int] = None, mode: str = "max"):
        super().__init__()
        if mode not in ("max", "avg"):
            raise ValueError(f"mode must be 'max' or 'avg', got {mode!r}")
        if mode == "max" and any(_is_norm_field(f) for f in in_type.fields):
            raise ValueError("mode='max' is not equivariant for irrep fields (it mixes components); use mode='avg'")
        self.in_type, self.kernel_size, self.stride, self.mode = in_type, kernel_size, stride or kernel_size, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_field_input(x, self.in_type, type(self).__name__)
        k, s = self.kernel_size, self.stride
        H, W = x.shape[-2:]
        if H < k or W < k or (H - k) % s or (W - k) % s:
            raise ValueError(f"SpatialPool2d: x is {H}×{W}; pooling {k}×{k} with stride {s} needs (H − {k}) and "
                             f"(W − {k}) divisible by {s}, or the dropped border breaks the rotation symmetry")
        pool = F.max_pool2d if self.mode == "max" else F.avg_pool2d
        return pool(x, k, s)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, mode={self.mode}"


class InvariantPool(nn.Module):
    """The invariant head's input: :class:`GroupPool`, then max (or mean) over all pixels.
    x [B, in_type.dim, H, W] → [B, n_fields], invariant to every rotation that maps the grid onto itself."""

    def __init__(self, in_type: FieldType, spatial: str = "max"):
        super().__init__()
        if spatial not in ("max", "mean"):
            raise ValueError(f"spatial must be 'max' or 'mean', got {spatial!r}")
        self.group_pool, self.spatial = GroupPool(in_type), spatial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.group_pool(x)
        return x.amax((2, 3)) if self.spatial == "max" else x.mean((2, 3))


@torch.no_grad()
def rot90_equivariance_error(model: nn.Module, images: torch.Tensor) -> float:
    """Worst relative error ‖f(rot90(x, k)) − f(x)‖ / ‖f(x)‖ over k = 1, 2, 3 for an invariant image model.

    images: [B, C, H, W] with trivial channels (H = W). Quarter turns are exact pixel permutations, so a
    C_N model with 4 | N (or SO(2)) is invariant to them up to rounding: the certificate for image
    models. The model is evaluated as it is (call ``model.eval()`` first).
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be square [B, C, H, H], got "
                         f"{list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    base = model(images)
    denom = base.norm().clamp_min(torch.finfo(base.dtype).tiny)
    return max(((model(torch.rot90(images, k, dims=(-2, -1))) - base).norm() / denom).item() for k in (1, 2, 3))
