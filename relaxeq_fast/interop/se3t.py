"""se3-transformer-pytorch interop (optional: ``pip install 'relaxeq_fast[se3t]'``): relax the library's
``LinearSE3`` maps, the equivariant linear maps between fiber features of its SE(3)-Transformers.

``LinearSE3`` mixes channels per degree on features ``{"d": [b, n, c_d, 2d + 1]}`` (self-interaction, queries,
keys, values, outputs). :func:`relax_module` (what :func:`relaxeq_fast.vn.relax` calls for each) turns it into a
:class:`RelaxedLinearSE3`: a :class:`~relaxeq_fast.nn.RelaxedLinear` on the flattened multi-degree features
(irreps ``c_0x0 + c_1x1 + ...``), so the library's map plus θ·(W_r x + b_r) and the regulariser's input
statistics come from the one fused ``relaxed_linear`` op and the grouped regulariser, unchanged.

Basis: the library's degree-d features are not in our real spherical-harmonic basis. :func:`library_basis`
measures the change of basis T_d (orthogonal) from the library's own spherical harmonics — the functions its
kernels are built from, so its features transform as they do: Y_lib(R r) = D_lib(R) Y_lib(r), and
D_lib(R) = T_d D_ours(R) T_dᵀ. Measured with se3-transformer-pytorch 0.9.0: T_d = I for d = 0…3 (its harmonics are
ours, type-1 features are Cartesian), so no basis change runs; where a degree's T_d is not the identity the relaxed
layer moves features into our basis (x T_d), applies the relaxed map and moves back, so the relaxation, its
regulariser and the Lie algebra they use are always ours. The equivariant part (⊕ w_d ⊗ I, basis-free) is the
library's weights. The pairwise
convolution kernels (``ConvSE3``'s radial networks and bases) stay as they are: only the linear maps are relaxed.

``project()`` returns the library's ``LinearSE3`` with its weights ("drop") or the nearest equivariant map
("nearest"), whose state_dict loads into the original model.

The library's kernel bases are per machine: each Q_J (:func:`library_kernel_bases`) is an SVD null vector whose
sign depends on torch's thread count when it is first computed (measured with 0.9.0 on a 2-core x86_64: Q_J for
(J, d_in, d_out) = (1, 1, 1) has opposite signs with 1 and 2 threads), and the library caches it in
``~/.cache.equivariant_attention`` (``CACHE_PATH``) for every later process. Weights trained under one sign compute
another function under the other; :class:`relaxeq_fast.models.SE3TransformerNBody` records its bases in its
state_dict and refuses a checkpoint made under other ones.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from ..nn import PROJECTION_MODES, RelaxedLinear, check_choice, reload_float64_buffers
from ..reps import MAX_L, Irreps, random_rotation

__all__ = ["LIBRARY", "is_linear_se3", "library_basis", "library_kernel_bases", "RelaxedLinearSE3", "relax_module"]

LIBRARY = "se3_transformer_pytorch"
_DT = torch.float64


def is_linear_se3(module) -> bool:
    """Whether ``module`` is se3-transformer-pytorch's ``LinearSE3`` (checked without importing the library)."""
    cls = type(module)
    return cls.__name__ == "LinearSE3" and cls.__module__.startswith(LIBRARY + ".")


def _library_harmonics(points: torch.Tensor, degree: int) -> torch.Tensor:
    """The library's real spherical harmonics of degree d at points [P, 3] → [P, 2d + 1] (its own functions)."""
    from se3_transformer_pytorch.basis import get_spherical_from_cartesian, precompute_sh
    return precompute_sh(get_spherical_from_cartesian(points), degree)[degree]


def library_rotation(degree: int, R: torch.Tensor) -> torch.Tensor:
    """D_lib^d(R) [2d + 1, 2d + 1]: how the library's degree-d features transform when coordinates rotate by R
    (float64), fitted from its spherical harmonics on fixed points (exact: they span the irrep)."""
    points = torch.randn(8 * (2 * degree + 1), 3, generator=torch.Generator().manual_seed(0), dtype=_DT)
    Y, Y_rot = _library_harmonics(points, degree), _library_harmonics(points @ R.to(_DT).T, degree)
    return torch.linalg.lstsq(Y, Y_rot).solution.T


