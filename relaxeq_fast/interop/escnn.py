"""escnn and e2cnn interop (optional: ``pip install 'relaxeq_fast[e2cnn]'``; escnn: README "escnn and e2cnn
models"): relax the steerable CNNs people build with these libraries, train them on the fused ``relaxed_conv2d``
op, and return the library's own, exactly equivariant model.

The two libraries share their module API (escnn is e2cnn's successor), so one code path serves both; only group
elements differ (e2cnn's are plain values, escnn's ``GroupElement`` objects), and :func:`_element` hides that.

* :func:`relax_module` (what :func:`relaxeq_fast.vn.relax` calls for every library ``R2Conv``) turns an ``R2Conv``
  into a relaxed twin whose class derives from the library's own ``R2Conv``: the equivariant kernel is still the
  library's (its basis expansion, its ``weights`` and ``bias``, its eval-mode ``filter`` cache), so nothing changes
  at θ = 0, the state_dict keeps the library's keys (plus ``weight_relax``, ``theta``), and the library's
  ``SequentialModule`` accepts it. The forward is one :func:`~relaxeq_fast.functional.relaxed_conv_params`
  (K + θB and the defect D(B)) and one :func:`~relaxeq_fast.functional.relaxed_conv2d` (the output and the
  data-mode R_LD in one pass over the input).
* The defect operator is the package's (:class:`~relaxeq_fast.steerable.RelaxedR2Conv`), with the fiber
  representations read from the library's field types (any representation of C_N, D_N, SO(2) or O(2):
  trivial, irreps, regular, quotient, in the library's basis) and one defect per generator of the group: the
  rotation by 2π/N (C_N, D_N) or the infinitesimal rotation (SO(2), O(2)), and the flip (D_N, O(2)); their
  defect kernels are stacked as extra output channels of the one fused convolution. The spatial part is an exact
  pixel permutation where the library's own transformation of the grid is one (quarter turns, axis flips).
  Elsewhere (C_8, SO(2), ...) the kernel is read as a continuous function by the hybrid interpolation of
  :mod:`relaxeq_fast.steerable.conv`, whose smooth family is here **the library's own kernels**: the pixel
  slices of the layer's basis span a space of functions whose rotations the library's equivariance fixes
  (K(R_g⁻¹ p) = ρ_out(g)⁻¹ K(p) ρ_in(g)), so D vanishes on the library's equivariant kernels by construction
  (to their rounding: ``basis_defect`` records it per layer), and the residual is interpolated by Gaussian RBFs
  as there.
* ``project()`` returns the library's ``R2Conv`` with its weights ("drop"), or with the least-squares projection
  of θB onto the library's basis added ("nearest", conjugate gradients on the basis expansion).
* :func:`convert_module` (what :func:`relaxeq_fast.interop.swap` calls) turns a library ``R2Conv`` into the
  package's own :class:`~relaxeq_fast.steerable.R2Conv` only where that is exact: the field types map onto ours
  and the library's kernel space equals ours (checked numerically, a least-squares fit of every library
  kernel); otherwise the library layer stays (and :func:`relax_module` relaxes it as it is).

Unsupported here, refused in one line naming it: grouped convolutions (``groups > 1``), dilation, the trivial
group, and groups other than those above. Strides and non-zero padding modes run, the former outside the fused
op (a plain ``conv2d`` and the defect's ``conv2d``: the fused op has no stride).
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import relaxed_conv2d, relaxed_conv_params
from ..nn import PROJECTION_MODES, check_choice, reload_float64_buffers
from ..steerable.basis import _grid_points
from ..steerable.conv import RelaxedKernel, _hybrid, _rbf, apply_defect
from ..steerable.fields import _rot2

__all__ = ["LIBRARIES", "library_of", "is_library_r2conv", "relax_module", "convert_module", "to_package_conv",
           "library_defect", "basis_coefficients"]

LIBRARIES = ("escnn", "e2cnn")
_DT = torch.float64
# singular values of the library's kernel slices below this (relative) are its float32 rounding, not functions
_FAMILY_RTOL = 1e-6
# a layer whose own kernels' defect is above this (relative) is refused: its basis is not what we think it is
_BASIS_DEFECT_LIMIT = 1e-4


def library_of(module) -> Optional[str]:
    """"escnn" or "e2cnn" when ``module``'s class (or a base of it: the relaxed twins) comes from that library,
    else None (nothing is imported)."""
    for cls in type(module).__mro__:
        root = cls.__module__.split(".")[0]
        if root in LIBRARIES:
            return root
    return None


def is_library_r2conv(module) -> bool:
    """Whether ``module`` is an escnn / e2cnn ``R2Conv`` that is not already relaxed."""
    name = library_of(module)
    return name is not None and isinstance(module, sys.modules[name].nn.R2Conv) \
        and not isinstance(module, RelaxedKernel)


# ---- groups, generators and representations ------------------------------------------------------------------


def _element(group, library: str, value):
    """The library's group element for ``value`` (e2cnn: the value itself; escnn: ``group.element(value)``)."""
    return group.element(value) if library == "escnn" else value


