"""The self-check: every op once on tiny inputs with every concrete backend that runs on a device, float32
forward and backward against the float64 pure-PyTorch reference (:func:`self_check`)."""
from __future__ import annotations

import time
import warnings
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from .. import backend as _backend, functional as F
from ..reference import relaxed_conv2d_ref, relaxed_linear_ref, relaxed_params_ref, vn_batch_norm_ref, vn_leaky_relu_ref
from ..regularizer import relaxation_regularizer_ref, relaxation_regularizers
from ..reps import Irreps
from .facts import OPS

# float32 against float64 on tiny inputs: an output passes when max|out − ref| ≤ ATOL + RTOL · max|ref|.
# Correct kernels are at ~1e-7 of the scale (summation order, float32 rounding); a wrong index, a dropped
# term or a stale build is off by far more.
RTOL, ATOL = 1e-4, 1e-5


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
