"""e3nn interop (optional: ``pip install relaxeq_fast[e3nn]``): e3nn ``o3.Linear`` ⇄ our EquivariantLinear.

``from_e3nn_linear(lin)`` gives an :class:`~relaxeq_fast.nn.EquivariantLinear` with identical outputs, which
:func:`relaxeq_fast.vn.relax` then relaxes (:func:`relaxeq_fast.interop.swap` calls it for every ``o3.Linear``
in a model);
``to_e3nn_linear(layer)`` / ``to_e3nn(model)`` go back, so a projected model leaves as a plain e3nn model whose
state_dict loads into the original architecture.

Both directions read the maps through their forward passes (the matrix of an affine map from its values at 0
and at the unit vectors), not through e3nn's weight layout, path normalisation or instruction lists: any
``o3.Linear`` with internal, shared weights converts, whatever its settings. Features are laid out as e3nn
does (blocks in order, each [mul, 2l + 1] flattened), and a linear map between them is ⊕ (w ⊗ I_{2l+1}) in
any real basis, so no basis change is involved. Parities are kept (``1x1o`` ≠ ``1x1e``); degrees above 3 are
refused (our generators, which the regulariser needs, are tabulated up to l = 3).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..nn import EquivariantLinear
from ..reps import MAX_L, Irreps

__all__ = ["from_e3nn_linear", "to_e3nn_linear", "to_e3nn", "irreps_from_e3nn", "irreps_to_e3nn", "convert_module"]


def _e3nn():
    try:
        import e3nn.o3
    except ImportError:
        raise ImportError("e3nn interop needs e3nn: pip install 'relaxeq_fast[e3nn]' (or pip install e3nn)") from None
    return e3nn.o3


def is_e3nn_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``e3nn.o3.Linear`` (checked without importing e3nn)."""
    cls = type(module)
    return cls.__name__ == "Linear" and cls.__module__.startswith("e3nn.")


def irreps_from_e3nn(irreps) -> Irreps:
    """e3nn Irreps (or its string) → ours, with parities; blocks of multiplicity 0 are dropped."""
    o3 = _e3nn()
    irreps = o3.Irreps(irreps)
    for mul, ir in irreps:
        if ir.l > MAX_L:
            raise ValueError(f"irreps {irreps}: degree l = {ir.l} is above {MAX_L}, the largest relaxeq_fast "
                             "supports (its Lie-algebra generators are tabulated up to l = 3)")
    return Irreps([(mul, ir.l, ir.p) for mul, ir in irreps if mul > 0])


def irreps_to_e3nn(irreps: Irreps):
    """Ours → e3nn Irreps. A block without a parity (an SO(3) irrep, VN features) gets the natural one,
    (−1)^l: VN vectors are e3nn's 1o."""
    o3 = _e3nn()
    return o3.Irreps([(m, (l, p if p is not None else (-1) ** l)) for (m, l), p in zip(irreps.blocks, irreps.parities)])


def _affine_map(f, d_in: int, like: torch.Tensor):
    """(A [d_out, d_in], b [d_out]) of an affine map f on [N, d_in] rows, float64."""
    with torch.no_grad():
        rows = torch.cat([like.new_zeros(1, d_in), torch.eye(d_in, dtype=like.dtype, device=like.device)])
        out = f(rows).double()
    return (out[1:] - out[:1]).T, out[0]


def _check_is(actual: torch.Tensor, expected: torch.Tensor, what: str):
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    if err > 1e-6 * scale:
        raise ValueError(f"{what} (max deviation {err:.3g})")


@torch.no_grad()
def from_e3nn_linear(lin: nn.Module) -> EquivariantLinear:
    """An EquivariantLinear computing exactly what the e3nn ``o3.Linear`` ``lin`` computes (same dtype and
    device). x [..., irreps_in.dim] → [..., irreps_out.dim]. Paths ``lin`` lacks are zero-initialised
    weights of ours (trainable, still equivariant)."""
    if not is_e3nn_linear(lin):
        raise TypeError(f"from_e3nn_linear: lin must be an e3nn.o3.Linear, got {type(lin).__name__}")
    if not (lin.internal_weights and lin.shared_weights):
        raise ValueError("from_e3nn_linear: lin must hold its own shared weights (internal_weights=True, "
                         "shared_weights=True); per-sample external weights have no EquivariantLinear equivalent")
    irreps_in, irreps_out = irreps_from_e3nn(lin.irreps_in), irreps_from_e3nn(lin.irreps_out)
    ref = lin.weight if lin.weight.numel() else torch.zeros(())
    A, b = _affine_map(lin, irreps_in.dim, ref)
    has_bias = bool(b.abs().max() > 0) or bool(getattr(lin, "bias_numel", 0))
    layer = EquivariantLinear(irreps_in, irreps_out, bias=has_bias, device=ref.device, dtype=ref.dtype)
    for w, (l, os_, om, is_, im, _oi, _ii) in zip(layer.weights, layer.layout):
        d = 2 * l + 1
        w.copy_(A[os_:os_ + om * d:d, is_:is_ + im * d:d])  # the m = 0 entry of each (out copy, in copy) pair
    _check_is(layer.equivariant_matrix().double(), A, f"from_e3nn_linear: {lin} is not ⊕ (w ⊗ I) over equal "
              "(l, parity) blocks")
    if layer.bias is not None:
        layer.bias.copy_(layer.invariant_part(b))
    _check_is(layer.equivariant_bias().double() if layer.bias is not None else b.new_zeros(b.shape), b,
              f"from_e3nn_linear: {lin} has a bias outside the invariant scalar outputs")
    return layer.train(lin.training)


