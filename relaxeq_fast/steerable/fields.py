"""Field types over the plane for C_N / SO(2): representations, Lie generators, input checks."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Tuple

import torch

__all__ = ["FieldType"]


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
        """``n`` trivial (scalar, 1-dim) fields of group ``G`` (N of C_N, or None for SO(2))."""
        return cls(G, (("trivial", 0),) * n)

    @classmethod
    def regular(cls, N: int, n: int) -> "FieldType":
        """``n`` regular fields of C_N (N dims each: one channel per rotation)."""
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
        """Irrep fields of frequencies ``ms`` (2 dims each for m ≥ 1), each repeated ``multiplicity`` times."""
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
        """The dimension of each field, in order."""
        return tuple(_field_dim(self.group, f) for f in self.fields)

    @property
    def dim(self) -> int:
        """The total fibre dimension: the channel count of a feature map [B, dim, H, W]."""
        return sum(self.dims)

    def offsets(self) -> Tuple[int, ...]:
        """The first channel of each field in a feature map [B, dim, H, W]."""
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


def _field_index(ftype: FieldType) -> torch.Tensor:
    """[dim] long: the field each channel belongs to."""
    return torch.repeat_interleave(torch.arange(len(ftype.fields)), torch.tensor(ftype.dims, dtype=torch.long))


def _is_norm_field(f: Field) -> bool:
    """Irreps (incl. the 1-dim sign rep) are handled through their norm; trivial / regular fields pointwise."""
    return f[0] == "irrep"
