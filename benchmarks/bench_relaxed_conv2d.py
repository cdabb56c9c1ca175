"""One training step of a relaxed 2D convolution with its equivariance regulariser: providers side by side.

Workload (DESIGN §1 last paragraph, issue 5): RotMNIST sizes, x [64, C, 28, 28] float32, k = 5, padding 2,
C_in = C_out = C_d = C. The relaxed kernel is M = K + θ B (θ = 0.5) and the defect kernel D(B) = B − rot90(B)
(the C_4 generator acting on a kernel between trivial fields: an exact pixel permutation). The loss is
(y · g).sum() + λ r with a fixed random g, λ = 0.1, and r the data-mode regulariser. Modes:
  full     forward + regulariser + backward (grads of x, K, B, c): what is timed for the targets
  forward  the loss value with autograd recording on, no backward
  backward the backward alone (the forward that builds its graph runs untimed first)

Providers (one definition each, shared by the pytest-benchmark tests and the standalone runner):
  fused       relaxed_conv2d(backend="native"): y and r = Σ conv(x̂, D)² from one convolution with the stacked
              kernel [M; D], z reduced in the epilogue, S = weight gradient of z taken before z is freed
              (need_S: only when D needs a gradient); backward dD = 2 dr S (r = ⟨D, S⟩ is quadratic in D),
              no recompute of z
  triton      the same through the Triton kernel (CUDA devices only)
  reference   relaxed_conv2d_ref(need_S=False) (eager): separate convolutions for the output and the defect
  gridsample  the Lie-derivative baseline of the public Lie-derivative / approximately-equivariant code:
              rotate x̂ by ε with F.affine_grid + F.grid_sample, run the relaxation conv on it, rotate
              conv(x̂, B) by the same ε, and take (f(rot x̂) − rot f(x̂)) / ε as the derivative; r = its squared
              norm. Not the same number as our r (another operator), so it is timed, not compared
  plain       conv2d(x, M, c) and the task loss only: the cost without relaxation (reported, not targeted)

Run:
  python benchmarks/bench_relaxed_conv2d.py [--quick]    # runner: JSON + markdown in benchmarks/results/
  python benchmarks/bench_relaxed_conv2d.py --device cuda
  pytest benchmarks/bench_relaxed_conv2d.py --benchmark-only
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict

import torch
import torch.nn.functional as TF

from relaxeq_fast.bench import (describe_machine, machine_info as harness_machine_info, median_iqr_ms,
                                pedantic, resolve_device, result_suffix, target, time_round_robin, write_json)
from relaxeq_fast.functional import relaxed_conv2d
from relaxeq_fast.reference import relaxed_conv2d_ref

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

THREADS = 2
torch.set_num_threads(THREADS)

DTYPE = torch.float32
BATCH, SIDE, K, PAD = 64, 28, 5, 2
CHANNELS = (16, 32)
MODES = ("full", "forward", "backward")
THETA, LAMBDA, EPS_ROT = 0.5, 0.1, 1e-2
SEED = 0
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PROVIDERS = ("fused", "triton", "reference", "gridsample", "plain")
# Targets on the full step: (label, numerator, denominator, bound): numerator / denominator >= bound.
TARGETS = (("reference / fused", "reference", "fused", 1.5), ("gridsample / fused", "gridsample", "fused", 5.0))
# fused against the float64 reference, once per size before timing: |a − b| / |b| for the loss,
# ‖a − b‖ / ‖b‖ for the gradients (float32 convolutions over 28·28·64 pixels: ~1e-6).
TOL = 1e-4


def defect(B: torch.Tensor) -> torch.Tensor:
    """D(B) = B − rot90(B): the C_4 defect of a kernel between trivial fields (exact permutation)."""
    return B - torch.rot90(B, 1, (2, 3))


class Step:
    """One provider on one size: leaves x, K, B, c and the cotangent g; ``step(mode)`` is what is timed."""

    verifiable = True

    def __init__(self, name: str, c: int, dtype=DTYPE, seed: int = SEED, device=torch.device("cpu")):
        gen = torch.Generator().manual_seed(seed)
        rnd = lambda *s, scale=1.0: (scale * torch.randn(*s, generator=gen, dtype=torch.float64)).to(  # noqa: E731
            device=device, dtype=dtype)
        fan = (c * K * K) ** -0.5
        self.name = name
        self.x = rnd(BATCH, c, SIDE, SIDE).requires_grad_()
        self.K = rnd(c, c, K, K, scale=fan).requires_grad_()
        self.B = rnd(c, c, K, K, scale=0.3 * fan).requires_grad_()
        self.c = rnd(c, scale=0.1).requires_grad_()
        self.g = rnd(BATCH, c, SIDE, SIDE)
        self.verifiable = name in ("fused", "triton", "reference")

    def leaves(self):
        return self.x, self.K, self.B, self.c

    def loss(self) -> torch.Tensor:
        M = self.K + THETA * self.B
        if self.name == "plain":
            return (TF.conv2d(self.x, M, self.c, padding=PAD) * self.g).sum()
        if self.name == "gridsample":
            y = TF.conv2d(self.x, M, self.c, padding=PAD)
            return (y * self.g).sum() + LAMBDA * gridsample_lie_regularizer(self.x.detach(), self.B)
        if self.name == "reference":  # eager autograd through r: S is not needed (nor formed)
            y, r, _ = relaxed_conv2d_ref(self.x, M, self.c, defect(self.B), PAD, need_S=False)
        else:
            y, r = relaxed_conv2d(self.x, M, self.c, defect(self.B), PAD,
                                  backend="triton" if self.name == "triton" else "native")
        return (y * self.g).sum() + LAMBDA * r

    def step(self, mode: str):
        for t in self.leaves():
            t.grad = None
        loss = self.loss()
        if mode == "full":
            loss.backward()
        return loss

    def timed(self, mode: str):
        """What the timer calls: ``step(mode)``, or for "backward" the pair (untimed forward, timed backward)."""
        if mode == "backward":
            return (lambda: self.step("forward"), lambda loss: loss.backward())
        return lambda: self.step(mode)


def _rotation_grid(x: torch.Tensor, angle: float) -> torch.Tensor:
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=x.dtype, device=x.device).expand(x.shape[0], 2, 3)
    return TF.affine_grid(theta, list(x.shape), align_corners=False)


def gridsample_lie_regularizer(x_hat: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """‖(f(rot_ε x̂) − rot_ε f(x̂)) / ε‖² with f = conv(·, B): the finite-difference Lie derivative of the
    relaxation branch along the rotation generator, by resampling (two extra convolutions, two grid_samples)."""
    grid = _rotation_grid(x_hat, EPS_ROT)
    f_rot = TF.conv2d(TF.grid_sample(x_hat, grid, align_corners=False), B, padding=PAD)
    f = TF.conv2d(x_hat, B, padding=PAD)
    rot_f = TF.grid_sample(f, _rotation_grid(f, EPS_ROT), align_corners=False)
    return ((f_rot - rot_f) / EPS_ROT).square().sum()


def providers_on(device: torch.device):
    return tuple(p for p in PROVIDERS if p != "triton" or device.type == "cuda")


def verify(c: int, device=torch.device("cpu")) -> Dict[str, float]:
    """Relative errors of the fused (and Triton) and reference float32 steps against the float64 reference."""
    truth = Step("reference", c, dtype=torch.float64, device=device)
    loss64 = truth.step("full").item()
    grads64 = [t.grad for t in truth.leaves()]
    errors = {}
    for name in [p for p in providers_on(device) if p in ("fused", "triton", "reference")]:
        s = Step(name, c, device=device)
        loss = s.step("full").item()
        err = abs(loss - loss64) / abs(loss64)
        for t, g64 in zip(s.leaves(), grads64):
            err = max(err, ((t.grad.double() - g64).norm() / g64.norm()).item())
        errors[name] = err
    return errors


def machine_info(device=torch.device("cpu")) -> dict:
    return harness_machine_info(device, DTYPE, batch=BATCH, side=SIDE, k=K, padding=PAD, theta=THETA, **{"lambda": LAMBDA})


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark:  pytest benchmarks/bench_relaxed_conv2d.py --benchmark-only
# ----------------------------------------------------------------------------------------------------

_PARAMS = [(c, mode, name) for c in CHANNELS for mode in MODES for name in providers_on(torch.device("cpu"))]

if pytest is not None:
    @pytest.mark.parametrize("channels,mode,provider", _PARAMS, ids=[f"C{c}-{m}-{n}" for c, m, n in _PARAMS])
    def test_relaxed_conv2d_step(benchmark, channels, mode, provider):
        s = Step(provider, channels)
        if s.verifiable:
            err = verify(channels)[provider]
            assert err <= TOL, f"{provider}: relative error {err:.2e} against float64 > {TOL}"
        benchmark.group = f"C={channels} {mode}"
        benchmark.extra_info.update(machine_info())
        benchmark.extra_info.update(provider=provider, mode=mode, channels=channels)
        pedantic(benchmark, s.timed(mode), rounds=5)


# ----------------------------------------------------------------------------------------------------
# Standalone runner: interleaved timing, JSON + markdown
# ----------------------------------------------------------------------------------------------------

def markdown_report(results: dict) -> str:
    meta = results["meta"]
    names = results["providers"]
    lines = [f"## relaxed conv2d + regulariser, one training step ({meta['dtype']}, {meta['device']})", ""]
    lines += describe_machine(meta) + [
        f"- B = {meta['batch']}, {meta['side']}×{meta['side']}, k = {meta['k']}, padding {meta['padding']}",
        "- median ms per step over interleaved repeats (providers round-robin); ratios of medians", ""]
    for mode in MODES:
        lines += [f"### mode `{mode}`", "", "| C | repeats | " + " | ".join(names) + " | "
                  + " | ".join(f"{lbl} (target ≥ {b})" for lbl, _, _, b in TARGETS) + " |",
                  "|---|---:|" + "---:|" * len(names) + "---|" * len(TARGETS)]
        for row in results["rows"]:
            if row["mode"] != mode:
                continue
            med = row["median_ms"]
            cells = []
            for _lbl, num, den, bound in TARGETS:
                ratio = med[num] / med[den]
                verdict = ("PASS" if ratio >= bound else "MISS") if mode == "full" else f"(n/a: {mode})"
                cells.append(f"{ratio:.2f} {verdict}")
            lines.append(f"| {row['channels']} | {row['repeats']} | " + " | ".join(f"{med[p]:.2f}" for p in names)
                         + " | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Agreement with the float64 reference (full step, max relative error of loss and gradients): "
              + ", ".join(f"C={c}: " + ", ".join(f"{k} {v:.1e}" for k, v in e.items())
                          for c, e in results["verification"].items()), ""]
    return "\n".join(lines)


def run(args) -> int:
    device = resolve_device(args.device)
    names = providers_on(device)
    results = {"meta": machine_info(device), "providers": names, "rows": [], "verification": {}, "targets": []}
    status = 0
    for c in (CHANNELS[:1] if args.quick else CHANNELS):
        errors = verify(c, device)
        results["verification"][c] = errors
        print(f"C={c}: relative errors vs float64 {errors}", flush=True)
        if max(errors.values()) > TOL:
            status = 1
        impls = {name: Step(name, c, device=device) for name in names}
        for mode in MODES:
            times = time_round_robin({k: i.timed(mode) for k, i in impls.items()}, 3, 1, device, args.budget, 50)
            stats = {name: median_iqr_ms(ts) for name, ts in times.items()}
            med = {k: v[0] for k, v in stats.items()}
            row = {"channels": c, "mode": mode, "repeats": len(times["fused"]), "median_ms": med,
                   "iqr_ms": {k: v[1] for k, v in stats.items()},
                   "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()}}
            results["rows"].append(row)
            results["targets"] += [target("relaxed_conv2d", lbl, f"B={BATCH} C={c} {SIDE}×{SIDE} k={K}",
                                          med[n] / med[d], b if mode == "full" else None, ">=", mode, str(device))
                                   for lbl, n, d, b in TARGETS]
            if "triton" in med:
                results["targets"].append(target("relaxed_conv2d", "triton / fused (CUDA)", f"C={c}",
                                                 med["triton"] / med["fused"], None, mode=mode, device=str(device)))
            print(f"C={c} {mode}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items())
                  + " | " + ", ".join(f"{lbl} {med[n] / med[d]:.2f}" for lbl, n, d, _ in TARGETS), flush=True)
    md = markdown_report(results)
    if not args.no_save:
        out = Path(args.out_dir)
        stem = "relaxed_conv2d" + result_suffix(device, args.quick)
        write_json(out / f"{stem}.json", results)
        (out / f"{stem}.md").write_text(md + "\n")
        print(f"wrote {out / stem}.json and .md")
    print(md)
    return status


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short timing budget, one size (smoke run)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per size and mode")
    ap.add_argument("--no-save", action="store_true", help="print only, do not write the results")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 3.0 if args.quick else 20.0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