def _group_kind(gspace) -> tuple:
    """("rotations", N) with N = -1 for SO(2), ("flips_rotations", N) with N = -1 for O(2), or ("flips", 1)."""
    G = gspace.fibergroup
    name = type(G).__name__
    if name == "CyclicGroup" and type(gspace).__name__ == "Flip2dOnR2":
        return "flips", 1
    if name == "CyclicGroup" and G.order() > 1:
        return "rotations", G.order()
    if name == "SO2":
        return "rotations", -1
    if name == "DihedralGroup":
        return "flips_rotations", G.rotation_order
    if name == "O2":
        return "flips_rotations", -1
    raise ValueError(f"{type(gspace).__module__.split('.')[0]} group {G} ({name}) is not supported: the relaxed "
                     "convolutions handle C_N (N ≥ 2), D_N, SO(2) and O(2) (and the flip group)")


def _generators(gspace, library: str) -> list:
    """[(kind, element, angle)]: "step" (a group element; ``angle`` its rotation when it is one, else None) or
    "lie" (the rotation generator; element None)."""
    G = gspace.fibergroup
    kind, N = _group_kind(gspace)
    out = []
    if kind == "rotations":
        out.append(("lie", None, None) if N < 0 else ("step", _element(G, library, 1), 2 * math.pi / N))
    elif kind == "flips_rotations":
        if N < 0:
            out.append(("lie", None, None))
        elif N > 1:
            out.append(("step", _element(G, library, (0, 1)), 2 * math.pi / N))
    flip = 1 if kind == "flips" else ((1, 0.) if N < 0 else (1, 0))
    if kind != "rotations":
        out.append(("step", _element(G, library, flip), None))
    return out


def _rotation(gspace, library: str, angle: float):
    """The library's element of rotation by ``angle`` (SO(2) or O(2))."""
    kind, _ = _group_kind(gspace)
    return _element(gspace.fibergroup, library, angle if kind == "rotations" else (0, angle))


def _matrix(ftype, element) -> torch.Tensor:
    return torch.as_tensor(np.asarray(ftype.representation(element), dtype=np.float64))


def _lie_algebra(ftype, gspace, library: str) -> torch.Tensor:
    """dρ [dim, dim] of ``ftype`` under the rotation generator: log ρ(t) / t at a small t (exact for frequencies
    below π / t), checked against ρ at another angle."""
    from scipy.linalg import expm, logm
    t = 1e-2
    rho_t = _matrix(ftype, _rotation(gspace, library, t)).numpy()
    d_rho = np.real(logm(rho_t)) / t
    check = _matrix(ftype, _rotation(gspace, library, 0.37)).numpy()
    if not np.allclose(expm(0.37 * d_rho), check, atol=1e-9):
        raise ValueError(f"cannot take the Lie algebra of representation {ftype}: its frequencies are too high "
                         f"(above {math.pi / t:.0f})")
    return torch.as_tensor(d_rho)


