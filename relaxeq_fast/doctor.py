"""``python -m relaxeq_fast.doctor``: is this installation healthy, and what does it run?

    python -m relaxeq_fast.doctor            # versions, toolchain, build, backend resolution, self-check
    python -m relaxeq_fast.doctor --json     # the same as JSON
    python -m relaxeq_fast.doctor --device cpu

:func:`report` collects the facts (Python, torch and its CUDA, the GPU, Triton, the compilers, the compiled
extension and its build, and which concrete backend "auto" picks for each op on each device type).
:func:`self_check` runs every op once on tiny inputs with every concrete backend that can run on each
device, in float32 (forward and backward), against the float64 pure-PyTorch references of
:mod:`relaxeq_fast.reference` / :func:`relaxeq_fast.regularizer.relaxation_regularizer_ref`. :func:`main`
prints both and exits 0 when the installation is healthy (the extension loaded and every check passed),
else 1 with one line that says what is wrong and how to fix it.

Nothing here touches CUDA at import: the GPU is queried inside :func:`report` and :func:`self_check` only.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import _ops, backend as _backend, functional as F
from .reference import relaxed_conv2d_ref, relaxed_linear_ref, relaxed_params_ref, vn_batch_norm_ref, vn_leaky_relu_ref
from .regularizer import relaxation_regularizer_ref, relaxation_regularizers
from .reps import Irreps

__all__ = ["ATOL", "CONCRETE_BACKENDS", "OPS", "RTOL", "SETUP_HINT", "main", "report", "self_check"]

OPS = ("relaxed_linear", "relaxed_params", "vn_leaky_relu", "vn_batch_norm", "relaxed_conv2d",
       "relaxation_regularizer")
CONCRETE_BACKENDS = ("native", "triton", "reference")
# float32 against float64 on tiny inputs: an output passes when max|out − ref| ≤ ATOL + RTOL · max|ref|.
# Correct kernels are at ~1e-7 of the scale (summation order, float32 rounding); a wrong index, a dropped
# term or a stale build is off by far more.
RTOL, ATOL = 1e-4, 1e-5
SETUP_HINT = "bash scripts/setup.sh"
DEFAULT_CLI_TIME_BUDGET_S = 60.0  # Triton compiles each kernel on its first GPU call: seconds each


# ---------------------------------------------------------------------------------------------
# report

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


# ---------------------------------------------------------------------------------------------
# self-check: one case per op. ``make`` draws float64 CPU inputs; ``run`` calls the public function with a
# backend on inputs already cast and moved; ``ref`` is the float64 pure-PyTorch reference. Both return
# {output name: tensor}; every output that carries gradient enters the loss whose input gradients are
# compared too (grad names: "d<input>").

class _Case(NamedTuple):
    make: Callable[[torch.Generator], dict]
    grad: tuple  # the inputs whose gradients are checked
    run: Callable[[dict, str], dict]
    ref: Callable[[dict], dict]


def _randn(g, *shape):
    return torch.randn(*shape, dtype=torch.float64, generator=g)


def _linear_make(g):
    return {"x": _randn(g, 5, 4), "M": _randn(g, 3, 4), "c": _randn(g, 3)}


def _linear_run(t, backend):
    y, stats = F.relaxed_linear(t["x"], t["M"], t["c"], stats=True, backend=backend)
    return {"y": y, "G": stats.G, "s": stats.s}


def _linear_ref(t):
    y, G, s = relaxed_linear_ref(t["x"], t["M"], t["c"], True)
    return {"y": y, "G": G, "s": s}


def _params_make(g):
    return {"weight": _randn(g, 2, 3), "weight_relax": _randn(g, 6, 9), "bias": _randn(g, 6),
            "bias_relax": _randn(g, 6), "theta": torch.tensor(0.37, dtype=torch.float64)}


def _params_run(t, backend):
    M, c = F.relaxed_params(t["weight"], t["weight_relax"], t["bias"], t["bias_relax"], t["theta"], backend=backend)
    return {"M": M, "c": c}


def _params_ref(t):
    M, c = relaxed_params_ref(t["weight"], t["weight_relax"], t["bias"], t["bias_relax"], t["theta"])
    return {"M": M, "c": c}


LEAKY_SLOPE, LEAKY_EPS = 0.3, 1e-4  # not the defaults: a kernel that ignores them fails


def _leaky_make(g):
    x, d = _randn(g, 4, 3, 3), _randn(g, 4, 3, 3)
    # keep ⟨x, d⟩ away from 0, where float32 and float64 could take different branches
    dot = (x * d).sum(-1, keepdim=True)
    x = x + 0.5 * torch.sign(dot) * d / (d * d).sum(-1, keepdim=True)
    return {"x": x, "d": d}


def _leaky_run(t, backend):
    return {"y": F.vn_leaky_relu(t["x"], t["d"], LEAKY_SLOPE, LEAKY_EPS, backend=backend)}


def _leaky_ref(t):
    return {"y": vn_leaky_relu_ref(t["x"], t["d"], LEAKY_SLOPE, LEAKY_EPS)}


BN_MOMENTUM, BN_EPS, BN_NORM_EPS = 0.2, 1e-4, 1e-5


def _bn_make(g):
    return {"x": _randn(g, 6, 3, 3), "running_mean": _randn(g, 3).abs(), "running_var": _randn(g, 3).abs() + 0.5,
            "weight": _randn(g, 3), "bias": _randn(g, 3)}


def _bn_run(t, backend):
    # training mode: batch statistics (with their gradient) and the in-place running-statistics update
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    y = F.vn_batch_norm(t["x"], rm, rv, t["weight"], t["bias"], training=True, momentum=BN_MOMENTUM, eps=BN_EPS,
                        norm_eps=BN_NORM_EPS, backend=backend)
    return {"y": y, "running_mean": rm, "running_var": rv}


def _bn_ref(t):
    rm, rv = t["running_mean"].clone(), t["running_var"].clone()
    y = vn_batch_norm_ref(t["x"], rm, rv, t["weight"], t["bias"], True, BN_MOMENTUM, BN_EPS, BN_NORM_EPS)
    return {"y": y, "running_mean": rm, "running_var": rv}


CONV_PADDING = 1


def _conv_make(g):
    return {"x": _randn(g, 2, 2, 5, 5), "M": _randn(g, 3, 2, 3, 3), "c": _randn(g, 3), "D": _randn(g, 2, 2, 3, 3)}


def _conv_run(t, backend):
    y, r = F.relaxed_conv2d(t["x"], t["M"], t["c"], t["D"], CONV_PADDING, backend=backend)
    return {"y": y, "r": r}


def _conv_ref(t):
    y, r, _S = relaxed_conv2d_ref(t["x"], t["M"], t["c"], t["D"], CONV_PADDING, False)
    return {"y": y, "r": r}


REG_IN, REG_OUT, REG_ROWS = "1x0+1x1+1x2", "2x0+1x1", 7


def _reg_make(g):
    rin, rout = Irreps(REG_IN), Irreps(REG_OUT)
    X = _randn(g, REG_ROWS, rin.dim) + 0.3
    return {"W_r": _randn(g, rout.dim, rin.dim), "b_r": _randn(g, rout.dim), "G": X.T @ X, "s": X.sum(0)}


def _reg_run(t, backend):
    terms = relaxation_regularizers(t["W_r"], t["b_r"], Irreps(REG_IN), Irreps(REG_OUT),
                                    F.InputStats(t["G"], t["s"], REG_ROWS), backend=backend)
    return {"R_LD": terms.lie_derivative, "R_N": terms.projection}


def _reg_ref(t):
    r_ld, r_n = relaxation_regularizer_ref(t["W_r"], t["b_r"], t["G"], t["s"], None, REG_ROWS,
                                           Irreps(REG_IN), Irreps(REG_OUT))
    return {"R_LD": r_ld, "R_N": r_n}


CASES = {
    "relaxed_linear": _Case(_linear_make, ("x", "M", "c"), _linear_run, _linear_ref),
    "relaxed_params": _Case(_params_make, ("weight", "weight_relax", "bias", "bias_relax"), _params_run, _params_ref),
    "vn_leaky_relu": _Case(_leaky_make, ("x", "d"), _leaky_run, _leaky_ref),
    "vn_batch_norm": _Case(_bn_make, ("x", "weight", "bias"), _bn_run, _bn_ref),
    "relaxed_conv2d": _Case(_conv_make, ("x", "M", "c", "D"), _conv_run, _conv_ref),
    "relaxation_regularizer": _Case(_reg_make, ("W_r", "b_r"), _reg_run, _reg_ref),
}
assert tuple(CASES) == OPS


def _upstream(outputs: dict, seed: int) -> dict:
    """Fixed float64 weights of the loss Σ ⟨w_k, out_k⟩ over the reference's outputs that carry gradient
    (distinct per element, so a transposed or summed gradient shows)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, dtype=torch.float64, generator=g) for k, v in outputs.items()
            if v.requires_grad}