@functools.lru_cache(maxsize=None)
def library_basis(degree: int) -> torch.Tensor:
    """T_d [2d + 1, 2d + 1] float64, orthogonal, with D_lib^d(R) = T_d D_ours^d(R) T_dᵀ for every rotation R (the
    intertwiner, unique up to sign: Schur), solved from three random rotations and checked on a fourth."""
    if not 0 <= degree <= MAX_L:
        raise ValueError(f"degree {degree}: relaxeq_fast relaxes se3-transformer features up to degree {MAX_L} (its "
                         "Lie-algebra generators are tabulated up to l = 3)")
    d = 2 * degree + 1
    eye = torch.eye(d, dtype=_DT)
    ours = Irreps([(1, degree)])
    rotations = random_rotation(4, generator=torch.Generator().manual_seed(1))
    rows = [torch.kron(eye, library_rotation(degree, R).contiguous()) - torch.kron(ours.rotation_matrix(R).T.contiguous(), eye)
            for R in rotations[:3]]
    T = torch.linalg.svd(torch.cat(rows)).Vh[-1].reshape(d, d).T  # vec(T), column-major
    T = T / (T @ T.T).diagonal().mean().sqrt()
    T = T if T.trace() >= 0 else -T  # the sign Schur leaves free
    R = rotations[3]
    error = float((library_rotation(degree, R) @ T - T @ ours.rotation_matrix(R)).abs().max())
    if error > 1e-10 or float((T @ T.T - eye).abs().max()) > 1e-10:
        raise RuntimeError(f"the library's degree-{degree} features are not an orthogonal change of basis of ours "
                           f"(error {error:.2g}): its conventions changed")
    return T


def library_kernel_bases(num_degrees: int) -> tuple[list[tuple[int, int, int]], list[torch.Tensor]]:
    """The keys (J, d_in, d_out) and matrices Q_J [(2 d_out + 1)(2 d_in + 1), 2J + 1] (float64 copies of the
    library's float32) of the pairwise-kernel bases an SE3Transformer with ``num_degrees`` uses, in the order its
    ``get_basis`` builds them, from the library's cache of this machine (computed there first if absent)."""
    from se3_transformer_pytorch import basis as lib_basis  # looked up per call: the function the library calls
    keys = [(J, d_in, d_out) for d_in in range(num_degrees) for d_out in range(num_degrees)
            for J in range(abs(d_in - d_out), d_in + d_out + 1)]
    return keys, [lib_basis.basis_transformation_Q_J(*key).to(_DT) for key in keys]