def _pixel_permutation(ftype_trivial, element, k: int) -> Optional[torch.Tensor]:
    """S [k², k²] with (S vec B)(p) = B(g⁻¹ p), from the library's own transformation of the k² unit images, when
    that is a pixel permutation (quarter turns, axis flips); None otherwise (the library interpolates)."""
    lib_nn = sys.modules[type(ftype_trivial).__module__.split(".")[0]].nn
    eye = torch.eye(k * k, dtype=torch.float32).reshape(k * k, 1, k, k)
    moved = lib_nn.GeometricTensor(eye, ftype_trivial).transform(element).tensor.to(_DT).reshape(k * k, k * k)
    S = moved.T.contiguous()  # column q: the transformed unit image e_q
    is_permutation = bool(((S == 0) | (S == 1)).all()) and bool((S.sum(0) == 1).all()) and bool((S.sum(1) == 1).all())
    return S if is_permutation else None


# ---- the relaxed library convolution ------------------------------------------------------------------------


def _expand(conv, weights: torch.Tensor) -> torch.Tensor:
    """The library's kernel [O, I, k, k] for coefficients ``weights`` [n]."""
    K = conv.basisexpansion(weights)
    return K.reshape(K.shape[0], K.shape[1], conv.kernel_size, conv.kernel_size)


def _kernel_samples(conv) -> torch.Tensor:
    """Kernels [d, O, I, k, k] (float64) whose pixel slices span those of the whole basis: the basis itself when
    small, else random combinations (enough slices, with probability 1)."""
    n = conv.weights.numel()
    O, I, k = conv.out_type.size, conv.in_type.size, conv.kernel_size
    draws = max(2, math.ceil(2 * k * k / (O * I)))
    like = conv.weights.detach()
    gen = torch.Generator().manual_seed(0)
    W = torch.eye(n) if n <= draws else torch.randn(draws, n, generator=gen)
    with torch.no_grad():
        return torch.stack([_expand(conv, w.to(like.device, like.dtype)).to("cpu", _DT) for w in W])


def library_defect(conv) -> tuple:
    """The defect operator of a library ``R2Conv``: ([(A_out, A_in, S, rotation_step)] per generator, float64),
    and the relative defect of the library's own kernels under it (0 up to their rounding)."""
    library = library_of(conv)
    gspace = conv.in_type.gspace
    k = conv.kernel_size
    lib_nn = sys.modules[library].nn
    trivial = lib_nn.FieldType(gspace, [gspace.trivial_repr])
    Ks = _kernel_samples(conv)  # [d, O, I, k, k]
    X = Ks.reshape(-1, k * k).T  # every pixel slice, [k², d·O·I]
    grid = _grid_points(k)
    mats, defects = [], []
    for kind, element, angle in _generators(gspace, library):
        if kind == "lie":
            A_out = _lie_algebra(conv.out_type, gspace, library)
            A_in = _lie_algebra(conv.in_type, gspace, library)
            # d/dt K(R_t⁻¹ p) at 0 = K dρ_in − dρ_out K on equivariant kernels
            Y = (torch.einsum("dpikl,iq->dpqkl", Ks, A_in) - torch.einsum("op,dpikl->doikl", A_out, Ks))
            S = _hybrid(k, Y.reshape(-1, k * k).T, _rbf(k, grid, d_t=True), family=X, rtol=_FAMILY_RTOL)
        else:
            A_out, A_in = _matrix(conv.out_type, element), _matrix(conv.in_type, element)
            S = _pixel_permutation(trivial, element, k)
            if S is None:
                if angle is None:
                    raise ValueError(f"the flip of {gspace} does not permute the pixels of a {k}×{k} kernel (its axis "
                                     "is not a grid axis): not supported")
                # K(R_g⁻¹ p) = ρ_out(g)⁻¹ K(p) ρ_in(g) on equivariant kernels
                Y = torch.einsum("op,dpikl,iq->doqkl", torch.linalg.inv(A_out), Ks, A_in)
                pts = grid @ _rot2(-angle).T  # R_g⁻¹ p, as spatial_rotation_operator
                S = _hybrid(k, Y.reshape(-1, k * k).T, _rbf(k, pts), family=X, rtol=_FAMILY_RTOL)
        entry = (A_out, A_in, S, kind == "step")
        D = apply_defect(Ks, A_out, A_in, S, 1 if kind == "step" else None)
        defects.append(float(D.norm() / Ks.norm().clamp_min(1e-300)))
        mats.append(entry)
    return mats, max(defects)