def _forward_backward(case: _Case, inputs: dict, call: Callable[[dict], dict], weights: dict) -> dict:
    """{output: tensor, "d<input>": gradient} of one run, the gradients of Σ ⟨weights[k], out_k⟩."""
    with torch.enable_grad():
        outs = call(inputs)
        missing = [k for k in weights if k not in outs or not outs[k].requires_grad]
        if missing:
            raise RuntimeError(f"outputs {missing} carry no gradient (the reference's do)")
        loss = sum((outs[k] * w.to(outs[k].device, outs[k].dtype)).sum() for k, w in weights.items())
        grads = torch.autograd.grad(loss, [inputs[k] for k in case.grad]) if weights else ()
    result = {k: v.detach() for k, v in outs.items()}
    result.update({f"d{k}": gk for k, gk in zip(case.grad, grads)})
    return result


def _prepare(base: dict, case: _Case, device: torch.device, dtype: torch.dtype) -> dict:
    return {k: v.to(device=device, dtype=dtype).requires_grad_(k in case.grad) for k, v in base.items()}


def _expected(op: str, seed: int) -> tuple[dict, dict, dict]:
    """(float64 CPU inputs, loss weights, float64 reference outputs and gradients) of one op's case."""
    case = CASES[op]
    base = case.make(torch.Generator().manual_seed(seed))
    inputs = _prepare(base, case, torch.device("cpu"), torch.float64)
    with torch.enable_grad():
        weights = _upstream(case.ref(inputs), seed + 1)
    return base, weights, _forward_backward(case, _prepare(base, case, torch.device("cpu"), torch.float64),
                                            case.ref, weights)


