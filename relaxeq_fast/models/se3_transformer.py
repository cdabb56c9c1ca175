"""se3-transformer-pytorch's SE(3)-Transformer (Fuchs et al. 2020) as an N-body position predictor, relaxed
(optional: ``pip install 'relaxeq_fast[se3t]'``).

Inputs as the EGNN / SEGNN N-body models take them: positions and velocities [B, n, 3], charges [B, n, 1]. The
library's model sees the positions as its coordinates, two type-0 channels per particle (the charge and the speed
|v|), one type-1 channel (the velocity) and the edge attribute q_i q_j on every pair (fully connected), and returns
one type-1 vector per particle: the predicted displacement, so the prediction is ``loc + out`` (translation
equivariant, and rotation equivariant with the library's model). ``relaxed=True`` relaxes every ``LinearSE3``
(self-interaction, queries, keys, values, outputs) through :func:`relaxeq_fast.vn.relax`
(:mod:`relaxeq_fast.interop.se3t`); the pairwise kernels stay exact.

The library's kernel bases are computed once per machine, with a sign that depends on torch's thread count then
(:mod:`relaxeq_fast.interop.se3t`): the model keeps the ones it was built with in its state_dict
(``library_bases``) and refuses to load weights made under others, which would compute another function.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

__all__ = ["SE3TransformerNBody"]


def _library():
    try:
        import se3_transformer_pytorch
    except ImportError:
        raise ImportError("the SE(3)-Transformer model needs se3-transformer-pytorch: pip install "
                          "'relaxeq_fast[se3t]' (or pip install se3-transformer-pytorch)") from None
    return se3_transformer_pytorch


class SE3TransformerNBody(nn.Module):
    """(loc, vel [B, n, 3], charges [B, n, 1]) → predicted positions [B, n, 3].

    Args:
        hidden: channels per degree (the library's ``dim``); heads × dim_head = hidden.
        n_layers: attention blocks (the library's ``depth``).
        heads: attention heads.
        num_degrees: feature degrees 0 … num_degrees − 1 inside the network (2: scalars and vectors).
        relaxed: relax every LinearSE3 (``relax_kwargs``: theta, relax_init, relax_space, backend).
    """

    def __init__(self, hidden: int = 16, n_layers: int = 2, heads: int = 2, num_degrees: int = 2,
                 relaxed: bool = False, **relax_kwargs):
        super().__init__()
        for name, value in (("hidden", hidden), ("n_layers", n_layers), ("heads", heads), ("num_degrees", num_degrees)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SE3TransformerNBody: {name} must be a positive int, got {value!r}")
        if hidden % heads:
            raise ValueError(f"SE3TransformerNBody: hidden ({hidden}) must be a multiple of heads ({heads})")
        if num_degrees < 2:
            raise ValueError(f"SE3TransformerNBody: num_degrees must be >= 2 (type-1 inputs and outputs), got "
                             f"{num_degrees}")
        lib = _library()
        # splits=1: the library's chunking of the pairwise kernels only slows a CPU forward down (3× measured)
        self.net = lib.SE3Transformer(dim=hidden, dim_in=(2, 1), depth=n_layers, heads=heads,
                                      dim_head=hidden // heads, input_degrees=2, num_degrees=num_degrees,
                                      output_degrees=2, reduce_dim_out=True, edge_dim=1, splits=1)
        if relaxed:
            from ..vn import relax
            relax(self.net, **relax_kwargs)
        self.num_degrees = num_degrees
        self.register_buffer("library_bases", torch.cat([q.flatten() for q in self._library_bases()[1]]))

    def _library_bases(self):
        from ..interop.se3t import library_kernel_bases
        return library_kernel_bases(self.num_degrees)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "library_bases"
        saved = state_dict.get(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if saved is None:
            if key in missing_keys:  # a checkpoint from before the bases were recorded: nothing to check against
                missing_keys.remove(key)
            warnings.warn("SE3TransformerNBody: the checkpoint does not record the library's kernel bases it was "
                          "trained with, so they cannot be checked against this machine's", RuntimeWarning)
            return
        keys, bases = self._library_bases()
        if saved.numel() != sum(q.numel() for q in bases):
            return  # a num_degrees mismatch: the size error above names it
        # float32 bases, possibly stored at half precision: a sign flip moves entries by ~0.3-1
        saved_bases = saved.detach().cpu().to(torch.float64).split([q.numel() for q in bases])
        differ = [key_ for key_, q, s in zip(keys, bases, saved_bases) if not torch.allclose(s, q.flatten(), atol=1e-2)]
        if differ:
            names = ", ".join(f"(J, d_in, d_out) = {k}" for k in differ)
            error_msgs.append(
                f"{type(self).__name__}: the weights were trained with se3-transformer-pytorch kernel bases that "
                f"differ from this machine's ({names}): they would compute another function. The library computes "
                "each basis once per machine, with a sign that depends on torch's thread count, and caches it in "
                "~/.cache.equivariant_attention (or $CACHE_PATH): load the model where that cache is the training "
                "machine's (copy its directory, or set CACHE_PATH to a copy before importing the library)")

    def forward(self, loc: torch.Tensor, vel: torch.Tensor, charges: torch.Tensor) -> torch.Tensor:
        """loc, vel [B, n, 3], charges [B, n, 1] → predicted positions [B, n, 3]."""
        if loc.dim() != 3 or loc.shape[-1] != 3 or vel.shape != loc.shape or charges.shape != (*loc.shape[:2], 1):
            raise ValueError(f"SE3TransformerNBody: loc and vel must be [B, n, 3] and charges [B, n, 1], got "
                             f"{list(loc.shape)}, {list(vel.shape)}, {list(charges.shape)}")
        feats = {"0": torch.cat([charges, vel.norm(dim=-1, keepdim=True)], -1)[..., None], "1": vel[..., None, :]}
        edges = charges[..., :, None, :] * charges[..., None, :, :]  # [B, n, n, 1]: q_i q_j
        return loc + self.net(feats, loc, edges=edges, return_type=1)