def basis_coefficients(conv, K: torch.Tensor, tol: float = 1e-12, max_iter: Optional[int] = None) -> torch.Tensor:
    """Least-squares coefficients c [n] of a kernel K [O, I, k, k] on the library layer's basis: argmin ‖E c − K‖
    with E the basis expansion, by conjugate gradients on EᵀE c = EᵀK (Eᵀ through autograd: E is linear), to a
    residual gradient below ``tol`` · ‖EᵀK‖. ``_expand(conv, c)`` is then the equivariant kernel nearest to K."""
    n = conv.weights.numel()
    like = conv.weights.detach()

    def adjoint(v):
        with torch.enable_grad():
            w = torch.zeros(n, dtype=like.dtype, device=like.device, requires_grad=True)
            return torch.autograd.grad((_expand(conv, w) * v).sum(), w)[0]

    with torch.no_grad():
        b = adjoint(K.to(like.dtype))
        c = torch.zeros_like(b)
        r = b.clone()
        p = r.clone()
        rr = r.dot(r)
        stop = (tol * b.norm()) ** 2
        for _ in range(max_iter or max(n, 10)):
            if rr <= stop:
                break
            Ap = adjoint(_expand(conv, p))
            alpha = rr / p.dot(Ap)
            c += alpha * p
            r -= alpha * Ap
            rr, rr_old = r.dot(r), rr
            p = r + (rr / rr_old) * p
    return c


