"""The training-step benchmark's workload, shared by bench_train_step.py's pytest-benchmark tests, its runner and
its profile: the models and their inputs, the providers (one Step each), the step's loss and optimiser, and the
check that relaxed-paper computes relaxed-fused's loss and gradients. See bench_train_step.py for the workload
and the providers.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from relaxeq_fast import combine_regularizers, use_backend
from relaxeq_fast.backend import fill_caches_before_compile
from relaxeq_fast.bench import peak_memory_mib, synchronize
from relaxeq_fast.models import SteerableCNN, VNDGCNN, VNPointNet
from relaxeq_fast.vn import model_regularizers

from paper_style import paper_regularizers, to_paper_style

DTYPE = torch.float32
LAMBDA_LD, LAMBDA_N, LR = 1e-2, 1e-3, 1e-3
PROVIDERS = ("relaxed-fused", "relaxed-reference", "relaxed-paper", "plain")
MODES = ("full", "forward", "backward")
PAPER_MODELS = ("VN-PointNet", "VN-DGCNN")  # relaxed-paper exists for the VN models only

# (model, batch, points, width); points is ignored for the CNN (28 × 28 images)
MODELS = {
    "VN-PointNet": (VNPointNet, 24, dict(num_classes=40, k=20)),
    "VN-DGCNN": (VNDGCNN, 32, dict(num_classes=40, k=20)),
    "SteerableCNN": (SteerableCNN, 64, dict(num_classes=10, group=8)),
}


def providers_for(model: str, providers=PROVIDERS) -> tuple:
    return tuple(p for p in providers if p != "relaxed-paper" or model in PAPER_MODELS)


class Step:
    """One provider on one model configuration; ``run(mode)`` is one training step ("full") or its forward
    and loss only ("forward": autograd recording on, no backward, no optimiser). ``relaxed_maps``: which maps
    the relaxed VN models relax ("paper", the models' default, or "all")."""

    def __init__(self, model: str, provider: str, points: int = 300, width: float = 0.25,
                 batch: Optional[int] = None, k: Optional[int] = None, seed: int = 0, dtype=None,
                 device: torch.device = torch.device("cpu"), compile_mode: Optional[str] = None,
                 relaxed_maps: str = "paper"):
        if provider == "relaxed-paper" and model not in PAPER_MODELS:
            raise ValueError(f"relaxed-paper is implemented for {', '.join(PAPER_MODELS)} only, not {model}")
        dtype = dtype or DTYPE
        cls, default_batch, kwargs = MODELS[model]
        kwargs = dict(kwargs)
        if k is not None and "k" in kwargs:
            kwargs["k"] = k
        batch = batch or default_batch
        self.device = torch.device(device)
        self.relaxed = provider != "plain"
        self.backend = "reference" if provider == "relaxed-reference" else None
        torch.manual_seed(seed)  # same weights for relaxed-fused, relaxed-reference and relaxed-paper
        if self.relaxed and model in PAPER_MODELS:  # the VN models: which maps are relaxed
            kwargs["relaxed_maps"] = relaxed_maps
        self.model = cls(relaxed=self.relaxed, width=width, **kwargs).to(device=self.device, dtype=dtype).train()
        self.paper_layers = to_paper_style(self.model) if provider == "relaxed-paper" else None
        g = torch.Generator().manual_seed(seed + 1)
        if model == "SteerableCNN":
            x = torch.randn(batch, 1, 28, 28, generator=g, dtype=dtype)
        else:
            x = torch.randn(batch, points, 3, generator=g, dtype=dtype)
        self.x = x.to(self.device)
        self.y = torch.randint(0, kwargs["num_classes"], (batch,), generator=g).to(self.device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, fused=True)  # as relaxeq-train
        self.compiled = compile_mode is not None
        if self.compiled:
            fill_caches_before_compile(self.device, self.backend)
            # one shared code object for every Step: callers reset dynamo between models (recompile limit)
            self.loss = torch.compile(self.loss, mode=compile_mode, dynamic=False)

    def loss(self) -> torch.Tensor:
        loss = F.cross_entropy(self.model(self.x), self.y)
        if self.paper_layers is not None:
            loss = loss + combine_regularizers(paper_regularizers(self.paper_layers), LAMBDA_LD, LAMBDA_N)
        elif self.relaxed:
            loss = loss + combine_regularizers(model_regularizers(self.model), LAMBDA_LD, LAMBDA_N)
        return loss

    def _run(self, mode: str) -> None:
        if mode == "forward":
            self.loss()
            return
        self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        self.opt.step()

    def run(self, mode: str = "full") -> None:
        if mode not in ("full", "forward"):
            raise ValueError(f"mode must be 'full' or 'forward' (see timed() for 'backward'), got {mode!r}")
        if self.backend is None:
            self._run(mode)
        else:
            with use_backend(self.backend):
                self._run(mode)

    def _graph(self) -> torch.Tensor:
        self.opt.zero_grad(set_to_none=True)
        if self.backend is None:
            return self.loss()
        with use_backend(self.backend):
            return self.loss()

    def _backward(self, loss: torch.Tensor) -> None:
        if self.backend is None:
            loss.backward()
        else:
            with use_backend(self.backend):
                loss.backward()
        self.opt.step()

    def timed(self, mode: str):
        """What the timer calls: ``run(mode)``, or for "backward" the pair (untimed forward + loss, timed
        backward + optimiser step)."""
        if mode == "backward":
            return (self._graph, self._backward)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return lambda: self.run(mode)

    def ops_per_step(self) -> int:
        """Ops dispatched by one warm full step (see the module docstring)."""
        from torch.utils._python_dispatch import TorchDispatchMode

        class Count(TorchDispatchMode):
            n = 0

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                self.n += 1
                return func(*args, **(kwargs or {}))

        self.run()
        with Count() as count:
            self.run()
        return count.n

    def host_ops_per_step(self) -> int:
        """Top-level aten / relaxeq ops in torch.profiler's record of one warm full step (for compiled steps;
        see the module docstring)."""
        from torch.profiler import ProfilerActivity, profile
        self.run()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            self.run()
        return top_level_ops(prof.events())

    def compile_seconds(self) -> float:
        """The first step's wall time, with inductor's caches empty (trace + compile of the forward and, at the
        first backward, the backward), minus a warm step's."""
        from torch._inductor.utils import fresh_cache
        with fresh_cache():
            synchronize(self.device)
            t0 = time.perf_counter()
            self.run()
            synchronize(self.device)
            first = time.perf_counter() - t0
        self.run()
        synchronize(self.device)
        t0 = time.perf_counter()
        self.run()
        synchronize(self.device)
        return first - (time.perf_counter() - t0)

    def peak_mib(self) -> float:
        """Peak memory of one warm full step above what is live before it; grads are cleared first, so the
        step's gradient buffers count; Adam's state exists already."""
        self.run()
        self.opt.zero_grad(set_to_none=True)

        def step():
            self.loss().backward()
            self.opt.step()

        if self.backend is None:
            return peak_memory_mib(step, self.device)
        with use_backend(self.backend):
            return peak_memory_mib(step, self.device)


VERIFY = dict(points=32, width=0.125, batch=4, k=8)
VERIFY_TOL = 1e-8


def verify_paper(models=PAPER_MODELS, tol: float = VERIFY_TOL) -> Dict[str, dict]:
    """relaxed-paper against relaxed-fused in float64 on a tiny input (B = 4, P = 32, k = 8, width 0.125).

    Both models are built with the same seed; the relaxation weights W_r, b_r (zero at init, which would make
    the regulariser trivially 0) are set to the same random values in both, and dropout draws the same masks
    (same RNG seed before each forward). Returns, per model, the loss, the relative loss error and the largest
    relative gradient error over all parameters (‖g_paper − g_fused‖ / ‖g_fused‖, by parameter name).
    Raises AssertionError if either exceeds ``tol``: both compute the same math.
    """
    out = {}
    for model in models:
        steps = {p: Step(model, p, dtype=torch.float64, **VERIFY) for p in ("relaxed-fused", "relaxed-paper")}
        g = torch.Generator().manual_seed(123)
        relax_params = [n for n, _ in steps["relaxed-fused"].model.named_parameters() if "relax" in n]
        with torch.no_grad():
            for n in relax_params:
                v = 0.1 * torch.randn(dict(steps["relaxed-fused"].model.named_parameters())[n].shape, generator=g,
                                      dtype=torch.float64)
                for st in steps.values():
                    dict(st.model.named_parameters())[n].copy_(v)
        losses, grads = {}, {}
        for name, st in steps.items():
            torch.manual_seed(7)
            st.model.zero_grad(set_to_none=True)
            loss = st.loss()
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = {n: p.grad for n, p in st.model.named_parameters() if p.grad is not None}
        ref, pap = grads["relaxed-fused"], grads["relaxed-paper"]
        assert set(ref) == set(pap), f"{model}: parameters with gradients differ"
        loss_err = float((losses["relaxed-paper"] - losses["relaxed-fused"]).abs() / losses["relaxed-fused"].abs())
        total = torch.sqrt(sum(gr.square().sum() for gr in ref.values()))
        # a bias right before a BatchNorm has gradient 0 up to rounding (~1e-16): a relative error is meaningless
        # there, so per-parameter errors are taken over gradients above 1e-10 of the total gradient norm
        live = [n for n in ref if ref[n].norm() > 1e-10 * total]
        rel = {n: float((pap[n] - ref[n]).norm() / ref[n].norm()) for n in live}
        total_err = float(torch.sqrt(sum((pap[n] - ref[n]).square().sum() for n in ref)) / total)
        out[model] = dict(loss=float(losses["relaxed-fused"]), loss_rel_err=loss_err, grad_rel_err=max(rel.values()),
                          total_grad_rel_err=total_err, relax_grad_rel_err=max(rel[n] for n in relax_params if n in rel),
                          n_params=len(ref), n_zero=len(ref) - len(live),
                          n_relaxed=len(steps["relaxed-paper"].paper_layers))
        grad_err = max(out[model]["grad_rel_err"], total_err)
        assert loss_err <= tol and grad_err <= tol, f"{model}: relaxed-paper differs from relaxed-fused: {out[model]}"
    return out


def format_verify(res: Dict[str, dict]) -> str:
    parts = [f"{m}: loss {r['loss']:.6f}, relative loss error {r['loss_rel_err']:.1e}, relative error of the whole "
             f"gradient {r['total_grad_rel_err']:.1e}, largest per-parameter relative gradient error "
             f"{r['grad_rel_err']:.1e} ({r['relax_grad_rel_err']:.1e} on W_r, b_r; {r['n_params']} parameters, "
             f"{r['n_zero']} with gradient 0 up to rounding left out; {r['n_relaxed']} relaxed layers)"
             for m, r in res.items()]
    return (f"- relaxed-paper vs relaxed-fused, float64, B={VERIFY['batch']}, P={VERIFY['points']}, k={VERIFY['k']}, "
            f"width {VERIFY['width']:g}, random W_r, b_r (tolerance {VERIFY_TOL:g} relative): " + "; ".join(parts) + " — PASS")


def _is_op(e) -> bool:
    return e.name.startswith(("aten::", "relaxeq::"))


def top_level_ops(events) -> int:
    """Profiler op events whose parent is not an op: the ops the host dispatched itself."""
    return sum(1 for e in events if _is_op(e) and (e.cpu_parent is None or not _is_op(e.cpu_parent)))
