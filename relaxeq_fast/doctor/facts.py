"""The installation's facts: versions, toolchain, GPU, the extension's build, which backend "auto" picks
for each op, and the interop libraries (:func:`report`)."""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import shutil
import sys
import warnings
from typing import Optional

import torch

from .. import _ops, backend as _backend

OPS = ("relaxed_linear", "relaxed_params", "vn_leaky_relu", "vn_batch_norm", "relaxed_conv2d",
       "relaxation_regularizer")
CONCRETE_BACKENDS = ("native", "triton", "reference")


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _toolchain() -> dict:
    # torch.utils.cpp_extension queries CUDA and logs "No CUDA runtime is found" at import on GPU-less
    # machines: imported here only, with that warning muted (the report says it in its own words).
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
        cxx_name = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") \
            else os.environ.get("CXX", "c++")
        cuda_home = cpp_extension.CUDA_HOME
    except Exception as e:  # pragma: no cover - a broken torch install
        cxx_name, cuda_home = os.environ.get("CXX", "c++"), None
        warnings.warn(f"relaxeq_fast.doctor: torch.utils.cpp_extension failed to import: {e}", RuntimeWarning)
    finally:
        log.setLevel(level)
    nvcc = None
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
    nvcc = nvcc or shutil.which("nvcc")
    return {"cxx": cxx_name, "cxx_path": shutil.which(cxx_name), "cuda_home": cuda_home, "nvcc": nvcc}


def _arch_key(arch: str) -> Optional[tuple]:
    """'9.0', '9.0+PTX', 'sm_90', '90' -> (9, 0); None when unreadable."""
    a = arch.strip().lower().replace("+ptx", "").replace("sm_", "").replace("compute_", "")
    try:
        if "." in a:
            major, minor = a.split(".", 1)
            return int(major), int(minor.rstrip("a"))
        a = a.rstrip("a")
        return int(a[:-1]), int(a[-1])
    except (ValueError, IndexError):
        return None


def _cuda_facts() -> dict:
    facts = {"available": False, "device_count": 0, "devices": []}
    try:
        facts["available"] = bool(torch.cuda.is_available())
        if facts["available"]:
            facts["device_count"] = torch.cuda.device_count()
            for i in range(facts["device_count"]):
                major, minor = torch.cuda.get_device_capability(i)
                facts["devices"].append({"index": i, "name": torch.cuda.get_device_name(i),
                                         "capability": f"{major}.{minor}"})
    except Exception as e:  # a driver problem is a finding, not a crash
        facts["error"] = f"{type(e).__name__}: {e}"
    return facts


def _auto_resolution(device_type: str) -> dict:
    """The concrete backend "auto" picks for each op on ``device_type`` (as the functional layer decides)."""
    device = torch.device(device_type)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference fallback's warning: the report says it itself
        for op in OPS:
            try:
                if op == "relaxed_params":  # one ATen-composite op, no Triton kernel of its own
                    out[op] = "native" if _backend.runs_native_composite(device, "auto") else "reference"
                else:
                    out[op] = _backend.resolve_backend(device, "auto")
            except Exception as e:
                out[op] = f"error: {type(e).__name__}: {e}"
    return out


# the libraries whose models relaxeq_fast.interop converts: (import name, what the package uses it for)
INTEROP_LIBRARIES = (("e3nn", "o3.Linear swap, SEGNN"), ("e2cnn", "R2Conv relax / project"),
                     ("escnn", "R2Conv relax / project"), ("se3_transformer_pytorch", "LinearSE3 relax / project"))


def _interop() -> dict:
    """{library: version, or "not importable: <why>"} for each interop library (imported here, warnings muted)."""
    import importlib
    import warnings
    out = {}
    for name, _use in INTEROP_LIBRARIES:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                importlib.import_module(name)
            out[name] = _version(name.replace("_", "-")) or _version(name) or "installed"
        except Exception as e:  # an optional library that fails to import for any reason is reported, not fatal
            out[name] = f"not importable: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    return out


def report() -> dict:
    """Versions and facts of this installation (queries the GPU, if any)."""
    import relaxeq_fast
    cuda = _cuda_facts()
    built_for = getattr(_ops, "built_for_torch", None)
    try:
        build = dict(relaxeq_fast.build_info())
    except Exception as e:
        build = {"error": f"{type(e).__name__}: {e}"}
    device_types = ["cpu"] + (["cuda"] if cuda["available"] else [])
    return {
        "python": {"version": platform.python_version(), "executable": sys.executable},
        "platform": platform.platform(),
        "torch": {"version": torch.__version__, "cuda": torch.version.cuda,
                  "path": os.path.dirname(torch.__file__)},
        "cuda": cuda,
        "triton": {"installed": _backend.triton_available(), "version": _version("triton"),
                   "interpreter": _backend.triton_interpreter()},
        "toolchain": _toolchain(),
        "relaxeq_fast": {"version": relaxeq_fast.__version__, "path": os.path.dirname(relaxeq_fast.__file__),
                         "extension_loaded": bool(_ops.EXTENSION_LOADED),
                         "extension_error": None if _ops.EXTENSION_ERROR is None else str(_ops.EXTENSION_ERROR),
                         "built_for_torch": built_for() if callable(built_for) else None},
        "build_info": build,
        "auto_backend": {dt: _auto_resolution(dt) for dt in device_types},
        "interop": _interop(),
    }