class _RelaxedLibraryConv(RelaxedKernel):
    """Mixed into a library ``R2Conv`` class by :func:`_relaxed_class`: kernel ``K_lib + θ B``, B =
    ``weight_relax`` [O, I, k, k] a free kernel, one fused ``relaxed_conv2d`` per forward. See the module
    docstring; the regularisers are :class:`~relaxeq_fast.steerable.RelaxedR2Conv`'s (data mode: Σ conv2d(x̂,
    D(B))² over the last training input, D stacked over the group's generators; weight mode ‖D(B)‖²; R_N = ‖B‖²).

    Shapes: GeometricTensor [B, in_type.size, H, W] → GeometricTensor [B, out_type.size, H', W'] (the library's).
    """

    relax_space = "full"
    _RELAX_ATTRS = ("weight_relax", "theta", "last_defect", "track_defect", "backend", "relax_init", "basis_defect",
                    "_defect_constants", "_generator_kinds")

    def _setup_relaxation(self, theta: float, relax_init: str, track_defect: bool, backend: Optional[str]):
        if self.groups != 1:
            raise ValueError(f"groups={self.groups}: grouped {library_of(self)} convolutions are not supported")
        if self.dilation != 1:
            raise ValueError(f"dilation={self.dilation}: dilated {library_of(self)} convolutions are not supported "
                             "(the defect operator works on the unit pixel grid)")
        self.relax_init = check_choice(relax_init, ("zeros", "default"), "relax_init")
        self.track_defect, self.backend, self.last_defect = bool(track_defect), backend, None
        like = self.weights.detach()
        k, O, I = self.kernel_size, self.out_type.size, self.in_type.size
        mats, self.basis_defect = library_defect(self)
        if self.basis_defect > _BASIS_DEFECT_LIMIT:
            raise ValueError(f"the {library_of(self)} kernels of this layer ({self.in_type} → {self.out_type}) have "
                             f"an equivariance defect of {self.basis_defect:.2g} under the grid's own transformation: "
                             "not a basis the defect operator can certify")
        self._generator_kinds = tuple(m[3] for m in mats)
        self._defect_constants = {}
        for i, (A_out, A_in, S, _step) in enumerate(mats):
            for name, t in (("out", A_out), ("in", A_in), ("spatial", S)):
                self._defect_constants[f"defect_{name}_{i}"] = t
                self.register_buffer(f"defect_{name}_{i}", t.to(like.device, like.dtype), persistent=False)
        self.weight_relax = nn.Parameter(torch.empty(O, I, k, k, dtype=like.dtype, device=like.device))
        self.register_buffer("theta", torch.tensor(float(theta), dtype=like.dtype, device=like.device))
        self.reset_relaxation()

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        reload_float64_buffers(self, self._defect_constants)
        return out

    def reset_relaxation(self):
        """Re-initialise B per ``relax_init``: "zeros" (the relaxed layer starts as the library's) or "default"
        (uniform ±1/√(in_dim·k²))."""
        with torch.no_grad():
            if self.relax_init == "zeros":
                self.weight_relax.zero_()
            else:
                bound = 1 / math.sqrt(self.in_type.size * self.kernel_size ** 2)
                self.weight_relax.uniform_(-bound, bound)

    def _defect_matrices(self, i: int) -> tuple:
        return (getattr(self, f"defect_out_{i}"), getattr(self, f"defect_in_{i}"), getattr(self, f"defect_spatial_{i}"))

    def relaxation_kernel(self) -> torch.Tensor:
        """B [O, I, k, k] as the forward applies it."""
        return self.weight_relax

    def defect(self) -> torch.Tensor:
        """D(B) [n_generators · O, I, k, k]: the defect under each generator, stacked (differentiable in B)."""
        return torch.cat([apply_defect(self.weight_relax, *self._defect_matrices(i), 1 if step else None)
                          for i, step in enumerate(self._generator_kinds)])

    def _library_kernel(self) -> tuple:
        if self.training:
            return self.expand_parameters()
        return self.filter, self.expanded_bias  # the library's eval-mode cache (built by its train(False))

    def forward(self, input):
        """The library's forward with kernel K + θB; in training mode with ``track_defect`` it also records the
        data-mode R_LD (one fused pass over the input)."""
        if input.type != self.in_type:
            raise ValueError(f"input field type {input.type} does not match the layer's in_type {self.in_type}")
        K, b = self._library_kernel()
        track = self.training and self.track_defect
        M, D = relaxed_conv_params(K, self.weight_relax, self.theta, *self._defect_matrices(0),
                                   self._generator_kinds[0], need_defect=track, backend=self.backend)
        if track and len(self._generator_kinds) > 1:
            D = torch.cat([D] + [apply_defect(self.weight_relax, *self._defect_matrices(i), 1 if step else None)
                                 for i, step in enumerate(self._generator_kinds) if i > 0])
        x, padding = input.tensor, self.padding
        if self.padding_mode != "zeros":
            x, padding = F.pad(x, self._reversed_padding_repeated_twice, self.padding_mode), 0
        if isinstance(padding, tuple):
            padding = padding[0] if len(set(padding)) == 1 else padding
        if self.stride == 1 and isinstance(padding, int):
            out = relaxed_conv2d(x, M, b, D if track else None, padding, backend=self.backend)
            y, r = out if track else (out, None)
        else:  # the fused op has no stride: the output and the defect responses by two convolutions
            y = F.conv2d(x, M, b, stride=self.stride, padding=padding)
            r = F.conv2d(x.detach(), D, None, stride=self.stride, padding=padding).square().sum() if track else None
        if track:
            self.last_defect = (r.to(torch.promote_types(r.dtype, torch.float32)), y.shape[0] * y.shape[2] * y.shape[3])
        return type(input)(y, self.out_type)

    def relaxation_parts(self) -> tuple:
        """(K_eq, B, P_eq B) as [O, I, k, k] kernels, P_eq the least-squares projection onto the library's basis."""
        B = self.relaxation_kernel()
        return self.expand_parameters()[0], B, _expand(self, basis_coefficients(self, B.detach()))

    @classmethod
    def from_plain(cls, layer, theta: float = 1.0, relax_init: str = "zeros", track_defect: bool = True,
                   backend: Optional[str] = None, relax_space: str = "full") -> "_RelaxedLibraryConv":
        """The relaxed twin of a library ``R2Conv`` (modules, parameters and buffers shared with ``layer``)."""
        if relax_space != "full":
            raise ValueError(f"relax_space={relax_space!r}: escnn / e2cnn convolutions are relaxed in the full space "
                             "only (the complement needs a projection onto the library's basis every step)")
        out = cls.__new__(cls)
        out.__dict__.update(layer.__dict__)
        for store in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            out.__dict__[store] = type(layer.__dict__[store])(layer.__dict__[store])
        out._setup_relaxation(theta, relax_init, track_defect, backend)
        return out

    @torch.no_grad()
    def project(self, mode: str = "drop"):
        """The library's ``R2Conv`` (its class, its state_dict layout) with θ = 0 and B removed: the same weights
        ("drop"), or with θ P_eq(B) added ("nearest": the least-squares projection onto the library's basis)."""
        check_choice(mode, PROJECTION_MODES, "mode")
        plain_class = next(c for c in type(self).__mro__ if c.__module__.split(".")[0] in LIBRARIES)
        plain = plain_class.__new__(plain_class)
        plain.__dict__.update({key: v for key, v in self.__dict__.items() if key not in self._RELAX_ATTRS})
        for store in ("_parameters", "_buffers", "_modules"):
            plain.__dict__[store] = type(self.__dict__[store])(
                (key, v) for key, v in self.__dict__[store].items()
                if key not in ("weight_relax", "theta") and not key.startswith("defect_"))
        plain._non_persistent_buffers_set = {key for key in self._non_persistent_buffers_set
                                             if not key.startswith("defect_")}
        if mode == "nearest":
            shift = self.theta * basis_coefficients(self, self.relaxation_kernel().detach())
            plain.weights = nn.Parameter(self.weights.detach() + shift.to(self.weights.dtype))
        if not plain.training:  # refresh the library's eval-mode kernel cache from the (new) weights
            plain.train(True)
            plain.train(False)
        return plain

    def export(self):
        """A plain ``torch.nn.Conv2d`` with the relaxed kernel K + θB (the library's export is of K alone)."""
        K, b = self.expand_parameters()
        M = (K + self.theta * self.weight_relax).detach()
        conv = nn.Conv2d(self.in_type.size, self.out_type.size, self.kernel_size, stride=self.stride,
                         padding=self.padding, bias=b is not None, padding_mode=self.padding_mode)
        conv.weight.data.copy_(M)
        if b is not None:
            conv.bias.data.copy_(b.detach())
        return conv.to(M.dtype).eval()

    def extra_repr(self) -> str:
        """The library's repr, plus θ and backend."""
        return (super().extra_repr() + f", theta={float(self.theta):g}, generators={len(self._generator_kinds)}, "
                f"backend={self.backend or 'auto'}")


