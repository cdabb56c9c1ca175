"""torch.library glue: load the compiled kernels, register fake, autograd and autocast formulas.

The schemas live in csrc/registration.cpp (native ops, ``torch.ops.relaxeq.*``). The Triton implementations are
their own ops (``relaxeq::<op>_triton``), registered from ``relaxeq_fast.triton_kernels.<op>`` on first use.
Native and Triton ops share the argument checks, fake and autograd formulas of ``relaxeq_fast._ops.<op>`` (one
module per op; ``autocast`` holds the autocast rules), all re-exported here; this module loads the extension and
registers the native ops.
"""
from __future__ import annotations

import functools
import warnings

import torch


REINSTALL_HINT = "pip install --no-build-isolation -e ."


def built_for_torch():
    """The torch version the extension was compiled against (setup.py writes it to relaxeq_fast/_build.py),
    or None for a build that did not record it."""
    try:
        from .._build import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def torch_mismatch(built, running: str):
    """Why an extension built against torch ``built`` must not be loaded into torch ``running`` (its C++ ABI
    is torch's), or None when they match or the build did not record its version."""
    if built is None or built == running:
        return None
    return (f"relaxeq_fast._C was built against torch {built}, but this is torch {running}: its C++ ABI is "
            f"torch's, so it is not loaded; rebuild against this torch with: {REINSTALL_HINT}")


def _load_extension():
    mismatch = torch_mismatch(built_for_torch(), torch.__version__)
    if mismatch is not None:
        return False, ImportError(mismatch)
    try:
        from .. import _C  # noqa: F401  (loads the library; its registrars define torch.ops.relaxeq.*)
    except ImportError as e:  # pragma: no cover - exercised by the fallback test in a subprocess
        return False, e
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()

_warned = False


def warn_missing_extension_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"relaxeq_fast: the compiled extension relaxeq_fast._C is not available ({EXTENSION_ERROR}); "
            f"falling back to the pure-PyTorch reference. Reinstall with: {REINSTALL_HINT}",
            RuntimeWarning, stacklevel=3)


# after the extension: the op modules need nothing from it, the registrations below do
from . import (autocast, checks, registration, relaxed_linear, relaxed_conv2d, vn_leaky_relu, vn_batch_norm,
               relaxation_regularizer, relaxed_params, relaxed_conv_params)

# re-exported (each module's __all__): the functional layer, backend, doctor, the Triton ops and the tests use
# _ops.<name>
_REEXPORTED_MODULES = (autocast, checks, registration, relaxed_linear, relaxed_conv2d, vn_leaky_relu, vn_batch_norm,
                       relaxation_regularizer, relaxed_params, relaxed_conv_params)
for _module in _REEXPORTED_MODULES:
    globals().update({_name: getattr(_module, _name) for _name in _module.__all__})
__all__ = [_name for _module in _REEXPORTED_MODULES for _name in _module.__all__] + [
    "EXTENSION_LOADED", "EXTENSION_ERROR", "REINSTALL_HINT", "built_for_torch", "torch_mismatch",
    "warn_missing_extension_once", "native_build_info"]

if EXTENSION_LOADED:
    relaxed_linear.register_relaxed_linear_op("relaxeq::relaxed_linear", "relaxeq::relaxed_linear_backward")
    vn_leaky_relu.register_vn_leaky_relu_op("relaxeq::vn_leaky_relu", "relaxeq::vn_leaky_relu_backward")
    relaxed_conv2d.register_relaxed_conv2d_op("relaxeq::relaxed_conv2d", "relaxeq::relaxed_conv2d_backward")
    vn_batch_norm.register_vn_batch_norm_ops("relaxeq::vn_norm_stats", "relaxeq::vn_batch_norm_apply",
                                             "relaxeq::vn_batch_norm_apply_backward")
    relaxation_regularizer.register_relaxation_regularizer_op("relaxeq::relaxation_regularizer",
                                                              "relaxeq::relaxation_regularizer_backward")
    # the parameter-algebra ops (written once in ATen calls, CPU and CUDA)
    relaxed_params.register_relaxed_params_op("relaxeq::relaxed_params", "relaxeq::relaxed_params_backward")
    relaxed_conv_params.register_relaxed_conv_params_op("relaxeq::relaxed_conv_params",
                                                        "relaxeq::relaxed_conv_params_backward")


@functools.cache  # the loaded build does not change within a process
def native_build_info() -> dict:
    if not EXTENSION_LOADED:
        return {"cpu": False, "cuda": False, "error": str(EXTENSION_ERROR)}
    info = {}
    for line in torch.ops.relaxeq.build_info().splitlines():
        key, _, value = line.partition("=")
        info[key] = value
    return {"cpu": info.get("cpu") == "1", "cuda": info.get("cuda") == "1",
            "cuda_archs": [a for a in info.get("cuda_archs", "").split(";") if a],
            "openmp": info.get("openmp") == "1", "compiler": info.get("compiler", "")}
