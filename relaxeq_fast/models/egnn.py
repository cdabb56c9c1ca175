"""A relaxed E(n)-equivariant graph network for N-body dynamics (Satorras et al. 2021, the velocity variant).

Per layer, on a fully connected system of n particles (positions x_i, the *input* velocities v_i — the same in
every layer, as EGNN-vel's eq. 7 and code —, node features h_i, edge attributes a_ij = q_i q_j):

    m_ij = φ_e(h_i, h_j, |x_i − x_j|², a_ij)
    agg_i = 1/(n − 1) Σ_j d_ij φ_x(m_ij)                           (a translation-invariant vector)
    u_i = Lin([agg_i, φ_v(h_i) v_i])                               (the vector channels: VN(2) → VN(1))
    x_i ← x_i + u_i,   h_i ← h_i + φ_h(h_i, Σ_j m_ij)                 (h: not in the last layer, which no output reads)

with d_ij = x_i − x_j, or with ``norm_diff=True`` d_ij = (x_i − x_j) / (|x_i − x_j| + 1) (EGNN-vel's own
``norm_diff`` option): each pair then moves x_i by at most |φ_x|, which keeps deep models finite on the rare
systems whose coordinates a layer throws far out (16 layers, issue 32).

(Before commit 'EGNN-vel reads the input velocities', each layer read the previous layer's u_i instead: a
product of φ_v over the layers, which made 16-layer models diverge.)

``Lin`` is an :class:`~relaxeq_fast.nn.EquivariantLinear` ``VN(2) → VN(1)`` with weights (1, 1) at
initialisation — then the layer is exactly EGNN's ``x_i ← x_i + φ_v(h_i) v_i + agg_i`` — and, with
``relaxed=True``, a :class:`~relaxeq_fast.nn.RelaxedLinear` that adds θ (W_r [agg_i; φ_v(h_i) v_i] + b_r),
W_r [3, 6], b_r [3]:
the relaxation acts on the vector channels of the velocity update (rotations are broken, translations are
not: every relaxed input is a difference or a velocity). Its regulariser is the closed-form R_LD, R_N of any
relaxed VN layer (:func:`relaxeq_fast.vn.model_regularizers`); :func:`relaxeq_fast.vn.project` gives the
exactly E(3)-equivariant EGNN.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import EquivariantLinear, RelaxedLinear
from ..reps import VN

__all__ = ["EGNN", "EGNNLayer"]


def _mlp(d_in: int, hidden: int, d_out: int, last_act: bool = True) -> nn.Sequential:
    layers = [nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, d_out)]
    return nn.Sequential(*layers, nn.SiLU()) if last_act else nn.Sequential(*layers)


class EGNNLayer(nn.Module):
    """One EGNN-vel layer (see the module docstring). h [B, n, H], x, v [B, n, 3] (v: the model's input
    velocities), edge_attr [B, n, n, 1] → (h, x, u): updated h and x, and the step u = x_new − x, same shapes.
    update_nodes=False: h is returned as it came (the last layer's h update reaches no output, and DDP refuses
    parameters that get no gradient). norm_diff: d_ij = (x_i − x_j) / (|x_i − x_j| + 1) in the coordinate update."""

    def __init__(self, hidden: int, relaxed: bool = False, update_nodes: bool = True, norm_diff: bool = False,
                 **relax_kwargs):
        super().__init__()
        self.norm_diff = norm_diff
        self.edge_mlp = _mlp(2 * hidden + 2, hidden, hidden)
        self.coord_mlp = _mlp(hidden, hidden, 1, last_act=False)
        self.vel_mlp = _mlp(hidden, hidden, 1, last_act=False)
        self.node_mlp = _mlp(2 * hidden, hidden, hidden, last_act=False) if update_nodes else None
        with torch.no_grad():  # small coordinate steps at the start, as EGNN (xavier gain 0.001 there)
            self.coord_mlp[-1].weight.mul_(1e-3)
            self.coord_mlp[-1].bias.zero_()
        self.vector_map = (RelaxedLinear(VN(2), VN(1), bias=False, **relax_kwargs) if relaxed
                           else EquivariantLinear(VN(2), VN(1), bias=False))
        with torch.no_grad():
            self.vector_map.weights[0].fill_(1.0)  # exactly EGNN's v ← φ_v(h) v + agg

    def forward(self, h: torch.Tensor, x: torch.Tensor, v: torch.Tensor, edge_attr: torch.Tensor):
        """h [B, n, H], x, v [B, n, 3], edge_attr [B, n, n, 1] → (updated h, updated x, the step u), same shapes."""
        n = x.shape[-2]
        diff = x[..., :, None, :] - x[..., None, :, :]  # [B, n, n, 3]: x_i − x_j
        radial = diff.square().sum(-1, keepdim=True)
        pair = torch.cat([h[..., :, None, :].expand(-1, -1, n, -1), h[..., None, :, :].expand(-1, n, -1, -1),
                          radial, edge_attr], -1)
        not_self = 1.0 - torch.eye(n, dtype=x.dtype, device=x.device)[..., None]  # no message i → i
        m = self.edge_mlp(pair) * not_self
        if self.norm_diff:  # the eps keeps the gradient finite where x_i − x_i = 0
            diff = diff / ((radial + 1e-12).sqrt() + 1.0)
        agg = (diff * self.coord_mlp(m)).sum(-2) / max(n - 1, 1)
        vectors = torch.stack([agg, self.vel_mlp(h) * v], -2)  # [B, n, 2, 3]: VN(2) channels
        step = self.vector_map(vectors)[..., 0, :]
        x = x + step
        if self.node_mlp is not None:
            h = h + self.node_mlp(torch.cat([h, m.sum(-2)], -1))
        return h, x, step


class EGNN(nn.Module):
    """EGNN-vel for N-body prediction: (loc, vel [B, n, 3], charges [B, n, 1]) → predicted positions [B, n, 3].

    Node features start from the speeds |v_i|, edge attributes are q_i q_j; ``n_layers`` layers of width
    ``hidden`` (the EGNN paper: 4 × 64). ``relaxed=True`` relaxes every layer's vector map (module docstring);
    ``norm_diff=True`` normalises the coordinate differences in every layer (module docstring); relax_kwargs go to
    :class:`~relaxeq_fast.nn.RelaxedLinear` (theta, relax_init, ...).
    """

    def __init__(self, hidden: int = 64, n_layers: int = 4, relaxed: bool = False, norm_diff: bool = False,
                 **relax_kwargs):
        super().__init__()
        if not isinstance(hidden, int) or hidden < 1 or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"EGNN: hidden and n_layers must be positive ints, got {hidden!r}, {n_layers!r}")
        self.embedding = nn.Linear(1, hidden)
        self.layers = nn.ModuleList([EGNNLayer(hidden, relaxed, update_nodes=i < n_layers - 1, norm_diff=norm_diff,
                                               **relax_kwargs) for i in range(n_layers)])

    def forward(self, loc: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor) -> torch.Tensor:
        """loc, vel [B, n, 3], charges [B, n, 1] → predicted positions [B, n, 3]."""
        if loc.dim() != 3 or loc.shape[-1] != 3 or vel.shape != loc.shape or charges.shape != (*loc.shape[:2], 1):
            raise ValueError(f"EGNN: loc and vel must be [B, n, 3] and charges [B, n, 1], got "
                             f"{list(loc.shape)}, {list(vel.shape)}, {list(charges.shape)}")
        h = self.embedding(vel.norm(dim=-1, keepdim=True))
        edge_attr = charges[..., :, None, :] * charges[..., None, :, :]
        x = loc
        for layer in self.layers:  # every layer reads the input velocities, as EGNN-vel (eq. 7 of the paper)
            h, x, _ = layer(h, x, vel, edge_attr)
        return x
