"""Data-parallel training that matches one process on the same global batch.

Each rank runs the model on its slice of the global batch. Two things couple the samples of a batch
and would make a rank's result depend on where the batch was split; both are reduced across ranks so
that every rank sees the statistics of the *global* batch:

* batch norm (VNBatchNorm, nn.BatchNorm1d): per-rank moments are combined into the global mean and
  biased variance with a differentiable all-reduce (Chan's parallel formula), so the gradient through
  the statistics also reaches every rank's inputs — what torch's SyncBatchNorm does on GPUs, here on
  any backend including gloo on CPU;
* the relaxation regulariser: the input statistics (G, s, N) of every relaxed layer are summed over
  ranks before the closed-form R_LD / R_N are taken. The statistics of a sum of batches are the sum of
  the statistics, so every rank then computes the regulariser of the global batch, identically, and
  DDP's gradient averaging leaves its gradient unchanged. A per-rank regulariser would be cheaper by
  one all-reduce of a few hundred kB per step, but with the paper's √(Σ R) form it is a different
  (smaller, noisier) loss than the single-process one; we chose the exact one.

G and s carry no gradient (they are statistics of detached inputs), so a plain all-reduce suffices.

Relaxed steerable convolutions have no input statistics: their data-mode regulariser
r = Σ conv2d(x̂, D(B))² is a sum over this rank's samples that carries gradient to B. It is summed over
ranks with a *differentiable* all-reduce (:func:`all_reduce_conv_defects`): every rank then holds the
global r, and the backward of the sum sends each rank the sum over ranks of d loss / d r — world × the
single-process value — times its local ∂r_k/∂B. DDP averages the B gradients (÷ world), which leaves
Σ_k ∂r_k/∂B · d loss / d r = the single-process gradient: exact, as for the batch-norm moments.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .functional import InputStats

__all__ = ["is_distributed", "rank", "world_size", "all_reduce_moments", "SyncBatchNorm1d",
           "all_reduce_input_stats", "all_reduce_conv_defects", "sync_batch_norms"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_moments(mean: torch.Tensor, var: torch.Tensor, n: int):
    """Per-rank batch moments over n rows → (global mean, global biased variance, global rows).

    Differentiable: gradients flow back to every rank's (mean, var). mean, var: [C].
    """
    if not is_distributed():
        return mean, var, n
    from torch.distributed.nn.functional import all_reduce
    total_t = torch.tensor([float(n)], dtype=torch.float64, device=mean.device)
    dist.all_reduce(total_t)
    total = int(total_t.item())
    global_mean = all_reduce(mean * (n / total))
    global_var = all_reduce((var + (mean - global_mean).square()) * (n / total))
    return global_mean, global_var, total


class SyncBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics are those of the global batch across ranks.

    Same parameters, buffers and state_dict keys as nn.BatchNorm1d; identical to it when not
    distributed or in eval mode. Input [B, C] or [B, C, L].
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        mean, var, total = all_reduce_moments(mean, var, n)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (total / max(total - 1, 1)), alpha=m)
        shape = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norms(model: nn.Module) -> nn.Module:
    """Make every batch norm of ``model`` use global-batch statistics across ranks (in place).

    nn.BatchNorm1d → :class:`SyncBatchNorm1d` (state_dict unchanged); VNBatchNorm and the steerable
    FieldBatchNorm get the moments reducer. Harmless in a single process.
    """
    from .steerable import FieldBatchNorm
    from .vn import VNBatchNorm, _convert_modules

    def convert(m):
        if isinstance(m, (VNBatchNorm, FieldBatchNorm)):
            m.stats_reducer = all_reduce_moments
            return None
        if type(m) is nn.BatchNorm1d:
            like = next(iter(m.parameters()), m.running_mean)
            out = SyncBatchNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats,
                                  device=None if like is None else like.device,
                                  dtype=None if like is None else like.dtype)
            out.load_state_dict(m.state_dict())
            return out.train(m.training)
        return None

    return _convert_modules(model, convert)


def all_reduce_input_stats(model: nn.Module) -> None:
    """Sum the (G, s, N) of every relaxed layer's last forward over ranks, in one all-reduce.

    Layers that shared one statistics object (maps fused into one call) keep sharing the reduced one.
    """
    if not is_distributed():
        return
    from .vn import relaxed_layers
    layers = [m for m in relaxed_layers(model) if getattr(m, "last_stats", None) is not None]
    unique: dict[int, InputStats] = {}
    for m in layers:
        unique.setdefault(id(m.last_stats), m.last_stats)
    if not unique:
        return
    stats = list(unique.values())
    dtype = stats[0].G.dtype
    flat = torch.cat([torch.cat([st.G.reshape(-1).to(dtype), st.s.reshape(-1).to(dtype),
                                 st.G.new_tensor([float(st.n)], dtype=dtype)]) for st in stats])
    dist.all_reduce(flat)
    reduced, offset = {}, 0
    for key, st in unique.items():
        g, d = st.G.numel(), st.s.numel()
        G = flat[offset:offset + g].view_as(st.G).to(st.G.dtype)
        s = flat[offset + g:offset + g + d].view_as(st.s).to(st.s.dtype)
        n = int(round(flat[offset + g + d].item()))
        reduced[key] = InputStats(G, s, n)
        offset += g + d + 1
    for m in layers:
        m.last_stats = reduced[id(m.last_stats)]
        m.last_rows = None  # this rank's rows only: the regulariser must use the global (G, s, N)


def all_reduce_conv_defects(model: nn.Module) -> None:
    """Sum the data-mode defect r (differentiably) and its row count of every relaxed steerable
    convolution's last forward over ranks, in one all-reduce (see the module docstring)."""
    if not is_distributed():
        return
    from torch.distributed.nn.functional import all_reduce
    from .vn import relaxed_layers
    layers = [m for m in relaxed_layers(model) if getattr(m, "last_defect", None) is not None]
    if not layers:
        return
    r = torch.stack([m.last_defect[0].to(torch.float64) for m in layers])
    rows = torch.tensor([float(m.last_defect[1]) for m in layers], dtype=torch.float64, device=r.device)
    reduced = all_reduce(torch.cat([r, rows]))
    for i, m in enumerate(layers):
        m.last_defect = (reduced[i].to(m.last_defect[0].dtype), int(round(reduced[len(layers) + i].item())))