def _compare(got: dict, expected: dict, rtol: float, atol: float):
    """(ok, max error, its tolerance, worst output, message): worst = largest error / tolerance."""
    worst, worst_ratio, worst_err, worst_tol = None, -1.0, 0.0, 0.0
    for name, e in expected.items():
        a = got.get(name)
        if a is None:
            return False, None, None, name, f"{name}: missing from the outputs"
        if tuple(a.shape) != tuple(e.shape):
            return False, None, None, name, f"{name}: shape {list(a.shape)}, expected {list(e.shape)}"
        a = a.detach().to("cpu", torch.float64)
        if not torch.isfinite(a).all():
            return False, None, None, name, f"{name}: non-finite values"
        scale = e.abs().max().item() if e.numel() else 0.0
        err = (a - e).abs().max().item() if e.numel() else 0.0
        tol = atol + rtol * scale
        if err / tol > worst_ratio:
            worst, worst_ratio, worst_err, worst_tol = name, err / tol, err, tol
    ok = worst_ratio <= 1.0
    msg = None if ok else f"{worst}: max error {worst_err:.3g} > tolerance {worst_tol:.3g}"
    return ok, worst_err, worst_tol, worst, msg


def check_backends(device: torch.device, triton_on_cpu: bool = False) -> list[str]:
    """The concrete backends the self-check runs on ``device``: native where the extension has kernels for
    it, triton on CUDA (on CPU only with ``triton_on_cpu`` and TRITON_INTERPRET=1: the interpreter is slow),
    reference always."""
    names = []
    if _backend.native_available(device):
        names.append("native")
    if _backend.triton_available() and (
            device.type == "cuda" or (device.type == "cpu" and triton_on_cpu and _backend.triton_interpreter())):
        names.append("triton")
    names.append("reference")
    return names


