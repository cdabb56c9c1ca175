"""Models built with other libraries → our fused layers and back, one module per library:

- :mod:`.vnn`: the public Vector-Neuron code's modules (FlyingGiraffe/vnn style) → our VN layers;
- :mod:`.e3nn`: e3nn's ``o3.Linear`` ⇄ :class:`~relaxeq_fast.nn.EquivariantLinear` (optional: e3nn is imported
  only when one is met or asked for);
- :mod:`.escnn`: escnn's and e2cnn's ``R2Conv`` → relaxed twins of the library's own class (:func:`relax_module`,
  which :func:`relaxeq_fast.vn.relax` calls) and back (``project``); neither library is imported by this package;
- :mod:`.se3t`: se3-transformer-pytorch's ``LinearSE3`` → :class:`~.se3t.RelaxedLinearSE3` and back.

:func:`swap` applies every library's converter top-down; :func:`relaxeq_fast.vn.relax` then relaxes the result and
:func:`relaxeq_fast.vn.project` makes it exactly equivariant again (``e3nn.to_e3nn`` turns it back into e3nn
layers).
"""
from __future__ import annotations

from torch import nn

from . import e3nn, escnn, se3t, vnn
from .e3nn import from_e3nn_linear, irreps_from_e3nn, irreps_to_e3nn, to_e3nn, to_e3nn_linear
from .vnn import VNLayoutAdapter

__all__ = ["swap", "relax_module", "VNLayoutAdapter", "from_e3nn_linear", "to_e3nn_linear", "to_e3nn", "irreps_from_e3nn",
           "irreps_to_e3nn", "e3nn", "escnn", "se3t", "vnn"]

# each library's converter: a module → its replacement, or None (tried in this order)
CONVERTERS = (e3nn.convert_module, escnn.convert_module, vnn.convert_module)
# each library's relaxer (for relaxeq_fast.vn.relax): a module of that library → its relaxed twin, or None
RELAXERS = (escnn.relax_module, se3t.relax_module)


def relax_module(module: nn.Module, **relaxed_kwargs):
    """The relaxed twin of another library's layer (escnn / e2cnn ``R2Conv``, se3-transformer's ``LinearSE3``), or
    None."""
    for relax in RELAXERS:
        out = relax(module, **relaxed_kwargs)
        if out is not None:
            return out
    return None


def _convert(module: nn.Module):
    for convert in CONVERTERS:
        out = convert(module)
        if out is not None:
            return out
    return None


def swap(model: nn.Module) -> nn.Module:
    """Replace the modules other libraries' code builds by our fused layers, with identical outputs: modules
    written in the public VN code's style (layout [B, C, 3, N, ...], VNLinear as an nn.Linear over channels;
    :mod:`.vnn` lists them, recognised by structure) and e3nn's ``o3.Linear`` (→ EquivariantLinear;
    :func:`to_e3nn` converts a projected model back). Follow with :func:`relaxeq_fast.vn.relax` to train relaxed.
    Modifies and returns ``model`` (or the replacement when ``model`` itself is recognised).
    """
    from ..vn import _convert_modules
    return _convert_modules(model, _convert)
