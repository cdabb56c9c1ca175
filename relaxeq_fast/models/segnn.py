"""A relaxed steerable E(3)-equivariant graph network (SEGNN, Brandstetter et al. 2022) for N-body dynamics.

Built from e3nn building blocks (optional dependency: ``pip install 'relaxeq_fast[e3nn]'``). On the fully
connected graph of the n particles of each system (no self edges), with positions x_i, velocities v_i and
charges q_i, and Y = the real spherical harmonics of degrees 0..lmax (e3nn's ``o3.spherical_harmonics``,
``normalize=True``, ``normalization="integral"`` as the published code: Y_0 = 1/√(4π), unit-norm functions on
the sphere; with "component", √(4π) ≈ 3.5 times larger, the features grow ~30-fold per layer at e3nn's
initialisation):

    f_i = [x_i − x̄, v_i, |v_i|]                                     irreps 2x1o + 1x0e   (x̄: the system's mean)
    a_ij = Y(x_i − x_j)                                              edge attributes
    a_i = 1/(n − 1) Σ_{j≠i} a_ij + Y(v_i)                            node attributes
    h_i = L(f_i ⊗ a_i)                                               embedding → hidden irreps
    per layer:
      m_ij = G(G([h_i, h_j, |x_i − x_j|², q_i q_j] ⊗ a_ij) ⊗ a_ij)  messages
      agg_i = Σ_{j≠i} m_ij
      h_i ← h_i + L(G([h_i, agg_i] ⊗ a_i) ⊗ a_i) + P([h_i, agg_i])    (P: the relaxation below)
    x̂_i = x_i + L(G(h_i ⊗ a_i) ⊗ a_i)                                 readout → 1x1o: predicted positions

L(· ⊗ a) is a steerable layer (:class:`SteerableLayer`): e3nn's ``FullyConnectedTensorProduct(irreps_in,
irreps_attr, irreps_out)`` — every O(3)-allowed path, one learned weight per (input copy, output copy, path) —
plus a learned bias on the 0e outputs. G(· ⊗ a) (:class:`GatedSteerableLayer`) is the same layer followed
by e3nn's ``Gate``: SiLU on the 0e scalars, each l > 0 copy scaled by the sigmoid of its own extra 0e gate
scalar (which the tensor product also produces). The hidden irreps are weight balanced
(:func:`balanced_irreps`): m copies of each l = 0..lmax with parity (−1)^l, m chosen so that a steerable layer
hidden ⊗ Y → hidden has at least as many weights as a hidden_features × hidden_features linear layer.

Relaxation. Where the paper's public code puts it: every message-passing layer gets ``node_relax`` = P, a
bias-free linear map of the flattened node-update input [h_i, agg_i] (irreps hidden + hidden, e3nn's
concatenated layout, in our :class:`~relaxeq_fast.reps.Irreps` via
:func:`~relaxeq_fast.interop.e3nn.irreps_from_e3nn`) to the hidden irreps, added to the update. With
``relaxed=False`` it is an :class:`~relaxeq_fast.nn.EquivariantLinear` with zero weights (so the model starts
as exactly SEGNN, and stays E(3)-equivariant while it learns them); with ``relaxed=True`` a
:class:`~relaxeq_fast.nn.RelaxedLinear` (zero equivariant weights, ``relax_bias=False`` unless relax_kwargs say
otherwise): P(u) = W_eq u + θ W_r u with W_r [D_hidden, 2 D_hidden] free. The relaxation then sits on the one
path that carries all the node information into the next layer, breaking rotations (not translations: its
inputs are built from differences, velocities and invariants). :func:`relaxeq_fast.vn.model_regularizers`
gives the closed-form R_LD, R_N of these layers; :func:`relaxeq_fast.vn.project` replaces each RelaxedLinear by
its EquivariantLinear, and the projected state_dict loads into ``SEGNN(..., relaxed=False)``.

Differences from the published N-body SEGNN: the (zero-initialised, equivariant) ``node_relax`` map in every
layer, also in the plain model; e3nn's default initialisation of the tensor-product weights (the published
code draws its own) and e3nn's second-moment normalised activations inside ``Gate``; no normalisation layers
(the published N-body runs use none); one lmax for the hidden features and the attributes. e3nn builds its
Wigner 3j coefficients in the default dtype: :class:`SteerableLayer` recomputes them in float64 after every
cast and state_dict load, so ``model.to(torch.float64)`` is exactly equivariant to float64 rounding.

Shapes: loc, vel [B, n, 3], charges [B, n, 1] → [B, n, 3]. Internally the batch is flattened to B·n nodes and
B·n·(n − 1) directed edges (receiver i, sender j) aggregated with ``index_add_``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..nn import EquivariantLinear, RelaxedLinear
from ..reps import MAX_L

__all__ = ["SEGNN", "SEGNNLayer", "SteerableLayer", "GatedSteerableLayer", "balanced_irreps", "tp_path_count",
           "fully_connected_edges"]


def _e3nn():
    """(e3nn.o3, e3nn.nn), imported on first use so that importing relaxeq_fast works without e3nn."""
    try:
        import e3nn.nn
        import e3nn.o3
    except ImportError:
        raise ImportError("SEGNN needs e3nn: pip install 'relaxeq_fast[e3nn]'") from None
    return e3nn.o3, e3nn.nn


def tp_path_count(lmax: int) -> int:
    """Paths of a fully connected tensor product H ⊗ Y → H with H = ⊕_{l ≤ lmax} l^{(−1)^l} and Y the
    spherical harmonics up to lmax (also parity (−1)^l): triples (l1, l2, l3) in [0, lmax]³ with
    |l1 − l2| ≤ l3 ≤ l1 + l2 and l1 + l2 + l3 even (parity). With m copies of each l in H, the product has
    m² · paths weights (lmax 1, 2, 3: 4, 11, 23 paths)."""
    return sum(1 for l1 in range(lmax + 1) for l2 in range(lmax + 1) for l3 in range(lmax + 1)
               if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0)


def balanced_irreps(hidden_features: int, lmax: int) -> str:
    """Weight-balanced hidden irreps: ``"mx0e + mx1o + ... "`` (m copies of every l ≤ lmax, parity (−1)^l).

    m is the smallest multiplicity whose steerable layer hidden ⊗ Y_{≤lmax} → hidden (m² · tp_path_count(lmax)
    weights) has at least hidden_features² weights, those of a hidden_features × hidden_features linear layer
    (SEGNN's rule). E.g. (64, 1) → "32x0e + 32x1o" (4 paths, 4096 weights). The string is read by both
    ``e3nn.o3.Irreps`` and :class:`relaxeq_fast.reps.Irreps`.
    """
    if isinstance(hidden_features, bool) or not isinstance(hidden_features, int) or hidden_features < 1:
        raise ValueError(f"balanced_irreps: hidden_features must be a positive int, got {hidden_features!r}")
    if isinstance(lmax, bool) or not isinstance(lmax, int) or not 0 <= lmax <= MAX_L:
        raise ValueError(f"balanced_irreps: lmax must be an int in [0, {MAX_L}], got {lmax!r}")
    paths, target = tp_path_count(lmax), hidden_features ** 2
    m = math.isqrt(-(-target // paths))
    while m * m * paths < target:
        m += 1
    return " + ".join(f"{m}x{l}{'e' if l % 2 == 0 else 'o'}" for l in range(lmax + 1))


class SteerableLayer(nn.Module):
    """Steerable linear layer: x [N, irreps_in.dim], attr [N, irreps_attr.dim] → [N, irreps_out.dim],
    ``FullyConnectedTensorProduct(x, attr)`` plus a learned bias (zero at init) on the 0e outputs."""

    def __init__(self, irreps_in, irreps_attr, irreps_out):
        super().__init__()
        o3, _ = _e3nn()
        self.irreps_in, self.irreps_attr, self.irreps_out = (o3.Irreps(i) for i in (irreps_in, irreps_attr,
                                                                                      irreps_out))
        self.tp = o3.FullyConnectedTensorProduct(self.irreps_in, self.irreps_attr, self.irreps_out)
        scalars = [i for s, (_mul, ir) in zip(self.irreps_out.slices(), self.irreps_out)
                   if ir == o3.Irrep("0e") for i in range(s.start, s.stop)]
        self.register_buffer("bias_index", torch.tensor(scalars, dtype=torch.long), persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(scalars))) if scalars else None
        # the 3j buffers are in the state_dict: one saved in float32 must not round a float64 model's
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_wigner_3j())

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._refresh_wigner_3j()
        return self

    @torch.no_grad()
    def _refresh_wigner_3j(self):
        """e3nn computes the tensor product's Wigner 3j buffers in the default dtype when it is built, so a
        float32-built layer cast to float64 would keep float32-rounded coefficients (a relative equivariance
        error ~1e-7 from l = 2 on): after every cast and load they are recomputed from e3nn's float64 values."""
        o3, _ = _e3nn()
        for name, buf in self.tp.named_buffers():
            if "_w3j_" in name and buf.is_floating_point():
                l1, l2, l3 = (int(l) for l in name.rsplit("_w3j_", 1)[1].split("_"))
                buf.copy_(o3.wigner_3j(l1, l2, l3, dtype=torch.float64).to(buf.dtype))

    def forward(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        y = self.tp(x, attr)
        if self.bias is None:
            return y
        return y + y.new_zeros(self.irreps_out.dim).index_add(0, self.bias_index, self.bias)

    def extra_repr(self):
        return (f"{self.irreps_in} ⊗ {self.irreps_attr} -> {self.irreps_out}, "
                f"bias on {len(self.bias_index)} 0e outputs")


class GatedSteerableLayer(nn.Module):
    """A :class:`SteerableLayer` to ``irreps_out`` plus one 0e gate per l > 0 copy, then e3nn's Gate (SiLU on
    0e scalars, tanh on 0o ones, sigmoid gates). Same shapes as SteerableLayer; irreps_out must list its
    scalars first (as the hidden irreps do)."""

    def __init__(self, irreps_in, irreps_attr, irreps_out):
        super().__init__()
        o3, enn = _e3nn()
        irreps_out = o3.Irreps(irreps_out)
        scalars = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l == 0])
        gated = o3.Irreps([(mul, ir) for mul, ir in irreps_out if ir.l > 0])
        acts = [nn.functional.silu if ir.p == 1 else torch.tanh for _mul, ir in scalars]
        if gated.num_irreps:
            self.act = enn.Gate(scalars, acts, o3.Irreps(f"{gated.num_irreps}x0e"), [torch.sigmoid], gated)
        else:  # scalars only: nothing to gate
            self.act = enn.Activation(scalars, acts)
        if self.act.irreps_out.simplify() != irreps_out.simplify():
            raise ValueError(f"GatedSteerableLayer: irreps_out must list its scalars first, got {irreps_out}")
        self.irreps_out = irreps_out
        self.layer = SteerableLayer(irreps_in, irreps_attr, self.act.irreps_in)

    def forward(self, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
        return self.act(self.layer(x, attr))


class SEGNNLayer(nn.Module):
    """One SEGNN message-passing layer with its relaxation (see the module docstring).

    h [N, hidden.dim] node features, edges (receiver [E], sender [E]) node indices, edge_attr [E, attr.dim],
    node_attr [N, attr.dim], edge_scalars [E, 2] (|x_i − x_j|², q_i q_j) → h [N, hidden.dim].
    """

    def __init__(self, hidden_irreps, attr_irreps, relaxed: bool = False, **relax_kwargs):
        super().__init__()
        o3, _ = _e3nn()
        from ..interop.e3nn import irreps_from_e3nn
        hidden, attr = o3.Irreps(hidden_irreps), o3.Irreps(attr_irreps)
        self.message1 = GatedSteerableLayer(hidden + hidden + o3.Irreps("2x0e"), attr, hidden)
        self.message2 = GatedSteerableLayer(hidden, attr, hidden)
        update_in = hidden + hidden  # [h_i, agg_i], not simplified: the concatenation's layout
        self.update1 = GatedSteerableLayer(update_in, attr, hidden)
        self.update2 = SteerableLayer(hidden, attr, hidden)
        ours_in, ours_out = irreps_from_e3nn(update_in), irreps_from_e3nn(hidden)
        if relaxed:
            self.node_relax = RelaxedLinear(ours_in, ours_out, bias=False, **{"relax_bias": False, **relax_kwargs})
        else:
            self.node_relax = EquivariantLinear(ours_in, ours_out, bias=False)
        with torch.no_grad():
            for w in self.node_relax.weights:  # start as exactly SEGNN
                w.zero_()

    def forward(self, h: torch.Tensor, edges: tuple, edge_attr: torch.Tensor, node_attr: torch.Tensor,
                edge_scalars: torch.Tensor) -> torch.Tensor:
        recv, send = edges
        m = self.message1(torch.cat([h[recv], h[send], edge_scalars], -1), edge_attr)
        m = self.message2(m, edge_attr)
        agg = torch.zeros_like(h).index_add_(0, recv, m)  # Σ_j m_ij at receiver i
        u = torch.cat([h, agg], -1)
        return h + self.update2(self.update1(u, node_attr), node_attr) + self.node_relax(u)


def fully_connected_edges(batch: int, n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(receiver, sender) [batch · n · (n − 1)] node indices of the fully connected graphs (no self edges) of
    ``batch`` systems of n nodes, nodes numbered b · n + i; system-major, then receiver, then sender."""
    recv, send = torch.nonzero(~torch.eye(n, dtype=torch.bool, device=device), as_tuple=True)
    offset = torch.arange(batch, device=device)[:, None] * n
    return (recv + offset).reshape(-1), (send + offset).reshape(-1)


class SEGNN(nn.Module):
    """SEGNN for N-body prediction: (loc, vel [B, n, 3], charges [B, n, 1]) → predicted positions [B, n, 3].

    Args:
        hidden_features: width the hidden irreps are weight balanced against (:func:`balanced_irreps`; the
            paper's N-body model: 64, lmax 1 → 32x0e + 32x1o).
        lmax: largest degree of the hidden irreps and of the attributes' spherical harmonics, 1..3 (with 0 no
            path reaches the 1o output).
        n_layers: message-passing layers (the paper: 4).
        relaxed: make every layer's ``node_relax`` a RelaxedLinear (module docstring); relax_kwargs go to it
            (theta, relax_init, backend, ...).
    """

    def __init__(self, hidden_features: int = 64, lmax: int = 1, n_layers: int = 4, relaxed: bool = False,
                 **relax_kwargs):
        super().__init__()
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in (hidden_features, n_layers)):
            raise ValueError(f"SEGNN: hidden_features and n_layers must be positive ints, got {hidden_features!r}, "
                             f"{n_layers!r}")
        if isinstance(lmax, bool) or not isinstance(lmax, int) or not 1 <= lmax <= MAX_L:
            raise ValueError(f"SEGNN: lmax must be an int in [1, {MAX_L}], got {lmax!r}")
        o3, _ = _e3nn()
        self.lmax = lmax
        self.hidden_irreps = o3.Irreps(balanced_irreps(hidden_features, lmax))
        self.attr_irreps = o3.Irreps.spherical_harmonics(lmax)
        self.embedding = SteerableLayer("2x1o + 1x0e", self.attr_irreps, self.hidden_irreps)
        self.layers = nn.ModuleList([SEGNNLayer(self.hidden_irreps, self.attr_irreps, relaxed, **relax_kwargs)
                                     for _ in range(n_layers)])
        self.readout1 = GatedSteerableLayer(self.hidden_irreps, self.attr_irreps, self.hidden_irreps)
        self.readout2 = SteerableLayer(self.hidden_irreps, self.attr_irreps, "1x1o")
        self._edges: dict = {}  # (B, n, device) → edges of the last batch shape: reused across forwards

    def _edge_index(self, batch: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (batch, n, str(device))
        if key not in self._edges:
            self._edges = {key: fully_connected_edges(batch, n, device)}
        return self._edges[key]

    def attributes(self, loc: torch.Tensor, vel: torch.Tensor, edges: tuple):
        """(edge_attr [E, attr.dim], node_attr [B·n, attr.dim], edge_vectors x_i − x_j [E, 3]) of flattened
        loc, vel [B·n, 3] (module docstring)."""
        o3, _ = _e3nn()
        recv, send = edges
        rel = loc[recv] - loc[send]
        edge_attr = o3.spherical_harmonics(self.attr_irreps, rel, normalize=True, normalization="integral")
        count = torch.zeros(loc.shape[0], dtype=loc.dtype, device=loc.device).index_add_(
            0, recv, torch.ones_like(rel[:, 0])).clamp(min=1)
        node_attr = loc.new_zeros(loc.shape[0], edge_attr.shape[-1]).index_add_(0, recv, edge_attr) / count[:, None]
        node_attr = node_attr + o3.spherical_harmonics(self.attr_irreps, vel, normalize=True,
                                                       normalization="integral")
        return edge_attr, node_attr, rel

    def forward(self, loc: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor) -> torch.Tensor:
        """loc, vel [B, n, 3], charges [B, n, 1] → predicted positions [B, n, 3]."""
        if loc.dim() != 3 or loc.shape[-1] != 3 or vel.shape != loc.shape or charges.shape != (*loc.shape[:2], 1):
            raise ValueError(f"SEGNN: loc and vel must be [B, n, 3] and charges [B, n, 1], got "
                             f"{list(loc.shape)}, {list(vel.shape)}, {list(charges.shape)}")
        B, n, _ = loc.shape
        edges = self._edge_index(B, n, loc.device)
        x, v, q = loc.reshape(B * n, 3), vel.reshape(B * n, 3), charges.reshape(B * n, 1)
        edge_attr, node_attr, rel = self.attributes(x, v, edges)
        recv, send = edges
        edge_scalars = torch.cat([rel.square().sum(-1, keepdim=True), q[recv] * q[send]], -1)
        features = torch.cat([loc - loc.mean(1, keepdim=True), vel, vel.norm(dim=-1, keepdim=True)], -1)
        h = self.embedding(features.reshape(B * n, 7), node_attr)
        for layer in self.layers:
            h = layer(h, edges, edge_attr, node_attr, edge_scalars)
        out = self.readout2(self.readout1(h, node_attr), node_attr)
        return loc + out.reshape(B, n, 3)
