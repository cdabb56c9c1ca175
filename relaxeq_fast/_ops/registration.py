"""The Python half of registering one relaxeq op (native or Triton): fake kernels, autograd, autocast."""
from __future__ import annotations

import torch

from .autocast import register_autocast

__all__ = ["register_op_formulas", "torch_op", "dispatcher_op"]


def register_op_formulas(qualname: str, *, fake, backward, setup_context, autocast: str,
                         backward_qualname: str | None = None, backward_fake=None):
    """Register ``fake`` (shapes for torch.compile / export), the autograd formula ``backward`` with its
    ``setup_context``, and the ``autocast`` policy (AUTOCAST_LOWER or AUTOCAST_FP32) of ``qualname``; when the
    formula calls a fused backward op ``backward_qualname``, that op's ``backward_fake`` too."""
    if (backward_qualname is None) != (backward_fake is None):
        raise ValueError(f"{qualname}: backward_qualname and backward_fake go together, got "
                         f"backward_qualname={backward_qualname!r} and backward_fake={backward_fake!r}")
    torch.library.register_fake(qualname)(fake)
    if backward_qualname is not None:
        torch.library.register_fake(backward_qualname)(backward_fake)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    register_autocast(qualname, autocast)


def torch_op(qualname: str):
    """``torch.ops.<namespace>.<name>`` for ``qualname`` ("namespace::name")."""
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name)


def dispatcher_op(qualname: str):
    """A call of the op ``qualname`` through the dispatcher, looked up at call time: an autograd formula calls its
    fused backward op this way, so torch.compile sees the op rather than its Python body."""
    return lambda *args: torch_op(qualname)(*args)