_CLASSES: dict = {}


def _relaxed_class(plain_class: type) -> type:
    """The relaxed class for a library ``R2Conv`` class, made once, importable (pickle) as this module's
    ``Relaxed_<library>_<class>``."""
    if plain_class not in _CLASSES:
        name = f"Relaxed_{plain_class.__module__.split('.')[0]}_{plain_class.__name__}"
        cls = type(name, (_RelaxedLibraryConv, plain_class), {"__module__": __name__, "__qualname__": name})
        _CLASSES[plain_class] = cls
        globals()[name] = cls
    return _CLASSES[plain_class]


def __getattr__(name: str):
    # unpickling a relaxed layer in a fresh process: make its class on demand
    if name.startswith("PackageR2Conv_") and name.split("_", 1)[1] in LIBRARIES:
        import importlib
        importlib.import_module(f"{name.split('_', 1)[1]}.nn")
        return _adapter_class(name.split("_", 1)[1])
    if name.startswith("Relaxed_") and name.count("_") >= 2:
        library, cls_name = name.split("_", 2)[1:]
        if library in LIBRARIES:
            import importlib
            lib_nn = importlib.import_module(f"{library}.nn")
            return _relaxed_class(getattr(lib_nn, cls_name))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def relax_module(module, **relaxed_kwargs):
    """A library ``R2Conv`` → its relaxed twin (``relaxed_kwargs``: theta, relax_init, track_defect, backend,
    relax_space="full"); anything else → None."""
    if not is_library_r2conv(module):
        return None
    return _relaxed_class(type(module)).from_plain(module, **relaxed_kwargs)