class _Float32Ieee:
    """TF32 off for the check (cuDNN convolutions default to TF32 on Ampere+, ~1e-3 errors); restored after."""

    def __enter__(self):
        self.old = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


def self_check(devices: Optional[Sequence] = None, time_budget_s: Optional[float] = 1.0, *,
               ops: Sequence[str] = OPS, rtol: float = RTOL, atol: float = ATOL, triton_on_cpu: bool = False,
               seed: int = 0) -> list[dict]:
    """Run every op once (forward and backward, float32, tiny inputs) on each device with each concrete
    backend that can run there, against the float64 pure-PyTorch reference.

    devices: e.g. ["cpu", "cuda"]; None: "cpu", plus "cuda" when a GPU is visible.
    time_budget_s: a soft limit on the whole check (None: none): once it is spent, the remaining checks are
        not run but listed with ok=None and the reason (a first Triton call on a GPU compiles its kernels,
        seconds each; the CPU check takes a fraction of a second).
    Returns one row per (device, backend, op): op, device, backend, ok (True / False / None = skipped),
    max_err (the largest |out − ref| of the worst output, gradients included), tol (its tolerance,
    atol + rtol · max|ref|), worst (that output's name), seconds, error (why it failed or was skipped).
    """
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    unknown = [op for op in ops if op not in CASES]
    if unknown:
        raise ValueError(f"self_check: unknown ops {unknown}; known: {list(OPS)}")
    expected = {op: _expected(op, seed) for op in ops}
    rows, start = [], time.perf_counter()
    with _Float32Ieee(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dev in devices:
            device = torch.device(dev)
            for backend_name in check_backends(device, triton_on_cpu):
                for op in ops:
                    row = {"op": op, "device": str(device), "backend": backend_name, "ok": None, "max_err": None,
                           "tol": None, "worst": None, "seconds": 0.0, "error": None}
                    rows.append(row)
                    if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                        row["error"] = f"skipped: the self-check's time budget ({time_budget_s:g} s) was spent"
                        continue
                    case = CASES[op]
                    base, weights, want = expected[op]
                    t0 = time.perf_counter()
                    try:
                        inputs = _prepare(base, case, device, torch.float32)
                        got = _forward_backward(case, inputs, lambda t: case.run(t, backend_name), weights)
                        if device.type == "cuda":
                            torch.cuda.synchronize(device)
                        row["seconds"] = time.perf_counter() - t0
                        row["ok"], row["max_err"], row["tol"], row["worst"], row["error"] = _compare(
                            got, want, rtol, atol)
                    except Exception as e:
                        row["seconds"] = time.perf_counter() - t0
                        row["ok"] = False
                        first = (str(e).strip().splitlines() or [""])[0]
                        row["error"] = f"{type(e).__name__}: {first[:300]}"
    return rows


# ---------------------------------------------------------------------------------------------
# diagnosis and output

def diagnose(info: dict, rows: list[dict], seconds: Optional[float] = None) -> tuple[bool, str, list[str]]:
    """(healthy, one line: the verdict and, when unhealthy, the fix, notes: things worth knowing that do
    not make the installation unhealthy)."""
    notes = []
    ext = info["relaxeq_fast"]
    build = info.get("build_info", {})
    cuda = info["cuda"]
    fix = f"reinstall with: {_ops.REINSTALL_HINT} (in the repository, in this environment) or: {SETUP_HINT}"
    if cuda.get("error"):
        notes.append(f"CUDA could not be queried: {cuda['error']}")
    if cuda["available"] and ext["extension_loaded"] and not build.get("cuda"):
        notes.append("the extension has no CUDA kernels (built without nvcc?): CUDA tensors run "
                     f"{info['auto_backend'].get('cuda', {}).get('relaxed_linear', '?')}; to build them: {fix}")
    if cuda["available"] and build.get("cuda"):
        archs = [a for a in (_arch_key(a) for a in build.get("cuda_archs", [])) if a is not None]
        for dev in cuda["devices"]:
            cap = _arch_key(dev["capability"])
            if archs and cap is not None and cap not in archs and not any(a[0] == cap[0] and a <= cap for a in archs):
                notes.append(f"GPU {dev['index']} ({dev['name']}, sm {dev['capability']}) is not among the built "
                             f"CUDA archs {build.get('cuda_archs')}: rebuild with TORCH_CUDA_ARCH_LIST="
                             f"\"{dev['capability']}\" {_ops.REINSTALL_HINT}")
    if info["toolchain"]["cxx_path"] is None:
        notes.append(f"no C++ compiler ({info['toolchain']['cxx']}) on PATH: the extension cannot be rebuilt here")
    skipped = [r for r in rows if r["ok"] is None]
    if skipped:
        notes.append(f"{len(skipped)} self-check(s) not run: {skipped[0]['error']} (raise it with --time-budget)")

    failed = [r for r in rows if r["ok"] is False]
    if not ext["extension_loaded"]:
        why = ext["extension_error"] or "unknown reason"
        return False, (f"UNHEALTHY: the compiled extension relaxeq_fast._C did not load ({why}); every op falls "
                       f"back to the slow pure-PyTorch reference. Fix: {fix}"), notes
    if failed:
        r = failed[0]
        what = ", ".join(f"{x['op']} on {x['device']}/{x['backend']}" for x in failed[:3]) + \
            (f" and {len(failed) - 3} more" if len(failed) > 3 else "")
        reason = f"{r['op']} on {r['device']}/{r['backend']}: {r['error']}"
        hint = fix
        if r["backend"] == "triton":
            hint = ("run on another backend (backend='native' or RELAXEQ_BACKEND=native) and check that triton is "
                    "the version this torch was released with")
        elif r["device"].startswith("cuda") and "kernel image" in (r["error"] or ""):
            hint = f"rebuild for this GPU: TORCH_CUDA_ARCH_LIST=<its sm> {_ops.REINSTALL_HINT}"
        return False, (f"UNHEALTHY: {len(failed)} self-check(s) failed ({what}); first: {reason}. Fix: {hint}; "
                       "if that does not help, report it with the output of python -m relaxeq_fast.doctor --json"
                       ), notes
    ran = [r for r in rows if r["ok"]]
    secs = sum(r["seconds"] for r in rows) if seconds is None else seconds
    devices = sorted({r["device"] for r in ran})
    return True, (f"OK: relaxeq_fast {ext['version']} is healthy: the extension loaded and all {len(ran)} "
                  f"self-checks passed ({', '.join(devices)}; {secs:.2f} s)"), notes


def _table(header: Sequence[str], rows: Sequence[Sequence], indent: str = "  ") -> str:
    cells = [[str(c) for c in header]] + [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, indent + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _yes(flag) -> str:
    return "yes" if flag else "no"


def format_report(info: dict) -> str:
    ext, build, cuda, tri, tc = (info["relaxeq_fast"], info["build_info"], info["cuda"], info["triton"],
                                 info["toolchain"])
    if cuda["available"]:
        gpu = "; ".join(f"{d['index']}: {d['name']} (sm {d['capability']})" for d in cuda["devices"])
    else:
        gpu = "not available" + (f" ({cuda['error']})" if cuda.get("error") else "")
    if ext["extension_loaded"]:
        extension = "loaded"
    else:
        extension = f"NOT LOADED: {ext['extension_error']}"
    if ext.get("built_for_torch"):
        extension += f" (built for torch {ext['built_for_torch']})"
    if "error" in build and not ext["extension_loaded"]:
        built = "-"
    else:
        archs = ";".join(build.get("cuda_archs") or []) or "-"
        built = (f"cpu kernels {_yes(build.get('cpu'))}, cuda kernels {_yes(build.get('cuda'))} (archs {archs}), "
                 f"openmp {_yes(build.get('openmp'))}, compiler {build.get('compiler') or '?'}")
    facts = [
        ("python", f"{info['python']['version']} ({info['python']['executable']})"),
        ("platform", info["platform"]),
        ("torch", f"{info['torch']['version']} (CUDA {info['torch']['cuda'] or 'none: CPU build'})"),
        ("gpu", gpu),
        ("triton", (f"{tri['version'] or 'installed'}" if tri["installed"] else "not installed")
         + f"; interpreter {'on (TRITON_INTERPRET=1)' if tri['interpreter'] else 'off'}"),
        ("c++ compiler", f"{tc['cxx_path'] or 'NOT FOUND'} ({tc['cxx']})"),
        ("nvcc", f"{tc['nvcc'] or 'not found'}" + (f" (CUDA_HOME {tc['cuda_home']})" if tc["cuda_home"] else "")),
        ("relaxeq_fast", f"{ext['version']} ({ext['path']})"),
        ("extension", extension),
        ("build", built),
    ] + [(f"{name} ({use})", info.get("interop", {}).get(name, "?")) for name, use in INTEROP_LIBRARIES]
    width = max(len(k) for k, _ in facts)
    lines = ["relaxeq_fast doctor", ""] + [f"  {k.ljust(width)}  {v}" for k, v in facts]
    device_types = list(info["auto_backend"])
    lines += ["", "backend='auto' runs", _table(["op"] + device_types,
                                                [[op] + [info["auto_backend"][dt].get(op, "-") for dt in device_types]
                                                 for op in OPS])]
    return "\n".join(lines)


def _fmt_err(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def format_self_check(rows: list[dict], rtol: float = RTOL, atol: float = ATOL) -> str:
    body = []
    for r in rows:
        status = "ok" if r["ok"] else ("skip" if r["ok"] is None else "FAIL")
        body.append([r["op"], r["device"], r["backend"], status, _fmt_err(r["max_err"]), _fmt_err(r["tol"]),
                     r["worst"] or "-", f"{r['seconds'] * 1e3:.1f} ms", r["error"] or ""])
    head = (f"self-check: float32 forward + backward against the float64 reference "
            f"(pass: max|out - ref| <= {atol:g} + {rtol:g} * max|ref|, over every output and gradient)")
    header = ["op", "device", "backend", "result", "max err", "tol", "worst output", "time", "error"]
    return head + "\n" + _table(header, body)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relaxeq-doctor", description="Check a relaxeq_fast installation: versions, toolchain, the compiled "
        "extension, backend resolution, and a numerical self-check of every op against the float64 reference. "
        "Exit status 0 when healthy, 1 otherwise.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--device", action="append", default=None,
                        help="device to self-check (repeatable; default: cpu, and cuda when visible)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_CLI_TIME_BUDGET_S, metavar="SECONDS",
                        help="soft limit on the self-check; checks past it are listed as skipped "
                             f"(default {DEFAULT_CLI_TIME_BUDGET_S:g}; 0 or less: none)")
    parser.add_argument("--triton-interpreter", action="store_true",
                        help="also check the Triton backend on CPU (needs TRITON_INTERPRET=1; slow)")
    args = parser.parse_args(argv)

    info = report()
    budget = args.time_budget if args.time_budget > 0 else None
    t0 = time.perf_counter()
    rows = self_check(args.device, budget, triton_on_cpu=args.triton_interpreter)
    elapsed = time.perf_counter() - t0
    healthy, verdict, notes = diagnose(info, rows, elapsed)
    if args.json:
        out = dict(info, self_check=rows, self_check_seconds=elapsed, tolerance={"rtol": RTOL, "atol": ATOL},
                   healthy=healthy, diagnosis=verdict, notes=notes)
        print(json.dumps(out, indent=2, default=str))
        if not healthy:
            print(verdict, file=sys.stderr)
    else:
        print(format_report(info))
        print()
        print(format_self_check(rows))
        print()
        for note in notes:
            print(f"note: {note}")
        print(verdict)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
