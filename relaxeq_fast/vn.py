"""Vector-Neuron layers (Deng et al. 2021), relaxable, in our layout: features [..., C, 3].

Leading dims are free (batch, points, neighbours...): channel mixing acts on the C dim, batch norm
takes statistics over every leading position, pooling reduces the dim just before C. The public VN
code's layout [B, C, 3, N, ...] maps to ours by moving C and the xyz dim to the end.

Every channel-mixing map is an :class:`~relaxeq_fast.nn.EquivariantLinear` (``VN(C_in) -> VN(C_out)``,
``W ⊗ I_3``), so :func:`relax` can swap it for a :class:`~relaxeq_fast.nn.RelaxedLinear` and
:func:`project` back, without the layers knowing. Where two relaxed maps read the same input
(:class:`VNLinearLeakyReLU`), they run as ONE fused call on the stacked matrices, and the one set of
input statistics serves both regularisers.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from . import functional as F
from .nn import PROJECTION_MODES, EquivariantLinear, RelaxedLinear, RelaxedModule, check_choice
from .regularizer import RegularizerTerms, grouped_relaxation_regularizers
from .reps import VN

__all__ = ["VNLinear", "VNBatchNorm", "VNLeakyReLU", "VNLinearLeakyReLU", "VNMaxPool", "vn_mean_pool",
           "VNStdFeature", "knn_indices", "graph_feature", "graph_feature_cross", "relax", "project", "relaxed_layers",
           "model_regularizers", "set_theta", "swap", "equivariance_error"]


def VNLinear(in_channels: int, out_channels: int, **kwargs) -> EquivariantLinear:
    """Channel mixing of 3-vectors, ``[..., C_in, 3] -> [..., C_out, 3]`` (no bias: it would break equivariance)."""
    return EquivariantLinear(VN(in_channels), VN(out_channels), bias=False, **kwargs)


def _check_features(x: torch.Tensor, channels: int, who: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or x.shape[-2:] != (channels, 3):
        raise ValueError(f"{who}: x must have shape [..., {channels}, 3], got {list(x.shape)}")


class VNBatchNorm(nn.Module):
    """BatchNorm on the vector norms, vectors rescaled: ``[..., C, 3] -> [..., C, 3]``.

    Statistics over every leading position (batch and points); eval mode uses the running stats.
    A batch of one vector per channel in training mode is an error (as for nn.BatchNorm1d).
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1, norm_eps: float = 1e-6,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.channels, self.eps, self.momentum, self.norm_eps = channels, eps, momentum, norm_eps
        self.weight = nn.Parameter(torch.ones(channels, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(channels, **factory))
            self.register_buffer("running_var", torch.ones(channels, **factory))
        else:
            self.running_mean = self.running_var = None
        self.stats_reducer = None  # see relaxeq_fast.distributed.sync_batch_norms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` [..., C, 3] → [..., C, 3] (batch statistics in training mode, running ones in eval)."""
        _check_features(x, self.channels, type(self).__name__)
        use_batch = self.training or self.running_mean is None
        return F.vn_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, use_batch,
                               self.momentum, self.eps, self.norm_eps, stats_reducer=self.stats_reducer)

    def extra_repr(self):
        """Channels, eps, momentum and affine, for ``repr``."""
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}"


