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
from .autocast import AUTOCAST_LOWER, AUTOCAST_FP32, autocast_inputs, register_autocast
from .checks import check_matches_x
from .relaxed_linear import (check_relaxed_linear_args, check_relaxed_linear_backward_args, make_backward,
                             register_relaxed_linear_op)
from .relaxed_conv2d import (check_relaxed_conv2d_args, conv2d_out_shape, check_relaxed_conv2d_backward_args,
                             make_relaxed_conv2d_backward, register_relaxed_conv2d_op)
from .vn_leaky_relu import (check_vn_leaky_relu_args, check_vn_leaky_relu_backward_args, make_vn_leaky_relu_backward,
                            register_vn_leaky_relu_op)
from .vn_batch_norm import (check_vn_features, check_vn_batch_norm_apply_args, check_vn_batch_norm_apply_backward_args,
                            vn_norm_stats_backward_formula, make_vn_batch_norm_apply_backward,
                            register_vn_batch_norm_ops)
from .relaxation_regularizer import (check_relaxation_regularizer_args, make_relaxation_regularizer_backward,
                                     register_relaxation_regularizer_op)
from .relaxed_params import (check_relaxed_params_args, make_relaxed_params_backward, _relaxed_params_fake,
                             _relaxed_params_backward_fake, _relaxed_params_setup_context)
from .relaxed_conv_params import (check_relaxed_conv_params_args, make_relaxed_conv_params_backward,
                                  _relaxed_conv_params_fake, _relaxed_conv_params_backward_fake,
                                  _relaxed_conv_params_setup_context)


# re-exported: the functional layer, backend, doctor, the Triton ops and the tests use _ops.<name>
__all__ = [
    "AUTOCAST_LOWER", "AUTOCAST_FP32", "autocast_inputs", "register_autocast", "check_matches_x",
    "check_relaxed_linear_args", "check_relaxed_linear_backward_args", "make_backward", "register_relaxed_linear_op",
    "check_relaxed_conv2d_args", "conv2d_out_shape", "check_relaxed_conv2d_backward_args",
    "make_relaxed_conv2d_backward", "register_relaxed_conv2d_op", "check_vn_leaky_relu_args",
    "check_vn_leaky_relu_backward_args", "make_vn_leaky_relu_backward", "register_vn_leaky_relu_op",
    "check_vn_features", "check_vn_batch_norm_apply_args", "check_vn_batch_norm_apply_backward_args",
    "vn_norm_stats_backward_formula", "make_vn_batch_norm_apply_backward", "register_vn_batch_norm_ops",
    "check_relaxation_regularizer_args", "make_relaxation_regularizer_backward",
    "register_relaxation_regularizer_op", "check_relaxed_params_args", "make_relaxed_params_backward",
    "check_relaxed_conv_params_args", "make_relaxed_conv_params_backward", "EXTENSION_LOADED", "EXTENSION_ERROR",
    "REINSTALL_HINT", "built_for_torch", "torch_mismatch", "warn_missing_extension_once", "native_build_info",
]

if EXTENSION_LOADED:
    register_relaxed_linear_op("relaxeq::relaxed_linear", "relaxeq::relaxed_linear_backward",
                               lambda *a: torch.ops.relaxeq.relaxed_linear_backward(*a))
    register_vn_leaky_relu_op("relaxeq::vn_leaky_relu", "relaxeq::vn_leaky_relu_backward",
                              lambda *a: torch.ops.relaxeq.vn_leaky_relu_backward(*a))
    register_relaxed_conv2d_op("relaxeq::relaxed_conv2d", "relaxeq::relaxed_conv2d_backward",
                               lambda *a: torch.ops.relaxeq.relaxed_conv2d_backward(*a))
    register_vn_batch_norm_ops("relaxeq::vn_norm_stats", "relaxeq::vn_batch_norm_apply",
                               "relaxeq::vn_batch_norm_apply_backward",
                               lambda *a: torch.ops.relaxeq.vn_batch_norm_apply_backward(*a))
    register_relaxation_regularizer_op("relaxeq::relaxation_regularizer", "relaxeq::relaxation_regularizer_backward",
                                       lambda *a: torch.ops.relaxeq.relaxation_regularizer_backward(*a))
    for _name, _fake, _backward_fake, _make_backward, _setup in (
            ("relaxed_params", _relaxed_params_fake, _relaxed_params_backward_fake, make_relaxed_params_backward,
             _relaxed_params_setup_context),
            ("relaxed_conv_params", _relaxed_conv_params_fake, _relaxed_conv_params_backward_fake,
             make_relaxed_conv_params_backward, _relaxed_conv_params_setup_context)):
        # the parameter-algebra ops (written once in ATen calls, CPU and CUDA): fake, autograd, autocast
        torch.library.register_fake(f"relaxeq::{_name}")(_fake)
        torch.library.register_fake(f"relaxeq::{_name}_backward")(_backward_fake)
        torch.library.register_autograd(
            f"relaxeq::{_name}",
            _make_backward(lambda *a, _op=getattr(torch.ops.relaxeq, f"{_name}_backward"): _op(*a)),
            setup_context=_setup)
        register_autocast(f"relaxeq::{_name}", AUTOCAST_FP32)


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
