"""The relaxed VN linear benchmark's workload, shared by bench_relaxed_linear.py's pytest-benchmark tests, its
runner and its profile: the problem (inputs and parameters per size), the providers (one definition each) and
the agreement check against the float64 truth. See bench_relaxed_linear.py for the workload and the providers.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF

from relaxeq_fast import VN, combine_regularizers
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear
from relaxeq_fast.regularizer import RegularizerTerms

DTYPE = torch.float32
MODES = ("full", "forward", "backward")
THETA = 0.5
LAMBDA_LD = 1.0
LAMBDA_N = 0.1  # nonzero so both regulariser terms (and their gradients) are exercised
SEED = 0

# Agreement with the float64 truth, checked once per size before timing. Relative errors:
# |a - b| / |b| for the scalars (loss, R_LD, R_N), ‖a - b‖ / ‖b‖ for the gradients. float32 GEMMs and
# reductions over up to 144000 rows land around 1e-6..1e-5; the closed form accumulates G in float32.
TOLS = {"loss": 1e-4, "r_ld": 1e-4, "r_n": 1e-4, "grad": 1e-4}
# The closed form (our R_LD, R_N from G, s, N) against the direct per-row sums, both in float64.
TOL_CLOSED_FORM_F64 = 1e-9


def size_label(size: Tuple[int, int]) -> str:
    n, c = size
    return f"{n}x{c}"



# ----------------------------------------------------------------------------------------------------
# The problem: one set of inputs and parameters per size, copied into every provider.
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Problem:
    n: int
    c: int
    x: torch.Tensor             # [N, C, 3]
    g: torch.Tensor             # [N, C, 3] fixed cotangent: task loss (y · g).sum()
    weight: torch.Tensor        # [C, C] equivariant VN weight (W_eq = W ⊗ I_3)
    weight_relax: torch.Tensor  # [D, D] W_r
    bias_relax: torch.Tensor    # [D] b_r

    @property
    def d(self) -> int:
        return 3 * self.c

    @property
    def label(self) -> str:
        return size_label((self.n, self.c))


def make_problem(n: int, c: int, seed: int = SEED, device: torch.device = torch.device("cpu")) -> Problem:
    """Drawn on the CPU (same numbers on every device), then moved to ``device``."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    # The library's own initialisation: W as nn.Linear, W_r nonzero (relax_init="default").
    init = RelaxedLinear(VN(c), VN(c), relax_init="default", theta=THETA, dtype=DTYPE)
    x = torch.randn(n, c, 3, generator=gen, dtype=DTYPE)
    g = torch.randn(n, c, 3, generator=gen, dtype=DTYPE)
    # The library starts b_r at 0; a small nonzero b_r exercises the bias terms of R_LD and R_N.
    b_r = 0.1 * torch.randn(3 * c, generator=gen, dtype=DTYPE)
    return Problem(n, c, *(t.detach().to(device).clone() for t in (x, g, init.weights[0], init.weight_relax, b_r)))


def task_plus_regularizer(y: torch.Tensor, g: torch.Tensor, terms: Optional[RegularizerTerms]) -> torch.Tensor:
    """The benchmark's loss: (y · g).sum() + λ_LD √R_LD + λ_N √R_N (no regulariser for the plain layer)."""
    task = (y * g).sum()
    if terms is None:
        return task
    return task + combine_regularizers([terms], lambda_ld=LAMBDA_LD, lambda_n=LAMBDA_N, reduction="paper")


# ----------------------------------------------------------------------------------------------------
# Providers
# ----------------------------------------------------------------------------------------------------

class ProviderUnavailable(Exception):
    """A provider that cannot run here (e.g. torch.compile failed); reported in the table, not raised."""


