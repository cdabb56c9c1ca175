"""Representations of SO(3) on flattened feature vectors, and their generators.

A representation here is a direct sum of real irreps ``⊕_i (mul_i × D^{l_i})``, flattened per
block in e3nn order: block i occupies ``mul_i * (2 l_i + 1)`` consecutive entries, multiplicity
major (index ``u * (2l+1) + m``). The basis of ``D^l`` is the real spherical harmonics with the
y axis as polar axis (e3nn's convention), so the ``l = 1`` block is (x, y, z) and ``D^1(R) = R``.

Vector-Neuron features ``[..., C, 3]`` flatten channel-major (index ``3c + d``) — exactly the
irreps ``C x 1`` — so :class:`VN` is an :class:`Irreps` with a 2-D feature shape.

Generators are never materialised densely for the whole feature space: :meth:`Irreps.apply_generators`
maps rows ``x ↦ A_k x`` block by block in O(D·(2l+1)).
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

__all__ = ["Irreps", "VN", "so3_generators", "irrep_generators", "rotation_to_axis_angle",
           "random_rotation"]

MAX_L = 3
_PARITIES = {None: None, "e": 1, 1: 1, "o": -1, -1: -1}
_PARITY_NAMES = {None: "", 1: "e", -1: "o"}


def so3_generators(dtype=torch.float64, device=None) -> torch.Tensor:
    """so(3) basis ``G_k`` with ``[G_i]_{jk} = -ε_ijk`` (so ``G_k v = e_k × v``). Shape [3, 3, 3]."""
    eps = torch.zeros(3, 3, 3, dtype=torch.float64)
    for i, j, k in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        eps[i, j, k], eps[i, k, j] = 1.0, -1.0
    return (-eps).to(dtype=dtype, device=device)


def _irrep_generators_f64(l: int) -> torch.Tensor:
    # Angular-momentum matrices in the complex |l, m> basis (Condon–Shortley), moved to the
    # real spherical-harmonic basis ordered m = -l..l with z as polar axis. Then the axes are
    # relabelled (x, y, z) -> (z', x', y') so y becomes the polar axis and l = 1 reads (x, y, z).
    d = 2 * l + 1
    m = torch.arange(-l, l + 1, dtype=torch.float64)
    j_plus = torch.zeros(d, d, dtype=torch.complex128)
    for i in range(d - 1):
        j_plus[i + 1, i] = math.sqrt(l * (l + 1) - m[i].item() * (m[i].item() + 1))
    j_minus = j_plus.conj().T
    j_x, j_y, j_z = (j_plus + j_minus) / 2, (j_plus - j_minus) / 2j, torch.diag(m).to(torch.complex128)
    to_real = torch.zeros(d, d, dtype=torch.complex128)
    r = math.sqrt(0.5)
    for i in range(d):
        mi = int(m[i].item())
        sign = (-1.0) ** abs(mi)
        if mi < 0:
            to_real[i, l + mi], to_real[i, l - mi] = -1j * r, 1j * r * sign
        elif mi == 0:
            to_real[i, l] = 1.0
        else:
            to_real[i, l - mi], to_real[i, l + mi] = r, r * sign
    inv = torch.linalg.inv(to_real)
    z_polar = [to_real @ (-1j * j) @ inv for j in (j_x, j_y, j_z)]
    gens = torch.stack([z_polar[1], z_polar[2], z_polar[0]])
    assert gens.imag.abs().max() < 1e-12, "real irrep generators came out complex"
    return gens.real.contiguous()


def irrep_generators(l: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Generators ``dD^l(G_k)`` of the real irrep of degree ``l``: shape [3, 2l+1, 2l+1], skew.

    Cached per (l, dtype, device): treat the result as read-only.
    """
    if not (isinstance(l, int) and 0 <= l <= MAX_L):
        raise ValueError(f"l must be an int in [0, {MAX_L}], got {l!r}")
    if torch.compiler.is_compiling():
        return _GENERATORS_F64[l].to(dtype=dtype, device=device)  # a graph constant
    key = (l, dtype, torch.device(device) if device is not None else torch.device("cpu"))
    if key not in _GENERATORS_CAST:
        _GENERATORS_CAST[key] = _GENERATORS_F64[l].to(dtype=key[1], device=key[2])
    return _GENERATORS_CAST[key]


# Built once at import (CPU, tiny): compiled code then sees constants, not the complex algebra.
_GENERATORS_F64 = [_irrep_generators_f64(l) for l in range(MAX_L + 1)]
_GENERATORS_CAST: dict = {}