class VNLeakyReLU(nn.Module):
    """VN leaky ReLU with a learned direction ``d = U x`` (one per channel, or shared): ``[..., C, 3]``."""

    def __init__(self, channels: int, share_nonlinearity: bool = False, negative_slope: float = 0.2,
                 eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.channels, self.negative_slope, self.eps = channels, negative_slope, eps
        self.map_to_dir = VNLinear(channels, 1 if share_nonlinearity else channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., C, 3] → [..., C, 3]: where ⟨x, d⟩ < 0 the component along d is removed (mixed by the
        slope)."""
        _check_features(x, self.channels, type(self).__name__)
        return F.vn_leaky_relu(x, self.map_to_dir(x), self.negative_slope, self.eps)

    def extra_repr(self):
        """Channels and negative slope, for ``repr``."""
        return f"{self.channels}, negative_slope={self.negative_slope}"


_separate_calls = False


@contextlib.contextmanager
def separate_relaxed_calls():
    """Inside, relaxed maps that share an input are called one by one (the same outputs), so forward hooks on
    each map see its input and output (:func:`relaxeq_fast.relaxation.layer_equivariance_errors`)."""
    global _separate_calls
    before, _separate_calls = _separate_calls, True
    try:
        yield
    finally:
        _separate_calls = before


def _joint_relaxed_forward(maps: list, x: torch.Tensor) -> list:
    """Relaxed maps reading the same input, as one fused call on their stacked effective matrices.

    The input statistics (G, s, N) of that one pass are handed to every map (one object, shared),
    so each map's regulariser is available without a second pass.
    """
    if _separate_calls:
        return [m(x) for m in maps]
    first = maps[0]
    xf = first._flatten(x)
    Ms, cs = zip(*(m.effective_params() for m in maps))
    M = torch.cat(Ms)
    c = None if all(ci is None for ci in cs) else torch.cat(
        [ci if ci is not None else M.new_zeros(Mi.shape[0]) for ci, Mi in zip(cs, Ms)])
    if first.training and all(m.track_stats for m in maps):
        y, stats = F.relaxed_linear(xf, M, c, stats=True, backend=first.backend)
        for m in maps:
            m.record_stats(stats, xf)
    else:
        y = F.relaxed_linear(xf, M, c, backend=first.backend)
    outs = y.split([Mi.shape[0] for Mi in Ms], dim=-1)
    return [m._unflatten(o) for m, o in zip(maps, outs)]


class VNLinearLeakyReLU(nn.Module):
    """VN linear → (VN batch norm) → VN leaky ReLU whose direction is a second map of the same input.

    ``p = BN(W_feat x)``, ``d = W_dir x``, ``out = vn_leaky_relu(p, d)``: ``[..., C_in, 3] -> [..., C_out, 3]``.
    When both maps are relaxed they run as one fused call sharing the input statistics.
    """

    def __init__(self, in_channels: int, out_channels: int, share_nonlinearity: bool = False,
                 use_batchnorm: bool = True, negative_slope: float = 0.2, eps: float = 1e-6, device=None,
                 dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = in_channels, out_channels
        self.negative_slope, self.eps = negative_slope, eps
        self.map_to_feat = VNLinear(in_channels, out_channels, **factory)
        self.batchnorm = VNBatchNorm(out_channels, **factory) if use_batchnorm else None
        self.map_to_dir = VNLinear(in_channels, 1 if share_nonlinearity else out_channels, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., C_in, 3] → [..., C_out, 3]."""
        _check_features(x, self.in_channels, type(self).__name__)
        if isinstance(self.map_to_feat, RelaxedLinear) and isinstance(self.map_to_dir, RelaxedLinear):
            p, d = _joint_relaxed_forward([self.map_to_feat, self.map_to_dir], x)
        else:
            p, d = self.map_to_feat(x), self.map_to_dir(x)
        if self.batchnorm is not None:
            p = self.batchnorm(p)
        return F.vn_leaky_relu(p, d, self.negative_slope, self.eps)

    def extra_repr(self):
        """In → out channels and negative slope, for ``repr``."""
        return f"{self.in_channels} -> {self.out_channels}, negative_slope={self.negative_slope}"


class VNMaxPool(nn.Module):
    """Max pooling over the dim before C, per channel, by the learned-direction dot product ⟨x, U x⟩.

    ``[..., P, C, 3] -> [..., C, 3]``. The direction map is not relaxed (:func:`relax` skips it).
    """

    relaxable = False

    def __init__(self, channels: int, device=None, dtype=None):
        super().__init__()
        self.channels = channels
        self.map_to_dir = VNLinear(channels, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., P, C, 3] → [..., C, 3]: per channel, the vector with the largest ⟨x, U x⟩ over P."""
        _check_features(x, self.channels, type(self).__name__)
        if x.dim() < 3:
            raise ValueError(f"VNMaxPool: x must have shape [..., P, C, 3] with a dim to pool, got {list(x.shape)}")
        dot = (x * self.map_to_dir(x)).sum(-1)  # [..., P, C]
        idx = dot.argmax(dim=-2, keepdim=True)  # [..., 1, C]
        return x.gather(-3, idx.unsqueeze(-1).expand(*idx.shape, 3)).squeeze(-3)


def vn_mean_pool(x: torch.Tensor) -> torch.Tensor:
    """Mean over the dim before C: ``[..., P, C, 3] -> [..., C, 3]``."""
    return x.mean(dim=-3)


class VNStdFeature(nn.Module):
    """Rotation-invariant features: project x on a learned equivariant frame z (3 vectors).

    ``x [..., C, 3] -> (x_std [..., C, 3] invariant, z [..., 3, 3] the frame, rows = frame vectors)``,
    ``x_std[c, k] = ⟨x_c, z_k⟩``. Layers as the public VN code (C → C/2 → C/4 → 3).
    """

    def __init__(self, in_channels: int, share_nonlinearity: bool = False, negative_slope: float = 0.2,
                 use_batchnorm: bool = True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.vn1 = VNLinearLeakyReLU(in_channels, in_channels // 2, share_nonlinearity, use_batchnorm,
                                     negative_slope, **factory)
        self.vn2 = VNLinearLeakyReLU(in_channels // 2, in_channels // 4, share_nonlinearity, use_batchnorm,
                                     negative_slope, **factory)
        self.vn_lin = VNLinear(in_channels // 4, 3, **factory)

    def forward(self, x: torch.Tensor):
        """``x`` [..., C, 3] → ``(x_std [..., C, 3], z [..., 3, 3])``, ``x_std = x zᵀ`` (invariant)."""
        _check_features(x, self.in_channels, type(self).__name__)
        z = self.vn_lin(self.vn2(self.vn1(x)))  # [..., 3, 3]
        return x @ z.transpose(-1, -2), z


def knn_indices(points: torch.Tensor, k: int, chunk: int = 256) -> torch.Tensor:
    """Indices of the k nearest rows (the row itself included, as in the public code).

    points: [B, P, F] → [B, P, k] (long). Distances are computed for ``chunk`` query rows at a time
    ([B, chunk, P]), never as a [B, P, P, F] difference tensor.
    """
    if points.dim() != 3:
        raise ValueError(f"knn_indices: points must have shape [B, P, F], got {list(points.shape)}")
    P = points.shape[1]
    if not isinstance(k, int) or k < 1 or k > P:
        raise ValueError(f"knn_indices: k must be an int in [1, P] = [1, {P}] (points per cloud), got {k!r}")
    # in float32 under autocast too: bfloat16 distances (3 digits) reorder near neighbours, which changes the
    # graph and so the whole gradient
    with torch.autocast(points.device.type, enabled=False):
        if points.dtype in (torch.float16, torch.bfloat16):
            points = points.float()
        sq = (points * points).sum(-1)  # [B, P]
        out = []
        for start in range(0, P, chunk):
            q = points[:, start:start + chunk]
            dist = sq[:, start:start + chunk, None] - 2 * q @ points.transpose(1, 2) + sq[:, None, :]
            out.append(dist.topk(k, dim=-1, largest=False).indices)
    return torch.cat(out, 1)


def graph_feature(x: torch.Tensor, k: int, cross: bool = False, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Edge features over k nearest neighbours: ``(x_j − x_i, x_i)``, plus ``x_j × x_i`` when ``cross``.

    x: [B, P, C, 3] → [B, P, k, 2C (or 3C), 3]. Neighbours by distance of the flattened features (C·3),
    as the public code does (for the first layer, C = 1: the coordinates). The cross product order
    x_j × x_i follows the public code, so swapped models give identical outputs.
    """
    if x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"graph_feature: x must have shape [B, P, C, 3], got {list(x.shape)}")
    B, P, C, _ = x.shape
    if idx is None:
        idx = knn_indices(x.reshape(B, P, C * 3), k)
    neighbours = x[torch.arange(B, device=x.device)[:, None, None], idx]  # [B, P, k, C, 3]
    centre = x.unsqueeze(2).expand_as(neighbours)
    parts = [neighbours - centre, centre]
    if cross:
        parts.append(torch.linalg.cross(neighbours, centre, dim=-1))
    return torch.cat(parts, dim=-2)


