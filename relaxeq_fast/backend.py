"""Which implementation runs an op: explicit, inspectable, never silent.

Backends:
  "native"    the compiled C++ kernels (CPU always; CUDA when built with CUDA), torch.ops.relaxeq.*
  "triton"    the Triton kernels (CUDA tensors; CPU tensors only under TRITON_INTERPRET=1)
  "reference" pure PyTorch (relaxeq_fast.reference)
  "auto"      native where it can run the tensor's device, else triton on CUDA, else reference
              (the fallback to reference warns once)

Precedence: the ``backend=`` argument, then the innermost ``use_backend(...)`` context, then the
process default — :func:`set_default_backend`, else the RELAXEQ_BACKEND environment variable as it was
at the first op call — then "auto". Nothing here reads the environment or the build on every call:
the default and each (device type, backend) resolution are worked out once and cached.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading

import torch

from . import _ops

BACKENDS = ("auto", "native", "triton", "reference")
_local = threading.local()


def _validate(name, source):
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


_default: str | None = None  # the process default; None = not read from the environment yet
_resolved: dict[tuple[str, str], str] = {}  # (device type, requested) -> concrete backend


def set_default_backend(name: str | None) -> None:
    """The backend of every op outside ``use_backend`` and without ``backend=``; None re-reads
    RELAXEQ_BACKEND at the next op call."""
    global _default
    _default = None if name is None else _validate(name, "backend")


def get_backend() -> str:
    """The backend requested by context or process default (before resolution against a device)."""
    global _default
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    if _default is None:
        _default = _validate(os.environ.get("RELAXEQ_BACKEND", "auto"), "RELAXEQ_BACKEND")
    return _default


@contextlib.contextmanager
def cuda_fused_max_dim(value: int):
    """``with cuda_fused_max_dim(0): ...``: the CUDA relaxed_linear sends layers up to ``value`` wide to its
    tiled kernel and wider ones to cuBLAS (0: always cuBLAS) inside the block. The process setting starts
    from RELAXEQ_CUDA_FUSED_MAX_DIM (default 128), read once by the extension, not at every call."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"cuda_fused_max_dim: value must be an int >= 0, got {value!r}")
    if not _ops.EXTENSION_LOADED:
        raise RuntimeError(f"cuda_fused_max_dim: the extension is not loaded ({_ops.EXTENSION_ERROR})")
    previous = torch.ops.relaxeq.cuda_fused_max_dim(value)
    try:
        yield
    finally:
        torch.ops.relaxeq.cuda_fused_max_dim(previous)


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): ...`` runs every relaxeq op inside on that backend."""
    _validate(name, "backend")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


def triton_available() -> bool:
    """Whether the ``triton`` package is importable (the "triton" backend can run on CUDA devices)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreter() -> bool:
    """Whether Triton's interpreter mode is on (``TRITON_INTERPRET=1``: Triton kernels run on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """The concrete backend ("native" | "triton" | "reference") that will run on ``device``."""
    name = _validate(backend, "backend") if backend is not None else get_backend()
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    hit = _resolved.get((device_type, name))
    if hit is None:
        hit = _resolved[(device_type, name)] = _resolve(torch.device(device_type), name)
    return hit


def fill_caches_before_compile(device: torch.device, backend: str | None = None) -> None:
    """Resolve the backend for ``device`` now: a torch.compile trace that fills the resolution cache guards
    on its being empty, and the next call would recompile."""
    resolve_backend(device)
    if backend is not None:
        resolve_backend(device, backend)


def runs_native_composite(device: torch.device, backend: str | None = None) -> bool:
    """Whether an op written once in ATen calls without a Triton kernel of its own (relaxed_params) runs
    natively: for backend "native", and for "triton" where the extension has kernels for the device;
    otherwise its pure-PyTorch reference runs."""
    name = resolve_backend(device, backend)
    if name == "triton":
        return native_available(device)
    return name == "native"


def native_available(device: torch.device) -> bool:
    """Whether the loaded extension has kernels for ``device``'s type."""
    return _ops.EXTENSION_LOADED and (
        device.type in ("cpu", "meta") or (device.type == "cuda" and _ops.native_build_info()["cuda"]))


def _resolve(device: torch.device, name: str) -> str:
    native_ok = native_available(device)
    triton_ok = triton_available() and (device.type == "cuda" or (device.type == "cpu" and triton_interpreter()))
    if name == "native" and not native_ok:
        why = ("the extension is not loaded: " + str(_ops.EXTENSION_ERROR)) if not _ops.EXTENSION_LOADED \
            else f"it was built without kernels for {device.type}"
        raise RuntimeError(f"backend='native' cannot run on {device}: {why}. "
                           f"Reinstall with: {_ops.REINSTALL_HINT}, or choose another backend.")
    if name == "triton" and not triton_ok:
        raise RuntimeError(f"backend='triton' cannot run on {device}: Triton needs a CUDA tensor, or a CPU "
                           "tensor with TRITON_INTERPRET=1 set before triton is imported"
                           + ("" if triton_available() else " (and triton is not installed)"))
    if name != "auto":
        return name
    if native_ok:
        return "native"
    if device.type == "cuda" and triton_ok:
        return "triton"
    if not _ops.EXTENSION_LOADED:
        _ops.warn_missing_extension_once()
    return "reference"