def rotation_to_axis_angle(R: torch.Tensor) -> torch.Tensor:
    """ω with ``R = exp(Σ_k ω_k G_k)``. R: [..., 3, 3] → ω: [..., 3]."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1, 1)
    angle = torch.acos(cos)
    skew = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0],
                        R[..., 1, 0] - R[..., 0, 1]], -1) / 2
    sin = angle.sin()
    small = sin.abs() < 1e-6
    axis_scaled = torch.where(small[..., None], skew, skew * (angle / sin.where(~small, torch.ones_like(sin)))[..., None])
    # Near π the skew part vanishes: read the axis off the symmetric part instead.
    near_pi = (cos < -0.99)
    if near_pi.any():
        B = (R + R.transpose(-1, -2)) / 2 - torch.eye(3, dtype=R.dtype, device=R.device) * cos[..., None, None]
        B = B / (1 - cos)[..., None, None]
        idx = B.diagonal(dim1=-2, dim2=-1).argmax(-1)
        col = torch.gather(B, -1, idx[..., None, None].expand(*B.shape[:-1], 1)).squeeze(-1)
        axis = col / col.norm(dim=-1, keepdim=True)
        axis = torch.where((axis * skew).sum(-1, keepdim=True) < 0, -axis, axis)
        axis_scaled = torch.where(near_pi[..., None], axis * angle[..., None], axis_scaled)
    return axis_scaled


def random_rotation(n: int | None = None, dtype=torch.float64, generator: torch.Generator | None = None,
                    device=None) -> torch.Tensor:
    """Haar-random rotations: [3, 3], or [n, 3, 3] when n is given (QR of a Gaussian, det fixed)."""
    shape = (1 if n is None else n, 3, 3)
    A = torch.randn(shape, dtype=torch.float64, generator=generator)
    Q, Rq = torch.linalg.qr(A)
    Q = Q * torch.sign(torch.diagonal(Rq, dim1=-2, dim2=-1))[..., None, :]
    Q = torch.where(torch.linalg.det(Q)[..., None, None] < 0, -Q, Q)
    Q = Q.to(dtype=dtype, device=device)
    return Q[0] if n is None else Q


class Irreps:
    """A direct sum of real SO(3) irreps, e.g. ``Irreps("4x0 + 2x1 + 1x2")`` or ``Irreps([(4, 0), (2, 1)])``.

    Attributes:
        blocks: tuple of (mul, l)
        dim: flattened dimension D = Σ mul (2l+1)
        feature_shape: shape of one feature as the layers take it ((D,) here; (C, 3) for VN)
    """

    def __init__(self, spec: str | Iterable[tuple]):
        blocks = self._parse(spec) if isinstance(spec, str) else [tuple(b) for b in spec]
        parsed = []
        for b in blocks:
            if len(b) not in (2, 3) or not all(isinstance(v, int) for v in b[:2]) or b[0] < 0 or not 0 <= b[1] <= MAX_L:
                raise ValueError(f"irreps blocks must be (mul >= 0, l in [0, {MAX_L}]) or (mul, l, parity), got {b!r}"
                                 + (" (l > 3: the generators are tabulated up to l = 3)"
                                    if len(b) in (2, 3) and isinstance(b[1], int) and b[1] > MAX_L else ""))
            parity = _PARITIES.get(b[2] if len(b) == 3 else None, "bad")
            if parity == "bad":
                raise ValueError(f"an irreps block's parity must be 'e' / 1, 'o' / -1 or None, got {b[2]!r} in {b!r}")
            parsed.append((b[0], b[1], parity))
        self.blocks: tuple[tuple[int, int], ...] = tuple((m, l) for m, l, _p in parsed if m > 0)
        # O(3) parity per block: +1 (e), −1 (o), or None (an SO(3) irrep: "1", VN features). Linear maps
        # connect blocks of equal l whose parities do not differ; the Lie algebra (the regulariser) sees l only.
        self.parities: tuple = tuple(p for m, _l, p in parsed if m > 0)
        self.dim = sum(m * (2 * l + 1) for m, l in self.blocks)
        if self.dim == 0:
            raise ValueError(f"irreps must have a positive dimension, got {spec!r}")

    @staticmethod
    def _parse(spec: str) -> list[tuple]:
        out = []
        for term in spec.replace(" ", "").split("+"):
            mul, _, l = term.rpartition("x")
            try:
                out.append((int(mul) if mul else 1, int(l.rstrip("eo")), l[-1] if l[-1:] in ("e", "o") else None))
            except ValueError:
                raise ValueError(f"cannot parse irreps term {term!r} in {spec!r} (expected e.g. '4x0+2x1' or "
                                 "'4x0e+2x1o')")
        return out

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The trailing shape of a feature tensor, ``(D,)``: features are [..., D]."""
        return (self.dim,)

    def __eq__(self, other):
        return (isinstance(other, Irreps) and self.blocks == other.blocks and self.parities == other.parities
                and type(self) is type(other))

    def __hash__(self):
        return hash((type(self).__name__, self.blocks, self.parities))

    def __repr__(self):
        return "Irreps(\"" + " + ".join(f"{m}x{l}{_PARITY_NAMES[p]}" for (m, l), p in zip(self.blocks, self.parities)) \
            + "\")"

    def is_invariant(self, block: int) -> bool:
        """Whether block ``block`` holds invariant scalars (l = 0, not odd parity): where a bias may sit."""
        return self.blocks[block][1] == 0 and self.parities[block] != -1

    def slices(self) -> list[tuple[int, int, int, int]]:
        """(start, stop, mul, l) of each block in the flattened vector."""
        out, start = [], 0
        for m, l in self.blocks:
            stop = start + m * (2 * l + 1)
            out.append((start, stop, m, l))
            start = stop
        return out

    def apply_generator(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Rows ``x_n ↦ A_k x_n`` with ``A_k = dρ(G_k)``. x: [..., D] → [..., D]. O(D·(2l+1))."""
        return self.apply_generators(x)[k]

    def apply_generators(self, x: torch.Tensor) -> torch.Tensor:
        """All three at once: x [..., D] → [3, ..., D] with entry k = rows ``A_k x_n``.

        One small batched matmul per irrep block: the regulariser calls this on [D_out, D_in]
        weights every step, where the number of ops, not their size, sets the cost.
        """
        parts = []
        for start, stop, m, l in self.slices():
            if l == 0:
                parts.append(x.new_zeros(3, *x.shape[:-1], stop - start))
                continue
            xb = x[..., start:stop].reshape(*x.shape[:-1], m, 2 * l + 1)
            A = irrep_generators(l, dtype=x.dtype, device=x.device)  # [3, 2l+1, 2l+1]
            parts.append(torch.einsum("...j,kij->k...i", xb, A).reshape(3, *x.shape[:-1], stop - start))
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def generator_matrices(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """Dense ``A_k`` [3, D, D]. For tests and small D only; the layers never build these."""
        out = torch.zeros(3, self.dim, self.dim, dtype=dtype, device=device)
        for start, stop, m, l in self.slices():
            eye = torch.eye(m, dtype=dtype, device=device)
            for k in range(3):
                out[k, start:stop, start:stop] = torch.kron(eye, irrep_generators(l, dtype, device)[k])
        return out

    def rotation_matrix(self, R: torch.Tensor) -> torch.Tensor:
        """ρ(R) as a dense [D, D] matrix (R: [3, 3]); built as exp(Σ ω_k A_k) per irrep."""
        omega = rotation_to_axis_angle(R.to(torch.float64))
        out = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=R.device)
        for start, stop, m, l in self.slices():
            A = irrep_generators(l, device=R.device)
            D_l = torch.linalg.matrix_exp(torch.einsum("k,kij->ij", omega, A))
            out[start:stop, start:stop] = torch.kron(torch.eye(m, dtype=torch.float64, device=R.device), D_l)
        return out.to(R.dtype)

    def rotate(self, R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """ρ(R) applied to features x: [..., *feature_shape]."""
        flat = x.reshape(*x.shape[: x.dim() - len(self.feature_shape)], self.dim)
        return (flat @ self.rotation_matrix(R).to(x.dtype).T).reshape(x.shape)

    def equivariant_layout(self, other: "Irreps") -> list[tuple[int, int, int, int, int, int, int]]:
        """Blocks that an equivariant linear map ``self -> other`` can connect (Schur: same l, and the same
        parity where both blocks have one).

        Returns (l, out_start, out_mul, in_start, in_mul, out_block_index, in_block_index) for every
        pair of an output block and an input block of equal degree.
        """
        pairs = []
        for oi, (os_, _, om, ol) in enumerate(other.slices()):
            for ii, (is_, _, im, il) in enumerate(self.slices()):
                po, pi = other.parities[oi], self.parities[ii]
                if ol == il and (po is None or pi is None or po == pi):
                    pairs.append((ol, os_, om, is_, im, oi, ii))
        return pairs


class VN(Irreps):
    """Vector-Neuron features: C channels of 3-vectors, feature shape (C, 3), flattened 3c + d."""

    def __init__(self, channels: int):
        if not isinstance(channels, int) or channels <= 0:
            raise ValueError(f"VN channels must be a positive int, got {channels!r}")
        super().__init__([(channels, 1)])
        self.channels = channels

    @property
    def feature_shape(self) -> tuple[int, ...]:
        """The trailing shape of a feature tensor, ``(C, 3)``: features are [..., C, 3]."""
        return (self.channels, 3)

    def __repr__(self):
        return f"VN({self.channels})"

    def rotate(self, R: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Every 3-vector rotated, ``x Rᵀ``: x [..., C, 3], R [3, 3] → [..., C, 3]."""
        return x @ R.to(x.dtype).T
