"""nn.Modules: the plain equivariant linear layer and its relaxed twin."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from . import functional as F
from .regularizer import RegularizerTerms, relaxation_regularizers
from .reps import VN, Irreps

__all__ = ["EquivariantLinear", "RelaxedLinear", "RelaxedModule", "RELAX_SPACES", "PROJECTION_MODES",
           "intertwiner_coefficients"]

# "full": the paper's free W_r; "complement": W_r − P_eq W_r, the part that projection removes.
RELAX_SPACES = ("full", "complement")
# "drop": θ := 0 and W_r removed (the paper's); "nearest": θ·P_eq(W_r) folded into the equivariant weights.
PROJECTION_MODES = ("drop", "nearest")


def check_choice(value, choices, name: str, error: type = ValueError):
    """``value`` if it is one of ``choices``, else ``error`` (a ValueError subclass) naming ``name``."""
    if value not in choices:
        raise error(f"{name} must be one of {list(choices)}, got {value!r}")
    return value


def reload_float64_buffers(module: nn.Module, constants: dict) -> None:
    """Set each non-persistent buffer ``name`` of ``module`` from its float64 original ``constants[name]``, in the
    buffer's current dtype and device (a buffer that is None stays None). Called after ``_apply``: ``.double()`` of
    a float32 layer then holds the exact float64 constants, not float32-rounded ones."""
    for name, t in constants.items():
        old = getattr(module, name)
        if old is not None:
            setattr(module, name, t.to(old.device, old.dtype).clone())


def intertwiner_coefficients(W: torch.Tensor, layout) -> list[torch.Tensor]:
    """The orthogonal (Frobenius) projection of W [..., D_out, D_in] onto the equivariant maps of ``layout``
    (:meth:`Irreps.equivariant_layout`), as the channel mixings [..., out_mul, in_mul] per layout entry.

    Schur: an equivariant map is ``w ⊗ I_{2l+1}`` on each connected block pair and 0 elsewhere, and the
    nearest ``w ⊗ I_d`` to a block X is the one with ``w_ij = tr(X_ij) / d`` (X_ij the d×d sub-block).
    """
    out = []
    for (l, os_, om, is_, im, _oi, _ii) in layout:
        d = 2 * l + 1
        blk = W[..., os_:os_ + om * d, is_:is_ + im * d].unflatten(-1, (im, d)).unflatten(-3, (om, d))
        out.append(blk.diagonal(dim1=-3, dim2=-1).sum(-1) / d)  # [..., om, im]
    return out


def _as_irreps(rep, name) -> Irreps:
    if isinstance(rep, Irreps):
        return rep
    if isinstance(rep, str):
        return Irreps(rep)
    raise TypeError(f"{name} must be an Irreps/VN or an irreps string like '4x0+2x1', got {type(rep).__name__}")


class RelaxedModule:
    """The protocol every relaxed layer follows (mixin; :mod:`relaxeq_fast.vn` drives layers through it).

    A relaxed layer holds a θ buffer ``theta`` and provides ``set_theta(value)``,
    ``regularizers(data_free=False) -> RegularizerTerms`` (R_LD, R_N, n of its last training forward,
    or data-free / weight-mode), ``project()`` (the plain equivariant layer with the same weights) and
    the classmethod ``from_plain(layer, **kwargs)``. Implemented by :class:`RelaxedLinear` and
    :class:`relaxeq_fast.steerable.RelaxedR2Conv`.
    """

    theta: torch.Tensor

    @torch.no_grad()
    def set_theta(self, value: float):
        """Set the θ buffer (a 0-d tensor) to ``value`` in place."""
        self.theta.fill_(float(value))

    def regularizers(self, data_free: bool = False) -> RegularizerTerms:
        """R_LD, R_N (0-d tensors) and the row count n of the last training forward (``data_free``: without data)."""
        raise NotImplementedError

    def project(self, mode: str = "drop") -> nn.Module:
        """The plain equivariant layer (θ = 0, relaxation removed): "drop" keeps the equivariant weights,
        "nearest" folds the relaxation's equivariant part θ P_eq(W_r) into them."""
        raise NotImplementedError

    def relaxation_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_eq, W, P_eq W): the equivariant weight, the relaxation weight as the forward applies it (W_r, or its
        complement) and its equivariant part, as matrices [D_out, D_in] or kernels [O, I, k, k]."""
        raise NotImplementedError


class EquivariantLinear(nn.Module):
    """Equivariant linear map between representations: ``W_eq = ⊕_l (W_l ⊗ I_{2l+1})`` placed by block.

    For VN features (``VN(C_in) -> VN(C_out)``) this is ``W ⊗ I_3``: channel mixing of 3-vectors.
    A bias is allowed on invariant scalar outputs only (l = 0, not odd parity).

    Shapes: x [..., *irreps_in.feature_shape] → y [..., *irreps_out.feature_shape]
    (e.g. [B, N, C_in, 3] → [B, N, C_out, 3] for VN, [..., D_in] → [..., D_out] for irreps).
    """

    def __init__(self, irreps_in, irreps_out, bias: bool = True, device=None, dtype=None):
        super().__init__()
        self.irreps_in = _as_irreps(irreps_in, "irreps_in")
        self.irreps_out = _as_irreps(irreps_out, "irreps_out")
        self.layout = self.irreps_in.equivariant_layout(self.irreps_out)
        if not self.layout:
            raise ValueError(f"no equivariant linear map {self.irreps_in} -> {self.irreps_out}: they share no degree l")
        factory = {"device": device, "dtype": dtype}
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(om, im, **factory)) for (_l, _os, om, _is, im, _oi, _ii) in self.layout])
        self.n_scalar_out = sum(m for i, (m, _l) in enumerate(self.irreps_out.blocks)
                                if self.irreps_out.is_invariant(i))
        self.bias = nn.Parameter(torch.empty(self.n_scalar_out, **factory)) if bias and self.n_scalar_out else None
        self.reset_parameters()

    def reset_parameters(self):
        """Re-initialise the weights (and bias) as nn.Linear does, fan-in counted per output block."""
        # nn.Linear's default, with fan-in counted in multiplicities feeding each output block.
        fan_in = {}
        for (_l, _os, _om, _is, im, oi, _ii) in self.layout:
            fan_in[oi] = fan_in.get(oi, 0) + im
        for w, (_l, _os, _om, _is, _im, oi, _ii) in zip(self.weights, self.layout):
            bound = 1 / math.sqrt(fan_in[oi])
            nn.init.uniform_(w, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -1 / math.sqrt(self.irreps_in.dim), 1 / math.sqrt(self.irreps_in.dim))

    def single_block_dim(self) -> Optional[int]:
        """d when W_eq is one channel mixing repeated over a d-dim representation, W_eq = weights[0] ⊗ I_d
        (VN features: 3; scalars: 1); None for a layout of several blocks."""
        w0 = self.weights[0]
        if len(self.layout) == 1 and self.layout[0][1] == 0 and self.layout[0][3] == 0:
            d = 2 * self.layout[0][0] + 1
            if self.irreps_in.dim == w0.shape[1] * d and self.irreps_out.dim == w0.shape[0] * d:
                return d
        return None

    def equivariant_matrix(self, weights=None) -> torch.Tensor:
        """W_eq: [D_out, D_in], from ``weights`` (one [out_mul, in_mul] per layout entry) or the layer's own."""
        weights = list(self.weights) if weights is None else weights
        w0 = weights[0]
        d = self.single_block_dim()
        if d is not None:
            return torch.kron(w0, torch.eye(d, dtype=w0.dtype, device=w0.device))
        W = w0.new_zeros(self.irreps_out.dim, self.irreps_in.dim)
        for w, (l, os_, om, is_, im, _oi, _ii) in zip(weights, self.layout):
            d = 2 * l + 1
            W[os_:os_ + om * d, is_:is_ + im * d] = torch.kron(w, torch.eye(d, dtype=w.dtype, device=w.device))
        return W

    def equivariant_bias(self, bias=None) -> Optional[torch.Tensor]:
        """b_eq: [D_out] (nonzero on scalar outputs only) or None, from ``bias`` [n_scalar_out] or the layer's."""
        bias = self.bias if bias is None else bias
        if bias is None:
            return None
        parts, k = [], 0
        for i, (start, stop, m, _l) in enumerate(self.irreps_out.slices()):
            if self.irreps_out.is_invariant(i):
                parts.append(bias[k:k + m])
                k += m
            else:
                parts.append(bias.new_zeros(stop - start))
        return torch.cat(parts)

    def invariant_part(self, b: torch.Tensor) -> torch.Tensor:
        """The entries [..., n_scalar_out] of a flat output vector b [..., D_out] that the bias can reach."""
        parts = [b[..., start:stop] for i, (start, stop, _m, _l) in enumerate(self.irreps_out.slices())
                 if self.irreps_out.is_invariant(i)]
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def equivariant_projection(self, W: torch.Tensor, b: Optional[torch.Tensor] = None):
        """P_eq: the nearest (Frobenius) parameters of this plain layer to a free affine map.

        W: [D_out, D_in]; b: [D_out] or None. Returns (weights: one [out_mul, in_mul] per layout entry,
        bias: [n_scalar_out] or None). The bias part keeps b's scalar outputs when the layer has a bias,
        and nothing otherwise (the plain layer cannot represent it). ``equivariant_matrix(weights)`` is P_eq W.
        """
        weights = intertwiner_coefficients(W, self.layout)
        bias = self.invariant_part(b) if (b is not None and self.bias is not None) else None
        return weights, bias

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        fs = self.irreps_in.feature_shape
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < len(fs) or tuple(x.shape[x.dim() - len(fs):]) != fs:
            raise ValueError(f"x must have shape [..., {', '.join(map(str, fs))}] for {self.irreps_in}, "
                             f"got {list(x.shape)}")
        return x.reshape(*x.shape[:x.dim() - len(fs)], self.irreps_in.dim)

    def _unflatten(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(*y.shape[:-1], *self.irreps_out.feature_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., *irreps_in.feature_shape] → [..., *irreps_out.feature_shape]."""
        y = self._flatten(x) @ self.equivariant_matrix().T
        b = self.equivariant_bias()
        return self._unflatten(y if b is None else y + b)

    def extra_repr(self):
        """Irreps in → out and bias, for ``repr``."""
        return f"{self.irreps_in} -> {self.irreps_out}, bias={self.bias is not None}"


class RelaxedLinear(EquivariantLinear, RelaxedModule):
    """Equivariant linear layer plus a relaxation branch: ``f(x) = W_eq x + b_eq + θ (W_r x + b_r)``.

    The forward is one fused op on ``M = W_eq + θ W_r`` which, in training mode, also returns the
    input statistics (G, s, N) of this batch; :meth:`regularizers` turns them into R_LD and R_N in
    closed form. θ is a buffer set from outside (:meth:`set_theta`); at θ = 0 the layer computes
    exactly the equivariant map, and :meth:`project` returns the plain :class:`EquivariantLinear`.

    Args:
        irreps_in, irreps_out: :class:`~relaxeq_fast.reps.Irreps` / :class:`~relaxeq_fast.reps.VN`, or strings.
        bias: equivariant bias on scalar outputs.
        relax_bias: include the free relaxation bias b_r.
        relax_init: "zeros" (W_r = 0, b_r = 0: the relaxed model starts equivariant) or "default"
            (nn.Linear's init for W_r).
        relax_space: "full" (the paper's: the branch is θ (W_r x + b_r)) or "complement": the branch is
            θ ((W_r − P_eq W_r) x + b_r − P_eq b_r), with P_eq the orthogonal projection onto this layer's
            equivariant maps (:meth:`equivariant_projection`), so the relaxation holds only what projection
            removes and R_N measures exactly that. Folded into the one fused forward: M = W_eq(w − θ P_eq W_r)
            + θ W_r.
        theta: initial θ.
        track_stats: collect (G, s, N) in training mode (needed by the data regularisers).
        backend: kernel backend for the fused op (see :mod:`relaxeq_fast.backend`); None = context/env/auto.

    Shapes: x [..., *irreps_in.feature_shape] → y [..., *irreps_out.feature_shape].
    """

    relax_space = "full"  # what layers pickled before relax_space existed read

    def __init__(self, irreps_in, irreps_out, bias: bool = True, relax_bias: bool = True,
                 relax_init: str = "zeros", theta: float = 1.0, track_stats: bool = True,
                 backend: Optional[str] = None, relax_space: str = "full", device=None, dtype=None):
        self.relax_init = check_choice(relax_init, ("zeros", "default"), "relax_init")
        self.relax_space = check_choice(relax_space, RELAX_SPACES, "relax_space")
        super().__init__(irreps_in, irreps_out, bias=bias, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.weight_relax = nn.Parameter(torch.empty(self.irreps_out.dim, self.irreps_in.dim, **factory))
        self.bias_relax = nn.Parameter(torch.empty(self.irreps_out.dim, **factory)) if relax_bias else None
        self.register_buffer("theta", torch.tensor(float(theta), **factory))
        self.track_stats = track_stats
        self.backend = backend
        self.last_stats: Optional[F.InputStats] = None
        # The input rows themselves when there are fewer than D_in of them (see record_stats).
        self.last_rows: Optional[torch.Tensor] = None
        self.reset_relaxation()

    def reset_relaxation(self):
        """Re-initialise W_r [D_out, D_in] per ``relax_init`` ("zeros" or "default") and b_r [D_out] to 0."""
        if self.relax_init == "zeros":
            nn.init.zeros_(self.weight_relax)
        else:
            bound = 1 / math.sqrt(self.irreps_in.dim)
            nn.init.uniform_(self.weight_relax, -bound, bound)
        if self.bias_relax is not None:
            nn.init.zeros_(self.bias_relax)

    def relaxation_weights(self):
        """(W, b): the relaxation branch's matrix [D_out, D_in] and bias [D_out] or None as the forward
        applies them (before θ): (W_r, b_r), or their complements (W_r − P_eq W_r, b_r − P_eq b_r)."""
        W, b = self.weight_relax, self.bias_relax
        if self.relax_space == "full":
            return W, b
        weights, bias = self.equivariant_projection(W, b)
        W = W - self.equivariant_matrix(weights)
        if bias is not None:
            b = b - self.equivariant_bias(bias)
        return W, b

    def _shifted_equivariant_params(self):
        """The equivariant weights and bias the forward uses: the layer's own, or with the complement
        (W_eq + θ(W_r − P_eq W_r) = W_eq(w − θ P_eq W_r) + θ W_r) θ P_eq(W_r, b_r) taken off them."""
        weights, bias = list(self.weights), self.bias
        if self.relax_space == "complement":
            proj_w, proj_b = self.equivariant_projection(self.weight_relax, self.bias_relax)
            weights = [w - self.theta * p for w, p in zip(weights, proj_w)]
            if proj_b is not None:
                bias = bias - self.theta * proj_b
        return weights, bias

    def effective_params(self):
        """(M, c) = (W_eq + θ W, b_eq + θ b) with (W, b) = :meth:`relaxation_weights`: [D_out, D_in],
        [D_out] or None."""
        weights, bias = self._shifted_equivariant_params()
        if self.single_block_dim() is not None:  # VN and scalar layers: one op, forward and backward
            return F.relaxed_params(weights[0], self.weight_relax, self.equivariant_bias(bias), self.bias_relax,
                                    self.theta, backend=self.backend)
        M = self.equivariant_matrix(weights) + self.theta * self.weight_relax
        c = self.equivariant_bias(bias)
        if self.bias_relax is not None:
            c = self.theta * self.bias_relax if c is None else c + self.theta * self.bias_relax
        return M, c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., *irreps_in.feature_shape] → [..., *irreps_out.feature_shape]; in training mode with
        ``track_stats`` it also records the input statistics for :meth:`regularizers`."""
        xf = self._flatten(x)
        M, c = self.effective_params()
        if self.training and self.track_stats:
            y, stats = F.relaxed_linear(xf, M, c, stats=True, backend=self.backend)
            self.record_stats(stats, xf)
        else:
            y = F.relaxed_linear(xf, M, c, backend=self.backend)
        return self._unflatten(y)

    def record_stats(self, stats: F.InputStats, xf: torch.Tensor) -> None:
        """Keep a training forward's input statistics, and its detached input rows [N, D_in] when N < D_in:
        then evaluating the regularisers on the rows (O(N D_in D_out)) beats the closed form on G
        (O(D_in² D_out)); the rows are the op's saved input, so keeping them costs no memory."""
        self.last_stats = stats
        self.last_rows = xf.detach().reshape(-1, self.irreps_in.dim) if stats.n < self.irreps_in.dim else None

    def regularizers(self, data_free: bool = False) -> RegularizerTerms:
        """(R_LD, R_N, N) from the statistics of the last training forward (or data-free: G = I, s = 0)."""
        if not data_free and self.last_stats is None:
            raise RuntimeError("no input statistics: run a forward pass in training mode with track_stats=True "
                               "first, or pass data_free=True")
        W, b = self.relaxation_weights()
        return relaxation_regularizers(W, b, self.irreps_in, self.irreps_out,
                                       None if data_free else self.last_stats,
                                       rows=None if data_free else self.last_rows, backend=self.backend)

    @classmethod
    def from_plain(cls, layer: EquivariantLinear, **kwargs) -> "RelaxedLinear":
        """A relaxed twin of ``layer`` with its weights (outputs unchanged at θ = 0 or W_r = b_r = 0)."""
        ref = layer.weights[0]
        out = cls(layer.irreps_in, layer.irreps_out, bias=layer.bias is not None, device=ref.device,
                  dtype=ref.dtype, **kwargs)
        out.load_state_dict(layer.state_dict(), strict=False)
        return out

    def relaxation_parts(self):
        """(W_eq, W, P_eq W) as [D_out, D_in] matrices; see :class:`RelaxedModule`."""
        W = self.relaxation_weights()[0]
        return self.equivariant_matrix(), W, self.equivariant_matrix(intertwiner_coefficients(W, self.layout))

    @torch.no_grad()
    def project(self, mode: str = "drop") -> EquivariantLinear:
        """The plain equivariant layer: θ := 0 and the relaxation removed.

        mode: "drop" keeps the equivariant weights as they are (the paper's); "nearest" folds the relaxation's
        equivariant part θ P_eq(W, b) into them, giving the plain layer nearest (Frobenius, in (M, c)) to the
        relaxed one — the same as "drop" at θ = 0 or with relax_space="complement".
        """
        check_choice(mode, PROJECTION_MODES, "mode")
        ref = self.weights[0]
        plain = EquivariantLinear(self.irreps_in, self.irreps_out, bias=self.bias is not None,
                                  device=ref.device, dtype=ref.dtype)
        state = {k: v for k, v in self.state_dict().items()
                 if not k.startswith(("weight_relax", "bias_relax", "theta"))}
        plain.load_state_dict(state)
        if mode == "nearest":
            proj_w, proj_b = self.equivariant_projection(*self.relaxation_weights())
            for w, p in zip(plain.weights, proj_w):
                w.add_(self.theta * p)
            if proj_b is not None:
                plain.bias.add_(self.theta * proj_b)
        return plain.train(self.training)

    def extra_repr(self):
        """As EquivariantLinear's, plus relax_bias, θ and backend, for ``repr``."""
        return (super().extra_repr() + f", relax_bias={self.bias_relax is not None}, "
                f"theta={float(self.theta):g}, relax_space={self.relax_space}, backend={self.backend or 'auto'}")