def graph_feature_cross(x: torch.Tensor, k: int, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`graph_feature` with the cross product: [B, P, C, 3] → [B, P, k, 3C, 3] (VN-PointNet's input)."""
    return graph_feature(x, k, cross=True, idx=idx)


# ---- whole-model relaxation ---------------------------------------------------------------------


def _convert_modules(model: nn.Module, convert) -> nn.Module:
    """``convert(m)`` applied top-down: a module it returns a replacement for is replaced (and not
    entered); otherwise its children are visited. Modules with ``relaxable = False`` (VNMaxPool) are
    left as they are, children included. Returns the (possibly replaced) ``model``."""
    if getattr(model, "relaxable", True) is False:
        return model
    new = convert(model)
    if new is not None:
        return new
    for name, child in list(model.named_children()):
        replaced = _convert_modules(child, convert)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def _relaxed_twins():
    """(plain class, relaxed class) pairs that :func:`relax` converts, subclasses before their bases."""
    from .steerable import R2Conv, RelaxedR2Conv, RelaxedRSteerConv, RSteerConv
    return ((EquivariantLinear, RelaxedLinear), (RSteerConv, RelaxedRSteerConv), (R2Conv, RelaxedR2Conv))


def relax(model: nn.Module, **relaxed_kwargs) -> nn.Module:
    """Every EquivariantLinear (→ RelaxedLinear), steerable R2Conv (→ RelaxedR2Conv; RSteerConv →
    RelaxedRSteerConv) and escnn / e2cnn ``R2Conv`` (→ its relaxed twin, :mod:`relaxeq_fast.interop.escnn`) in
    ``model`` (not under a module with ``relaxable = False``, such as VNMaxPool) is relaxed with the same weights;
    outputs unchanged at θ = 0 and at the default zero relaxation init. ``relaxed_kwargs`` go to every relaxed
    layer (theta, relax_init, relax_space, track_defect and backend are common to all). Modifies and returns
    ``model``."""
    from .interop import relax_module
    twins = _relaxed_twins()

    def convert(m):
        if isinstance(m, RelaxedModule):
            return None
        for plain, relaxed in twins:
            if isinstance(m, plain):
                return relaxed.from_plain(m, **relaxed_kwargs)
        return relax_module(m, **relaxed_kwargs)  # other libraries' layers (escnn / e2cnn R2Conv)
    return _convert_modules(model, convert)


def project(model: nn.Module, mode: str = "drop") -> nn.Module:
    """θ = 0 and the relaxation removed everywhere (RelaxedLinear → EquivariantLinear, RelaxedR2Conv →
    R2Conv). Modifies and returns ``model``; its state_dict then loads into the plain model class.

    mode: "drop" (the paper's) keeps each layer's equivariant weights; "nearest" first folds θ P_eq(W_r),
    the equivariant part of each relaxation, into them: every layer becomes the equivariant layer nearest to
    it (Frobenius), so a model projected at θ > 0 changes less. The two agree at θ = 0.
    """
    check_choice(mode, PROJECTION_MODES, "mode")
    return _convert_modules(model, lambda m: m.project(mode) if isinstance(m, RelaxedModule) else None)


def relaxed_layers(model: nn.Module) -> Iterator[RelaxedModule]:
    """Every relaxed layer of ``model`` (any :class:`~relaxeq_fast.nn.RelaxedModule`)."""
    return (m for m in model.modules() if isinstance(m, RelaxedModule))


def set_theta(model: nn.Module, value: float) -> None:
    """Set θ to ``value`` in every relaxed layer of ``model`` (in place; θ = 0: the equivariant model)."""
    for m in relaxed_layers(model):
        m.set_theta(value)


def model_regularizers(model: nn.Module, data_free: bool = False) -> list[RegularizerTerms]:
    """The regulariser terms of the model's relaxed layers, from the statistics of the last training forward.

    RelaxedLinear layers that share irreps, dtype, device and row count N (the two maps of a
    VNLinearLeakyReLU, repeated blocks) are evaluated together in one batched call and come back as one
    entry holding their sums, so the list can be shorter than the number of layers; the sums the losses use
    (:func:`combine_regularizers`, every reduction) are those of the per-layer terms. A layer without a
    relaxation bias joins a group whose other layers have one with a zero bias (its terms are unchanged):
    the paper's direction maps have none, and would otherwise double the calls.
    """
    layers = list(relaxed_layers(model))
    if data_free:
        return [m.regularizers(data_free=True) for m in layers]
    terms, groups = [], {}
    for m in layers:
        # exact class: a subclass may compute its terms differently
        if type(m) is RelaxedLinear and m.last_stats is not None:
            G = m.last_stats.G
            key = (repr(m.irreps_in), repr(m.irreps_out), G.dtype, G.device, m.last_stats.n, m.backend)
            groups.setdefault(key, []).append(m)
        else:
            terms.append(m.regularizers())
    for group in groups.values():
        if len(group) == 1:
            terms.append(group[0].regularizers())
            continue
        rows = [m.last_rows for m in group]
        W_rs, b_rs = zip(*(m.relaxation_weights() for m in group))
        if any(b is None for b in b_rs) and not all(b is None for b in b_rs):
            zero = next(b for b in b_rs if b is not None).detach().new_zeros(())
            b_rs = [zero.expand(W.shape[0]) if b is None else b for b, W in zip(b_rs, W_rs)]
        terms.append(grouped_relaxation_regularizers(
            list(W_rs), list(b_rs), group[0].irreps_in,
            group[0].irreps_out, [m.last_stats for m in group],
            rows=None if any(r is None for r in rows) else rows, backend=group[0].backend))
    return terms


def swap(model: nn.Module) -> nn.Module:
    """:func:`relaxeq_fast.interop.swap`: the public VN code's modules and e3nn's ``o3.Linear`` → our layers."""
    from .interop import swap as interop_swap
    return interop_swap(model)


@torch.no_grad()
def equivariance_error(model: nn.Module, inputs: torch.Tensor, n_rotations: int = 4, output: str = "auto",
                       seed: int = 0) -> float:
    """Worst relative error ‖f(x Rᵀ) − ρ_out(R) f(x)‖ / ‖ρ_out(R) f(x)‖ over random rotations R.

    inputs: points [B, P, 3] or VN features [..., C, 3] (xyz last; rotated as x Rᵀ).
    output: "equivariant" (f's output has xyz last and rotates the same way), "invariant" (e.g. a
    classifier's logits), or "auto" (invariant when the output's last dim is not 3; otherwise it is
    ambiguous — 3 logits or a vector — and must be named).
    The model is evaluated as it is (call ``model.eval()`` first for batch-norm running statistics).
    """
    if output not in ("auto", "equivariant", "invariant"):
        raise ValueError(f"output must be 'auto', 'equivariant' or 'invariant', got {output!r}")
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2 or inputs.shape[-1] != 3:
        raise ValueError(f"inputs must have xyz last ([B, P, 3] or [..., C, 3]), got "
                         f"{list(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__}")
    from .reps import random_rotation
    base = model(inputs)
    if output == "auto":
        if base.shape[-1] == 3:
            raise ValueError("output='auto' cannot tell whether a last dim of 3 is xyz or 3 logits: "
                             "pass output='equivariant' or output='invariant'")
        output = "invariant"
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n_rotations):
        R = random_rotation(generator=gen, dtype=inputs.dtype, device=inputs.device)
        rotated = model(inputs @ R.T)
        expected = base @ R.T if output == "equivariant" else base
        worst = max(worst, ((rotated - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)).item())
    return worst
