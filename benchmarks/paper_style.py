"""The paper's public code's way of running a relaxed layer, as bench_train_step's relaxed-paper provider.

The baseline the fused path is measured against: the equivariant map as plain channel mixing plus a dense
θ·F.linear(x, W_r, b_r), and R_LD / R_N by re-running W_r on generator-transformed stashed inputs with dense
generator matrices (no closed form, no fused statistics). bench_train_step.verify_paper checks in float64
that it computes the same loss and gradients as the fused path.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear
from relaxeq_fast.regularizer import RegularizerTerms
from relaxeq_fast.reps import VN


class PaperRelaxedLinear(EquivariantLinear):
    """A model's RelaxedLinear, run the way the paper's public code runs its relaxed layers.

    :func:`to_paper_style` swaps the class of every RelaxedLinear *instance* of one model to this one
    (``m.__class__ = PaperRelaxedLinear``): parameters, buffers (θ) and irreps stay the objects they were,
    so the model keeps its seed and weights, and no other model is affected. This class derives from
    EquivariantLinear but not from RelaxedLinear / RelaxedModule, so

    * VNLinearLeakyReLU's ``isinstance(..., RelaxedLinear)`` test fails and it runs map_to_feat and map_to_dir
      as two separate calls (as the paper code does), not as one fused call;
    * ``model_regularizers`` skips these layers: the loss uses :func:`paper_regularizers` instead.

    forward: y = the equivariant map as the plain channel mixing (an nn.Linear over C on [..., 3, C], as vnn's
    VNLinear; EquivariantLinear.forward for non-VN irreps) + θ · F.linear(x_flat, W_r, b_r), the dense
    relaxation map; the detached flattened input x̂ [N, D_in] is stashed in ``paper_input`` for the regulariser.
    Dense generator matrices A_k (input and output side, [3, D, D]) are built once, in :func:`to_paper_style`.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = self._flatten(x)
        if isinstance(self.irreps_in, VN) and isinstance(self.irreps_out, VN) and self.bias is None:
            y_eq = F.linear(x.transpose(-1, -2), self.weights[0]).transpose(-1, -2)  # [..., C_out, 3]
        else:
            y_eq = EquivariantLinear.forward(self, x)
        relax = F.linear(xf, self.weight_relax, self.bias_relax)
        if self.training:
            self.paper_input = xf.detach().reshape(-1, self.irreps_in.dim)
        return y_eq + self.theta * self._unflatten(relax)


def to_paper_style(model: torch.nn.Module) -> List[PaperRelaxedLinear]:
    """Swap every RelaxedLinear of ``model`` (in place) to :class:`PaperRelaxedLinear`; returns them in order."""
    layers = []
    for m in model.modules():
        if type(m) is RelaxedLinear:
            w = m.weight_relax
            m.paper_A_in = m.irreps_in.generator_matrices(dtype=w.dtype, device=w.device)  # [3, D_in, D_in]
            m.paper_A_out = m.irreps_out.generator_matrices(dtype=w.dtype, device=w.device)  # [3, D_out, D_out]
            m.paper_input = None
            m.__class__ = PaperRelaxedLinear
            layers.append(m)
    return layers


def paper_regularizers(layers: List[PaperRelaxedLinear]) -> List[RegularizerTerms]:
    """R_LD, R_N per layer the paper way: the relaxation map re-run on transformed stashed inputs x̂,
    L_k = W_r (A_k,in x̂) − A_k,out (W_r x̂ + b_r) (the bias enters as −A_k b_r only), R_LD = Σ_k ‖L_k‖²,
    R_N = ‖W_r x̂ + b_r‖²."""
    terms = []
    for m in layers:
        xh = m.paper_input
        r0 = F.linear(xh, m.weight_relax, m.bias_relax)
        r_ld = 0
        for k in range(3):
            lie = F.linear(xh @ m.paper_A_in[k].T, m.weight_relax) - r0 @ m.paper_A_out[k].T
            r_ld = r_ld + lie.square().sum()
        terms.append(RegularizerTerms(r_ld, r0.square().sum(), xh.shape[0]))
    return terms