# ---- swap: a library R2Conv → the package's R2Conv where the two are the same layer ----------------------------

# a library kernel space "equals" ours when every kernel of each fits the other's basis to this (relative)
_SPAN_RTOL = 1e-6


def _package_field_type(ftype, library: str):
    """The package's FieldType equal to a library field type (C_N or SO(2); trivial, irrep and regular fields, the
    same matrices checked at a generator), or None."""
    from ..steerable import FieldType
    gspace = ftype.gspace
    try:
        kind, N = _group_kind(gspace)
    except ValueError:
        return None
    if kind != "rotations":
        return None
    fields = []
    for rep in ftype.representations:
        name = rep.name
        if name == "regular" and N > 0:
            fields.append(("regular", N))
        elif name == "irrep_0":
            fields.append(("trivial", 0))
        elif name.startswith("irrep_") and name[6:].isdigit():
            fields.append(("irrep", int(name[6:])))
        else:
            return None
    try:
        ours = FieldType(N if N > 0 else None, tuple(fields))
    except ValueError:
        return None
    angle = 2 * math.pi / N if N > 0 else 0.37
    theirs = _matrix(ftype, _element(gspace.fibergroup, library, 1 if N > 0 else angle))
    return ours if torch.allclose(ours.representation(angle), theirs, atol=1e-9) else None


