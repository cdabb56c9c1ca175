"""R2Conv, the equivariance defect operator of a free kernel, and RelaxedR2Conv (K_eq + θB)."""
from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..functional import relaxed_conv2d, relaxed_conv_params
from ..nn import PROJECTION_MODES, RELAX_SPACES, RelaxedModule, check_choice, reload_float64_buffers
from ..reference import relaxed_conv_defect_ref
from ..regularizer import RegularizerTerms
from .basis import _block_layout, _check_k, _grid_points, _jmax, _polar, _psi
from .fields import FieldType, _DT, _check_field_input, _check_types, _field_lie, _rot2

__all__ = ["R2Conv", "RelaxedR2Conv", "RelaxedKernel", "apply_defect", "defect_matrices", "kernel_defect",
           "spatial_rotation_generator", "spatial_rotation_operator"]


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

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        # the exact float64 basis after .double(), not a float32-rounded one (the C_N defect is exact only on it)
        reload_float64_buffers(self, self._constants)
        self._cache = None
        return out

    @property
    def n_basis(self) -> int:
        """Number of basis kernels: the length of ``weight``."""
        return self._n_basis

    def train(self, mode: bool = True):
        """As ``nn.Module.train``; also drops the eval-mode kernel cache."""
        self._cache = None
        return super().train(mode)

    def _key(self):
        ts = [self.weight] + [getattr(self, f"block_basis_{i}") for i in range(self._n_groups)] \
            + ([self.bias] if self.bias is not None else [])
        return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in ts)

    def _groups(self):
        for i in range(self._n_groups):
            yield (getattr(self, f"block_basis_{i}"), getattr(self, f"block_gather_{i}"),
                   getattr(self, f"block_out_{i}"), getattr(self, f"block_in_{i}"))

    def expand(self, weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(kernel [out_dim, in_dim, k, k], bias [out_dim] or None), from coefficients ``weight`` [n_basis]
        (default: the layer's own), or [n_basis, k, k]: one coefficient per kernel position (RSteer's relaxed
        kernels, :class:`~relaxeq_fast.steerable.RSteerConv`)."""
        weight = self.weight if weight is None else weight
        O, I, k = self.out_type.dim, self.in_type.dim, self.kernel_size
        per_position = "pqbkl" if weight.dim() == 3 else "pqb"
        blocks = []
        for samples, gather, out_ch, in_ch in self._groups():
            blk = torch.einsum(f"{per_position},boikl->poqikl", weight[gather], samples)
            blocks.append((blk.reshape(out_ch.numel(), in_ch.numel(), k, k), out_ch, in_ch))
        if self._single_block:
            kernel = blocks[0][0]  # one kind pair in field order (e.g. regular → regular): no scatter
        else:
            kernel = weight.new_zeros(O, I, k, k)
            for blk, out_ch, in_ch in blocks:
                kernel = kernel.index_put((out_ch[:, None], in_ch[None, :]), blk)
        b = self.bias_map @ self.bias if self.bias is not None else None
        return kernel, b

    def basis_coefficients(self, K: torch.Tensor) -> torch.Tensor:
        """P_eq in coefficients: the least-squares coefficients [n_basis] of a kernel K [out_dim, in_dim, k, k]
        on the (orthonormal) steerable basis, i.e. the adjoint of :meth:`expand`; ``expand(c)[0]`` is the
        nearest equivariant kernel to K (Frobenius)."""
        k = self.kernel_size
        coef = K.new_zeros(self.n_basis)
        for samples, gather, out_ch, in_ch in self._groups():
            blk = K if self._single_block else K[out_ch[:, None], in_ch[None, :]]
            p, q, nb = gather.shape
            blk = blk.reshape(p, samples.shape[1], q, samples.shape[2], k, k)
            c = torch.einsum("poqikl,boikl->pqb", blk, samples)
            coef = coef.index_put((gather.reshape(-1),), c.reshape(-1))  # each coefficient sits in one group
        return coef

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
        """x [B, in_type.dim, H, W] → [B, out_type.dim, H + 2 padding − k + 1, W + 2 padding − k + 1]."""
        self._check_input(x)
        kernel, b = self._kernel()
        return F.conv2d(x, kernel, b, padding=self.padding)

    def extra_repr(self) -> str:
        """Dims, kernel size, padding, basis size and group, for ``repr``."""
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


def _hybrid(k: int, smooth_at: torch.Tensor, rbf_at: torch.Tensor, family: Optional[torch.Tensor] = None,
            rtol: Optional[float] = None) -> torch.Tensor:
    """Operator [k², k²]: the smooth part through ``smooth_at`` [k², n_f] (the family's transformed values), the
    residual through ``rbf_at`` [k², k²]. ``family`` [k², n_f]: the smooth family on the grid (default
    :func:`_smooth_family`; the escnn / e2cnn interop passes the library's own kernel slices), ``rtol`` the
    singular-value cut of its pseudo-inverse."""
    grid = _grid_points(k)
    E = _smooth_family(k, grid) if family is None else family
    E_pinv = torch.linalg.pinv(E, rtol=rtol) if rtol is not None else torch.linalg.pinv(E)
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
    return relaxed_conv_defect_ref(B, A_out, A_in, S, rotation_step=group is not None)


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


class RelaxedKernel(RelaxedModule):
    """The regularisers of a relaxed convolution with kernel K_eq + θB (mixin): :class:`RelaxedR2Conv` and the
    relaxed escnn / e2cnn convolutions (:mod:`relaxeq_fast.interop.escnn`) share them. The layer provides
    ``relaxation_kernel()`` (B as the forward applies it), ``defect()`` (D(B), differentiable), ``track_defect``
    and ``last_defect`` ((r, rows) of its last training forward, or None)."""

    last_defect: Optional[Tuple[torch.Tensor, int]] = None
    track_defect = True

    # (a subclass lists this mixin before its nn.Module base, so that this __getstate__ comes before Module's)
    def __getstate__(self):
        # the last defect is part of this step's autograd graph: not copied (deepcopy, pickle)
        return {**super().__getstate__(), "last_defect": None}

    def regularizers(self, mode: Optional[str] = None, data_free: bool = False) -> RegularizerTerms:
        """(R_LD, R_N, n) as :class:`RelaxedR2Conv`'s docstring defines them. ``data_free=True`` means mode
        "weight"; mode None: "data" when the layer tracks the defect in its training forwards (``track_defect``),
        else "weight"."""
        if mode is None:
            mode = "data" if self.track_defect else "weight"
        if mode not in ("data", "weight"):
            raise ValueError(f"mode must be 'data' or 'weight', got {mode!r}")
        B = self.relaxation_kernel()
        B = B.to(torch.promote_types(B.dtype, torch.float32))
        r_n = (B * B).sum()
        if data_free or mode == "weight":
            Dw = self.defect()
            return RegularizerTerms((Dw * Dw).sum().to(B.dtype), r_n, 1)
        if self.last_defect is None:
            raise RuntimeError("no data-mode defect: run a forward pass in training mode with track_defect=True "
                               "first, or use mode='weight'")
        r, rows = self.last_defect
        return RegularizerTerms(r, r_n.to(r.dtype), rows)


class RelaxedR2Conv(RelaxedKernel, R2Conv):
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
      * mode "weight" (also ``data_free=True``, and the default of a layer built with ``track_defect=False``):
        R_LD = ‖D(B)‖², n = 1.
      * R_N (the analogue of the VN layer's ‖W_r x̂ + b_r‖², the size of the θ-branch) is ‖B‖² in both
        modes: a data-mode ‖conv(x̂, B)‖² would need its own reduction, and the fused op returns one
        scalar; ‖B‖² bounds it (Young: ‖conv(x̂, B)‖ ≤ ‖B‖₁‖x̂‖) at no cost.

    Args: as R2Conv, plus ``relax_init`` ("zeros": B = 0, the relaxed layer starts equivariant;
    "default": uniform ±1/√(in_dim·k²)), ``theta``, ``track_defect`` (compute R_LD in training
    forwards), ``backend`` (for ``relaxed_conv2d``), ``relax_space`` ("full": the branch is θB, the paper's;
    "complement": θ(B − P_eq B) with P_eq the least-squares projection onto the steerable basis
    (:meth:`basis_coefficients`), folded into the coefficients so the kernel is still formed once:
    K(w − θ P_eq B) + θB; D(P_eq B) = 0, so R_LD is unchanged and R_N becomes ‖B − P_eq B‖²).

    Shapes: x [B, in_type.dim, H, W] → [B, out_type.dim, H', W'] as R2Conv; B = ``weight_relax``
    [out_type.dim, in_type.dim, k, k].
    """

    relax_space = "full"  # what layers pickled before relax_space existed read
    plain_class = R2Conv  # what project() returns

    def __init__(self, in_type: FieldType, out_type: FieldType, kernel_size: int, padding: Optional[int] = None,
                 bias: bool = True, max_frequency: Optional[int] = None, relax_init: str = "zeros",
                 theta: float = 1.0, track_defect: bool = True, backend: Optional[str] = None,
                 relax_space: str = "full", device=None, dtype=None):
        check_choice(relax_init, ("zeros", "default"), "relax_init")
        self.relax_space = check_choice(relax_space, RELAX_SPACES, "relax_space")
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

    def reset_relaxation(self):
        """Re-initialise B = ``weight_relax`` [out_dim, in_dim, k, k] per ``relax_init`` ("zeros" or "default")."""
        if self.relax_init == "zeros":
            nn.init.zeros_(self.weight_relax)
        else:
            bound = 1 / math.sqrt(self.in_type.dim * self.kernel_size ** 2)
            nn.init.uniform_(self.weight_relax, -bound, bound)

    def relaxation_kernel(self) -> torch.Tensor:
        """The branch's kernel [out_dim, in_dim, k, k] as the forward applies it (before θ): B, or B − P_eq B."""
        B = self.weight_relax
        if self.relax_space == "complement":
            B = B - self.expand(self.basis_coefficients(B))[0]
        return B

    def defect(self) -> torch.Tensor:
        """D(B) [out_dim, in_dim, k, k] (differentiable in B)."""
        return apply_defect(self.weight_relax, self.defect_out, self.defect_in, self.defect_spatial,
                            self.in_type.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, in_type.dim, H, W] → [B, out_type.dim, H', W'] (as R2Conv) with kernel K_eq + θ B; in training
        mode with ``track_defect`` it also records the data-mode R_LD for :meth:`regularizers`."""
        self._check_input(x)
        if self.relax_space == "complement":
            shift = self.basis_coefficients(self.weight_relax)  # [n_basis]; RSteer's weight also has positions
            kernel, b = self.expand(self.weight - self.theta * shift.view(-1, *[1] * (self.weight.dim() - 1)))
        else:
            kernel, b = self._kernel()
        track = self.training and self.track_defect
        # K_eq + θB and D(B) in one op (one backward op): the relaxed step's extra dispatches, not its FLOPs
        M, D = relaxed_conv_params(kernel, self.weight_relax, self.theta, self.defect_out, self.defect_in,
                                   self.defect_spatial, self.in_type.group is not None, need_defect=track,
                                   backend=self.backend)
        if track:
            y, r = relaxed_conv2d(x, M, b, D, self.padding, backend=self.backend)
            self.last_defect = (r, y.shape[0] * y.shape[2] * y.shape[3])
            return y
        return relaxed_conv2d(x, M, b, padding=self.padding, backend=self.backend)

    @classmethod
    def from_plain(cls, layer: R2Conv, **kwargs) -> "RelaxedR2Conv":
        """A relaxed twin of ``layer`` with its coefficients (outputs unchanged at θ = 0 or B = 0)."""
        out = cls(layer.in_type, layer.out_type, layer.kernel_size, layer.padding, bias=layer.bias is not None,
                  max_frequency=layer.max_frequency, device=layer.weight.device, dtype=layer.weight.dtype, **kwargs)
        out.load_state_dict(layer.state_dict(), strict=False)
        return out.train(layer.training)

    def relaxation_parts(self):
        """(K_eq, B, P_eq B) as [out_dim, in_dim, k, k] kernels; see :class:`~relaxeq_fast.nn.RelaxedModule`."""
        B = self.relaxation_kernel()
        return self.expand()[0], B, self.expand(self.basis_coefficients(B))[0]

    @torch.no_grad()
    def project(self, mode: str = "drop") -> R2Conv:
        """θ := 0 and B removed: the plain layer (``plain_class``: R2Conv, or RSteerConv for
        RelaxedRSteerConv) with the same coefficients and bias ("drop"), or with
        θ P_eq(B) folded into the coefficients ("nearest": the equivariant kernel nearest to K_eq + θB)."""
        check_choice(mode, PROJECTION_MODES, "mode")
        plain = self.plain_class(self.in_type, self.out_type, self.kernel_size, self.padding, bias=self.bias is not None,
                       max_frequency=self.max_frequency, device=self.weight.device, dtype=self.weight.dtype)
        plain.load_state_dict({k: v for k, v in self.state_dict().items()
                               if not k.startswith(("weight_relax", "theta"))})
        if mode == "nearest":  # (broadcast over the positions of RSteer's per-position coefficients)
            plain.weight.add_((self.theta * self.basis_coefficients(self.relaxation_kernel())).view(
                -1, *[1] * (plain.weight.dim() - 1)))
        return plain.train(self.training)

    def extra_repr(self) -> str:
        """As R2Conv's, plus θ and backend, for ``repr``."""
        return (super().extra_repr() + f", theta={float(self.theta):g}, relax_space={self.relax_space}, "
                f"backend={self.backend or 'auto'}")
