"""Autocast rules of the ops (torch.autocast), registered per op on CPU and CUDA."""
from __future__ import annotations

import torch

__all__ = ["AUTOCAST_LOWER", "AUTOCAST_FP32", "autocast_inputs", "register_autocast"]


# Autocast (torch.autocast): PyTorch's lists decide, per op, the dtype its inputs are cast to.
# relaxed_linear / relaxed_conv2d are "lower precision" ops like F.linear / F.conv2d: x, M, c, D go to the
# autocast dtype (their statistics G, s, r, S still come out in float32). The VN batch norm and leaky ReLU,
# the regulariser and the parameter algebra are "fp32" ops like the norms: norms, divisions and quadratic
# forms lose too much in bfloat16's 8 mantissa bits, so their inputs go to float32. As in PyTorch, float64
# tensors are never cast, and the op runs with autocast excluded (its own casts are recorded by autograd,
# so gradients reach float32 parameters in float32).
AUTOCAST_LOWER, AUTOCAST_FP32 = "lower", "fp32"
_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_autocast_libs = {}


def _autocast_cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in _AUTOCAST_ELIGIBLE and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, dtype) for v in value)
    return value


def _autocast_dtype(policy: str, device_type: str) -> torch.dtype:
    """The dtype an op of ``policy`` casts its inputs to (the autocast dtype is read at call time)."""
    return torch.get_autocast_dtype(device_type) if policy == AUTOCAST_LOWER else torch.float32


def autocast_inputs(policy: str, device_type: str, *values):
    """``values`` as an op's autocast rule casts them while autocast is on for ``device_type`` (else
    unchanged): the functional layer applies the rule before its own checks and on the reference backend,
    so every backend follows it."""
    if not torch.is_autocast_enabled(device_type):
        return values
    return _autocast_cast(values, _autocast_dtype(policy, device_type))


def register_autocast(qualname: str, policy: str):
    """The autocast rule of one op (native or Triton) on CPU and CUDA: ``policy`` is AUTOCAST_LOWER (inputs
    to ``torch.get_autocast_dtype(device)``, read at call time) or AUTOCAST_FP32 (inputs to float32)."""
    if policy not in (AUTOCAST_LOWER, AUTOCAST_FP32):
        raise ValueError(f"policy must be {AUTOCAST_LOWER!r} or {AUTOCAST_FP32!r}, got {policy!r}")
    op = torch._library.utils.lookup_op(qualname)
    namespace, name = qualname.split("::")
    if namespace not in _autocast_libs:  # one library per namespace, kept alive: it holds the registrations
        _autocast_libs[namespace] = torch.library.Library(namespace, "IMPL")
    lib = _autocast_libs[namespace]
    for device_type in _AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*_autocast_cast(args, _autocast_dtype(policy, _device_type)))

        # the Python dispatcher (torch.compile, export) reads py_kernels; eager calls reach the library kernel
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(autocast_kernel)
        lib.impl(name, lambda _keyset, *args, _kernel=autocast_kernel: _kernel(*args), key_name, with_keyset=True)