def to_package_conv(conv):
    """The package's :class:`~relaxeq_fast.steerable.R2Conv` computing exactly what a library ``R2Conv`` computes, or
    None where there is none. Exact means: a group and fields the package has (C_N or SO(2); trivial, irrep,
    regular), stride 1, no dilation, groups 1, zero padding, and the same kernel space. The last is measured, not
    assumed: a random kernel of each basis must fit the other's to 1e-6. It holds for e2cnn / escnn layers built
    with ``sigma=0.6, frequencies_cutoff=2.0, rings=list(range((k + 1) // 2))`` (our basis: Gaussian rings of
    width 0.6 at radii 0…(k−1)/2, frequencies up to 2r), and not for the libraries' defaults (other ring widths
    and frequency cut-offs: measured principal-angle cosines ≈ 0.96 for k = 3 and 5 on C_2, C_4, C_8)."""
    from ..steerable import R2Conv
    library = library_of(conv)
    if library is None or not is_library_r2conv(conv):
        return None
    if (conv.groups, conv.dilation, conv.stride, conv.padding_mode) != (1, 1, 1, "zeros") \
            or not isinstance(conv.padding, int):
        return None
    in_type, out_type = _package_field_type(conv.in_type, library), _package_field_type(conv.out_type, library)
    if in_type is None or out_type is None:
        return None
    like = conv.weights.detach()
    ours = R2Conv(in_type, out_type, conv.kernel_size, padding=conv.padding, bias=conv.bias is not None, dtype=_DT)
    if ours.n_basis == 0:
        return None
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        theirs_kernel = _expand(conv, torch.randn(like.numel(), generator=gen).to(like)).to(_DT)
        fit = ours.expand(ours.basis_coefficients(theirs_kernel))[0]
        ours_kernel = ours.expand(torch.randn(ours.n_basis, generator=gen, dtype=_DT))[0]
        back = _expand(conv, basis_coefficients(conv, ours_kernel.to(like))).to(_DT)
    if float((fit - theirs_kernel).norm()) > _SPAN_RTOL * float(theirs_kernel.norm()) or \
            float((back - ours_kernel).norm()) > _SPAN_RTOL * float(ours_kernel.norm()):
        return None
    with torch.no_grad():
        K, b = conv.expand_parameters()
        ours.weight.copy_(ours.basis_coefficients(K.to(_DT)))
        if b is not None:
            if ours.bias is None:
                return None
            bias = torch.linalg.lstsq(ours.bias_map, b.to(_DT)[:, None]).solution[:, 0]
            if float((ours.bias_map @ bias - b.to(_DT)).abs().max()) > 1e-9 * max(1.0, float(b.abs().max())):
                return None
            ours.bias.copy_(bias)
    return ours.to(like.device, like.dtype).train(conv.training)


class _PackageConv:
    """Mixed into a library ``EquivariantModule`` class by :func:`_adapter_class`: the package's R2Conv (``conv``,
    which :func:`relaxeq_fast.vn.relax` relaxes and ``project`` returns) inside a library model, GeometricTensor in
    and out."""

    def _init_adapter(self, conv, in_type, out_type):
        super().__init__()
        self.in_type, self.out_type, self.conv = in_type, out_type, conv

    def forward(self, input):
        """GeometricTensor [B, in_type.size, H, W] → GeometricTensor [B, out_type.size, H', W'] through ``conv``."""
        if input.type != self.in_type:
            raise ValueError(f"input field type {input.type} does not match the layer's in_type {self.in_type}")
        return type(input)(self.conv(input.tensor), self.out_type)

    def evaluate_output_shape(self, input_shape):
        """As the library's R2Conv with stride 1: (B, out_type.size, H + 2 padding − k + 1, W + ...)."""
        b, _c, h, w = input_shape
        grow = 2 * self.conv.padding - self.conv.kernel_size + 1
        return b, self.out_type.size, h + grow, w + grow


_ADAPTERS: dict = {}


def _adapter_class(library: str) -> type:
    if library not in _ADAPTERS:
        base = sys.modules[library].nn.EquivariantModule
        name = f"PackageR2Conv_{library}"
        _ADAPTERS[library] = type(name, (_PackageConv, base), {"__module__": __name__, "__qualname__": name})
        globals()[name] = _ADAPTERS[library]
    return _ADAPTERS[library]


def convert_module(module):
    """For :func:`relaxeq_fast.interop.swap`: a library ``R2Conv`` → the package's R2Conv (identical outputs, inside
    an adapter that keeps the library's GeometricTensor interface) where :func:`to_package_conv` finds an exact
    equivalent; otherwise None, and the library layer stays (:func:`relax_module` relaxes it as it is)."""
    conv = to_package_conv(module) if is_library_r2conv(module) else None
    if conv is None:
        return None
    library = library_of(module)
    adapter = _adapter_class(library).__new__(_adapter_class(library))
    adapter._init_adapter(conv, module.in_type, module.out_type)
    return adapter.train(module.training)
