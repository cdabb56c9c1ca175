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
subgroup when 4 | N). The sampled atoms of each block pair are orthonormalised with an SVD
(dropping grid aliases, relative tolerance 1e-8); blocks of different field pairs have disjoint
support, so the full basis is orthonormal.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FieldType", "kernel_basis", "evaluate_kernel_basis", "R2Conv"]

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


def _eval_atoms(atoms, points: torch.Tensor) -> torch.Tensor:
    """Evaluate continuous atoms at points [P, 2] -> [n_atoms, d_out, d_in, P]."""
    x, y = points[:, 0].to(_DT), points[:, 1].to(_DT)
    rho, phi = torch.sqrt(x * x + y * y), torch.atan2(y, x)
    at_origin = rho < 1e-12
    out = []
    for r, j, C in atoms:
        radial = torch.exp(-(rho - r) ** 2 / (2 * _SIGMA ** 2))
        if j == 0:
            psi = radial[None]
        else:
            psi = torch.stack([torch.cos(j * phi), torch.sin(j * phi)]) * radial
            psi = torch.where(at_origin, torch.zeros_like(psi), psi)
        out.append(torch.einsum("aoi,ap->oip", C, psi))
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
    mix = U[:, :rank].T / S[:rank, None]
    return Vh[:rank].reshape(rank, do, di, k, k).contiguous(), mix


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


# ---- the module ------------------------------------------------------------------------------------
class R2Conv(nn.Module):
    """Steerable convolution x [B, in_type.dim, H, W] -> [B, out_type.dim, H', W'].

    Parameters: ``weight`` [n_basis] (coefficients); ``bias`` [n_bias] or None. The kernel
    [out_dim, in_dim, k, k] is ``einsum('b,boikl->oikl', weight, basis)`` with ``basis`` a
    non-persistent buffer (the cached ``kernel_basis`` in the default dtype).

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
                 padding: Optional[int] = None, bias: bool = True, max_frequency: Optional[int] = None):
        super().__init__()
        k = _check_k(kernel_size)
        _check_types(in_type, out_type)
        self.in_type, self.out_type, self.kernel_size = in_type, out_type, k
        self.padding = k // 2 if padding is None else padding
        basis = kernel_basis(in_type, out_type, k, max_frequency)
        self.register_buffer("basis", basis.to(torch.get_default_dtype()).clone(), persistent=False)
        n = basis.shape[0]
        std = math.sqrt(out_type.dim / n) if n > 0 else 0.0
        self.weight = nn.Parameter(torch.randn(n, dtype=self.basis.dtype) * std)
        # bias expansion: bias_map [out_dim, n_bias], out_bias = bias_map @ bias
        cols = []
        for f, o, d in zip(out_type.fields, out_type.offsets(), out_type.dims):
            if f[0] in ("trivial", "regular"):
                col = torch.zeros(out_type.dim, dtype=self.basis.dtype)
                col[o:o + d] = 1.0
                cols.append(col)
        if bias and cols:
            self.register_buffer("bias_map", torch.stack(cols, dim=1), persistent=False)
            self.bias = nn.Parameter(torch.zeros(len(cols), dtype=self.basis.dtype))
        else:
            self.register_buffer("bias_map", None, persistent=False)
            self.register_parameter("bias", None)
        self._cache = None

    @property
    def n_basis(self) -> int:
        return self.basis.shape[0]

    def train(self, mode: bool = True):
        self._cache = None
        return super().train(mode)

    def _key(self):
        ts = [self.weight, self.basis] + ([self.bias] if self.bias is not None else [])
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in ts)

    def expand(self) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(kernel [out_dim, in_dim, k, k], bias [out_dim] or None)."""
        kernel = torch.einsum("b,boikl->oikl", self.weight, self.basis)
        b = self.bias_map @ self.bias if self.bias is not None else None
        return kernel, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"x must be [B, C, H, W] (rank 4), got rank {x.dim()} with shape {tuple(x.shape)}")
        if x.shape[1] != self.in_type.dim:
            raise ValueError(f"x has {x.shape[1]} channels, in_type needs {self.in_type.dim}")
        cacheable = not self.training and not (torch.is_grad_enabled() and self.weight.requires_grad)
        if cacheable:
            key = self._key()
            if self._cache is None or self._cache[0] != key:
                self._cache = (key, self.expand())
            kernel, b = self._cache[1]
        else:
            kernel, b = self.expand()
        return F.conv2d(x, kernel, b, padding=self.padding)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_type.dim}, out_dim={self.out_type.dim}, kernel_size={self.kernel_size}, "
                f"padding={self.padding}, n_basis={self.n_basis}, group={self.in_type.group}")