class RelaxedLinearSE3(RelaxedLinear):
    """A relaxed ``LinearSE3``: features ``{"d": [b, n, c_in_d, 2d + 1]}`` → ``{"d": [b, n, c_out_d, 2d + 1]}`` for
    the degrees the library layer maps, computing the library's map + θ (W_r x + b_r) on the flattened features in
    our basis (see the module docstring). Degrees of the input the layer has no weights for are ignored, as the
    library does. A :class:`~relaxeq_fast.nn.RelaxedLinear` otherwise (θ, regularisers, relaxation_parts)."""

    def __init__(self, degrees, library_class: type, **relaxed_kwargs):
        """``degrees``: [(degree key as the library's dict has it, c_in, c_out)] in the library layer's order."""
        self.degrees = tuple((str(k), int(c_in), int(c_out)) for k, c_in, c_out in degrees)
        self._sorted = tuple(sorted(self.degrees, key=lambda t: int(t[0])))  # the flattened layout's order
        super().__init__(Irreps([(c_in, int(k)) for k, c_in, _ in self._sorted]),
                         Irreps([(c_out, int(k)) for k, _, c_out in self._sorted]), bias=False, **relaxed_kwargs)
        self._order = tuple(k for k, _, _ in self._sorted)
        self.library_class = library_class
        # a basis change only where the library's differs from ours (measured: nowhere up to degree 3 today)
        self._bases = {k: library_basis(int(k)) for k in self._order
                       if not torch.allclose(library_basis(int(k)), torch.eye(2 * int(k) + 1, dtype=_DT), atol=1e-12)}
        like = self.weight_relax
        for k, T in self._bases.items():
            self.register_buffer(f"basis_{k}", T.to(like.device, like.dtype), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        reload_float64_buffers(self, {f"basis_{k}": T for k, T in self._bases.items()})
        return out

    def forward(self, x: dict) -> dict:  # type: ignore[override]
        """``x`` {degree: [b, n, c_in, 2d + 1]} → {degree: [b, n, c_out, 2d + 1]} (the layer's degrees)."""
        if not isinstance(x, dict) or any(k not in x for k in self._order):
            have = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(f"RelaxedLinearSE3 takes the library's feature dict with degrees {list(self._order)}, "
                             f"got {have}")
        parts = []
        for k in self._order:
            t = x[k]
            if k in self._bases:
                t = t @ getattr(self, f"basis_{k}")  # rows in the library basis → ours
            parts.append(t.reshape(*t.shape[:-2], -1))
        y = super().forward(torch.cat(parts, -1) if len(parts) > 1 else parts[0])
        out, start = {}, 0
        for (k, _c_in, c_out) in self._sorted:
            width = c_out * (2 * int(k) + 1)
            t = y[..., start:start + width].reshape(*y.shape[:-1], c_out, 2 * int(k) + 1)
            out[k] = t @ getattr(self, f"basis_{k}").T if k in self._bases else t
            start += width
        return {k: out[k] for k, _, _ in self.degrees}

    @classmethod
    def from_plain(cls, layer, **relaxed_kwargs) -> "RelaxedLinearSE3":
        """The relaxed twin of a library ``LinearSE3`` with its weights (outputs unchanged at θ = 0 or W_r = 0)."""
        degrees = [(k, w.shape[0], w.shape[1]) for k, w in layer.weights.items()]
        ref = next(iter(layer.weights.values()))
        out = cls(degrees, type(layer), device=ref.device, dtype=ref.dtype, **relaxed_kwargs)
        with torch.no_grad():
            for w, (l, *_rest) in zip(out.weights, out.layout):
                w.copy_(layer.weights[str(l)].T)  # the library: y[e] = Σ_d x[d] w[d, e]
        return out.train(layer.training)

    @torch.no_grad()
    def project(self, mode: str = "drop"):
        """The library's ``LinearSE3`` (its class and state_dict layout) with θ = 0 and the relaxation removed:
        the same weights ("drop") or the nearest equivariant map ("nearest", see RelaxedLinear.project)."""
        check_choice(mode, PROJECTION_MODES, "mode")
        plain = super().project(mode)
        lib = self.library_class.__new__(self.library_class)
        nn.Module.__init__(lib)
        by_degree = {l: w for w, (l, *_rest) in zip(plain.weights, plain.layout)}
        # contiguous, as the library's own: a transposed copy would give its matmuls another summation order
        lib.weights = nn.ParameterDict({k: nn.Parameter(by_degree[int(k)].T.clone(memory_format=torch.contiguous_format))
                                        for k, _, _ in self.degrees})
        return lib.train(self.training)

    def extra_repr(self) -> str:
        """Degrees (c_in → c_out), θ and backend, for ``repr``."""
        degrees = ", ".join(f"{k}: {a}→{b}" for k, a, b in self.degrees)
        return f"degrees {{{degrees}}}, theta={float(self.theta):g}, backend={self.backend or 'auto'}"


def relax_module(module, **relaxed_kwargs) -> Optional[RelaxedLinearSE3]:
    """A library ``LinearSE3`` → :class:`RelaxedLinearSE3` (``relaxed_kwargs``: theta, relax_init, relax_space,
    backend, ...); anything else → None."""
    if not is_linear_se3(module):
        return None
    return RelaxedLinearSE3.from_plain(module, **relaxed_kwargs)