class Impl:
    """One provider on one problem. ``loss()`` -> (loss, R_LD, R_N); ``step(mode)`` is what is timed."""

    name = "?"
    verifiable = True  # computes the same loss and gradients as the others

    def __init__(self):
        self.x: Optional[torch.Tensor] = None

    def leaves(self) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def loss(self):
        raise NotImplementedError

    def step(self, mode: str) -> None:
        if mode == "full":
            for t in self.leaves().values():
                t.grad = None  # optimizer.zero_grad(set_to_none=True)
            self.loss()[0].backward()
        elif mode == "forward":
            self.loss()
        else:
            raise ValueError(f"mode must be one of ('full', 'forward'), got {mode!r}")

    def _graph(self) -> torch.Tensor:
        for t in self.leaves().values():
            t.grad = None
        return self.loss()[0]

    def timed(self, mode: str):
        """What the timer calls: ``step(mode)``, or for "backward" the pair (untimed forward, timed backward)."""
        if mode == "backward":
            return (self._graph, lambda loss: loss.backward())
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return lambda: self.step(mode)

    def grads(self) -> Dict[str, Optional[torch.Tensor]]:
        return {k: v.grad for k, v in self.leaves().items()}


def _leaf(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.detach().to(dtype).clone().requires_grad_(True)


def relaxed_step_loss(layer: RelaxedLinear, x: torch.Tensor, g: torch.Tensor):
    """Forward + closed-form regulariser through a RelaxedLinear (the fused, reference, compiled step)."""
    y = layer(x)
    terms = layer.regularizers()
    return task_plus_regularizer(y, g, terms), terms.lie_derivative, terms.projection


class RelaxedLayerImpl(Impl):
    """RelaxedLinear on a given backend: "native" = fused, "triton", "reference" = pure PyTorch closed form."""

    def __init__(self, p: Problem, backend: str, dtype=DTYPE):
        super().__init__()
        self.name = {"native": "fused", "reference": "reference", "triton": "triton"}[backend]
        if backend == "triton" and p.x.device.type != "cuda":
            raise ProviderUnavailable("needs a CUDA device")
        self.layer = RelaxedLinear(VN(p.c), VN(p.c), relax_init="default", theta=THETA, backend=backend, dtype=dtype,
                                   device=p.x.device)
        with torch.no_grad():
            self.layer.weights[0].copy_(p.weight)
            self.layer.weight_relax.copy_(p.weight_relax)
            self.layer.bias_relax.copy_(p.bias_relax)
        self.x = _leaf(p.x, dtype)
        self.g = p.g.to(dtype)

    def leaves(self):
        return {"x": self.x, "weight": self.layer.weights[0], "weight_relax": self.layer.weight_relax,
                "bias_relax": self.layer.bias_relax}

    def loss(self):
        return relaxed_step_loss(self.layer, self.x, self.g)


class CompiledStepImpl(RelaxedLayerImpl):
    """torch.compile(relaxed_step_loss) on a backend; compiled and warmed up at build.

    backend "reference": the target's baseline; "native": our op inside a compiled step (the op is
    opaque to inductor, which fuses the loss and regulariser algebra around it).
    """

    def __init__(self, p: Problem, backend: str = "reference"):
        super().__init__(p, backend)
        self.name = {"reference": "compiled", "native": "compiled_fused"}[backend]
        self._fn = torch.compile(relaxed_step_loss, dynamic=False)
        t0 = time.perf_counter()
        try:
            self.step("full")  # compiles forward and (lazily) backward
            self.step("forward")
        except Exception as e:  # report, don't crash the whole run
            raise ProviderUnavailable(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        self.compile_s = time.perf_counter() - t0

    def loss(self):
        return self._fn(self.layer, self.x, self.g)


class PaperStyleImpl(Impl):
    """The approach of the paper's public code, re-implemented (with its bias defect fixed).

    * equivariant layer and relaxation layer are separate maps: a VN channel mixing (vnn's VNLinear, an
      nn.Linear over channels) and a dense nn.Linear W_r, b_r on the flattened features;
    * generators are dense [D, D] matrices A_k = I_C ⊗ G_k, built once;
    * the Lie derivative re-runs the relaxation map on transformed inputs, per generator:
      L_k = W_r (A_k x̂) − A_k (W_r x̂ + b_r), i.e. relax(x̂ A_kᵀ) − relax(x̂) A_kᵀ with the bias entering
      as −A_k b_r (the paper code adds b_r to the first term too, although d/dt of a constant is 0);
      R_LD = Σ_k ‖L_k‖², R_N = ‖relax(x̂)‖², x̂ the detached input.
    Dense passes over the batch: 2 in the forward, 1 + 3·3 for the regulariser, and their backwards.
    """

    name = "paper"

    def __init__(self, p: Problem, dtype=DTYPE):
        super().__init__()
        self.weight = _leaf(p.weight, dtype)
        self.weight_relax = _leaf(p.weight_relax, dtype)
        self.bias_relax = _leaf(p.bias_relax, dtype)
        self.x = _leaf(p.x, dtype)
        self.g = p.g.to(dtype)
        self.A = VN(p.c).generator_matrices(dtype=dtype, device=p.x.device)  # [3, D, D]

    def leaves(self):
        return {"x": self.x, "weight": self.weight, "weight_relax": self.weight_relax, "bias_relax": self.bias_relax}

    def relax(self, xf: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return TF.linear(xf, self.weight_relax, self.bias_relax if bias else None)

    def loss(self):
        x = self.x
        n = x.shape[0]
        y_eq = TF.linear(x.transpose(1, -1), self.weight).transpose(1, -1)  # [N, C, 3]: channel mixing
        xf = x.reshape(n, -1)
        y = y_eq.reshape(n, -1) + THETA * self.relax(xf)
        xh = xf.detach()
        r0 = self.relax(xh)
        r_n = r0.square().sum()
        r_ld = 0
        for k in range(3):
            A = self.A[k]
            lie = self.relax(xh @ A.T, bias=False) - r0 @ A.T
            r_ld = r_ld + lie.square().sum()
        terms = RegularizerTerms(r_ld, r_n, n)
        return task_plus_regularizer(y.reshape_as(self.g), self.g, terms), r_ld, r_n


class PlainImpl(Impl):
    """The unrelaxed equivariant layer, forward + backward of the task loss only."""

    name = "plain"
    verifiable = False  # a different loss (no relaxation, no regulariser)

    def __init__(self, p: Problem, dtype=DTYPE):
        super().__init__()
        self.layer = EquivariantLinear(VN(p.c), VN(p.c), dtype=dtype, device=p.x.device)
        with torch.no_grad():
            self.layer.weights[0].copy_(p.weight)
        self.x = _leaf(p.x, dtype)
        self.g = p.g.to(dtype)

    def leaves(self):
        return {"x": self.x, "weight": self.layer.weights[0]}

    def loss(self):
        return task_plus_regularizer(self.layer(self.x), self.g, None), None, None


class MatmulFloorImpl(Impl):
    """torch.mm into preallocated float32 tensors: the GEMMs every exact implementation must do."""

    name = "floor"
    verifiable = False

    def __init__(self, p: Problem):
        super().__init__()
        n, d = p.n, p.d
        self.xf = p.x.reshape(n, d).contiguous()
        kw = dict(dtype=DTYPE, device=p.x.device)
        self.M = (torch.kron(p.weight, torch.eye(3, **kw)) + THETA * p.weight_relax).contiguous()
        self.dy = p.g.reshape(n, d).contiguous()
        self.y = torch.empty(n, d, **kw)
        self.G = torch.empty(d, d, **kw)
        self.dx = torch.empty(n, d, **kw)
        self.dM = torch.empty(d, d, **kw)

    def step(self, mode: str) -> None:
        if mode != "backward":
            torch.mm(self.xf, self.M.t(), out=self.y)
            torch.mm(self.xf.t(), self.xf, out=self.G)
        if mode in ("full", "backward"):
            torch.mm(self.dy, self.M, out=self.dx)
            torch.mm(self.dy.t(), self.xf, out=self.dM)

    def timed(self, mode: str):
        return lambda: self.step(mode)


PROVIDERS: Dict[str, Tuple[str, Callable[[Problem], Impl]]] = {
    "fused": ("fused (native C++ / CUDA)", lambda p: RelaxedLayerImpl(p, "native")),
    "triton": ("fused (Triton)", lambda p: RelaxedLayerImpl(p, "triton")),
    "reference": ("reference (PyTorch)", lambda p: RelaxedLayerImpl(p, "reference")),
    "compiled": ("torch.compile(reference)", CompiledStepImpl),
    "compiled_fused": ("torch.compile(fused)", lambda p: CompiledStepImpl(p, "native")),
    "paper": ("paper-style", PaperStyleImpl),
    "plain": ("plain equivariant", PlainImpl),
    "floor": ("matmul floor", MatmulFloorImpl),
}


def build_providers(p: Problem, names: Sequence[str] = tuple(PROVIDERS)):
    """{name: Impl} for those that build, {name: reason} for those that cannot run here."""
    impls, unavailable = {}, {}
    for name in names:
        try:
            impls[name] = PROVIDERS[name][1](p)
        except ProviderUnavailable as e:
            unavailable[name] = str(e)
    return impls, unavailable


# ----------------------------------------------------------------------------------------------------
# Agreement check (once per size, before timing)
# ----------------------------------------------------------------------------------------------------

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _outputs(impl: Impl):
    impl.step("full")  # gradients from a full step...
    loss, r_ld, r_n = impl.loss()  # ...and the values (same inputs, same parameters)
    grads = {k: v.detach().clone() for k, v in impl.grads().items()}
    return {"loss": loss.detach(), "r_ld": r_ld.detach(), "r_n": r_n.detach()}, grads


def verify(p: Problem, impls: Dict[str, Impl]) -> Dict[str, dict]:
    """Relative errors of every verifiable provider against the float64 truth; ``ok`` per provider.

    Truth: the reference layer in float64 (closed form), whose R_LD, R_N must also match the direct
    per-row sums of the paper-style provider in float64 (independent of the closed form).
    """
    truth_vals, truth_grads = _outputs(RelaxedLayerImpl(p, "reference", dtype=torch.float64))
    with torch.no_grad():
        _, d_ld, d_n = PaperStyleImpl(p, dtype=torch.float64).loss()
    report = {"closed_form_vs_direct_f64": {"r_ld": _rel(truth_vals["r_ld"], d_ld), "r_n": _rel(truth_vals["r_n"], d_n)}}
    report["closed_form_vs_direct_f64"]["ok"] = all(
        v <= TOL_CLOSED_FORM_F64 for v in report["closed_form_vs_direct_f64"].values())
    for name, impl in impls.items():
        if not impl.verifiable:
            continue
        vals, grads = _outputs(impl)
        errs = {k: _rel(vals[k], truth_vals[k]) for k in truth_vals}
        errs.update({f"grad_{k}": _rel(grads[k], truth_grads[k]) for k in truth_grads})
        ok = all(v <= TOLS["grad" if k.startswith("grad_") else k] for k, v in errs.items())
        report[name] = {"errors": errs, "ok": ok, "values": {k: v.item() for k, v in vals.items()}}
    report["truth"] = {k: v.item() for k, v in truth_vals.items()}
    return report


def format_verification(label: str, report: Dict[str, dict]) -> str:
    lines = [f"agreement with float64 truth at {label} (relative errors; tol {TOLS}):"]
    cf = report["closed_form_vs_direct_f64"]
    lines.append(f"  closed form vs direct sums (float64): R_LD {cf['r_ld']:.2e}, R_N {cf['r_n']:.2e}  "
                 f"{'ok' if cf['ok'] else 'MISMATCH'}")
    t = report["truth"]
    lines.append(f"  truth: loss {t['loss']:.6g}, R_LD {t['r_ld']:.6g}, R_N {t['r_n']:.6g}")
    for name, r in report.items():
        if name in ("closed_form_vs_direct_f64", "truth"):
            continue
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r["errors"].items())
        lines.append(f"  {name:9s} {'ok      ' if r['ok'] else 'MISMATCH'} {errs}")
    return "\n".join(lines)


def assert_agreement(label: str, report: Dict[str, dict], name: Optional[str] = None) -> None:
    """Raise with the numbers if the closed form or a provider (``name``, or all) disagrees."""
    bad = [] if report["closed_form_vs_direct_f64"]["ok"] else ["closed_form_vs_direct_f64"]
    bad += [k for k, r in report.items() if k not in ("closed_form_vs_direct_f64", "truth")
            and (name is None or k == name) and not r["ok"]]
    assert not bad, f"providers disagree ({', '.join(bad)}):\n" + format_verification(label, report)