@torch.no_grad()
def to_e3nn_linear(layer: EquivariantLinear):
    """The e3nn ``o3.Linear`` (every path, biases on 0e outputs when ``layer`` has a bias) computing exactly
    what ``layer`` computes. A RelaxedLinear must be projected first (:func:`relaxeq_fast.vn.project`)."""
    o3 = _e3nn()
    if type(layer) is not EquivariantLinear:
        raise TypeError(f"to_e3nn_linear: layer must be an EquivariantLinear (project a relaxed model first), got "
                        f"{type(layer).__name__}")
    if any(irreps.feature_shape != (irreps.dim,) for irreps in (layer.irreps_in, layer.irreps_out)):
        raise ValueError(f"to_e3nn_linear: {layer} takes VN features [..., C, 3]; an e3nn Linear takes flattened "
                         "[..., D] features, so it would not be a drop-in replacement")
    ref = layer.weights[0]
    reached = {oi for *_rest, oi, _ii in layer.layout}
    # e3nn 0.6's einsum optimiser fails on an output block that no path reaches (tried: torch 2.14)
    unreached = any(i not in reached for i in range(len(layer.irreps_out.blocks)))
    lin = o3.Linear(irreps_to_e3nn(layer.irreps_in), irreps_to_e3nn(layer.irreps_out),
                    biases=layer.bias is not None, _optimize_einsums=False if unreached else None
                    ).to(device=ref.device, dtype=ref.dtype)
    A, b = _affine_map(layer, layer.irreps_in.dim, ref)
    # weights by path: e3nn computes y_out[v] += path_weight · Σ_u w[u, v] x_in[u] per instruction, ours
    # y_out = (w ⊗ I) x_in with w [mul_out, mul_in]; the blocks are the same (irreps_to_e3nn keeps them)
    ours = {(oi, ii): w for w, (_l, _os, _om, _is, _im, oi, ii) in zip(layer.weights, layer.layout)}
    for k, ins in enumerate(lin.instructions):
        if ins.i_in >= 0:
            lin.weight_view_for_instruction(k).copy_(ours[(ins.i_out, ins.i_in)].T / ins.path_weight)
    bias = getattr(lin, "bias", None)
    if bias is not None and bias.numel():
        # e3nn's output at x = 0 is linear in its bias parameters: solve for them
        columns = []
        for j in range(bias.numel()):
            bias.zero_()
            bias.view(-1)[j] = 1.0
            columns.append(_affine_map(lin, layer.irreps_in.dim, ref)[1])
        bias.copy_(torch.linalg.lstsq(torch.stack(columns, 1), b[:, None]).solution[:, 0].view_as(bias))
    target = torch.cat([A.flatten(), b])
    A2, b2 = _affine_map(lin, layer.irreps_in.dim, ref)
    _check_is(torch.cat([A2.flatten(), b2]), target, f"to_e3nn_linear: {layer} cannot be written as an e3nn "
              "o3.Linear (a bias on a non-0e output?)")
    return lin.train(layer.training)


def to_e3nn(model: nn.Module) -> nn.Module:
    """Every EquivariantLinear in ``model`` (a projected model: no RelaxedLinear left) replaced by the
    equivalent e3nn ``o3.Linear``; modifies and returns ``model`` (or the replacement)."""
    from ..nn import RelaxedLinear
    from ..vn import _convert_modules
    if any(isinstance(m, RelaxedLinear) for m in model.modules()):
        raise ValueError("to_e3nn: the model still holds RelaxedLinear layers: project() it first")
    return _convert_modules(model, lambda m: to_e3nn_linear(m) if type(m) is EquivariantLinear else None)


def convert_module(module: nn.Module):
    """:func:`from_e3nn_linear` for an ``o3.Linear``, else None (the converter :func:`relaxeq_fast.interop.swap`
    applies)."""
    return from_e3nn_linear(module) if is_e3nn_linear(module) else None
