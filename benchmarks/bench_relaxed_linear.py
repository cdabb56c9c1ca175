"""One training step of a relaxed Vector-Neuron linear layer VN(C) -> VN(C): providers side by side.

Workload (DESIGN §1, §4): x [N, C, 3] float32 (D = 3C), f(x) = W_eq x + θ (W_r x + b_r) with θ = 0.5,
loss = (y · g).sum() + λ_LD √R_LD + λ_N √R_N (the paper's form, relaxeq_fast.combine_regularizers)
with a fixed random g. Modes:
  forward  loss value as in training (autograd recording on, no backward): forward + regulariser
  backward the backward alone (grads of x, W_eq, W_r, b_r): the forward that builds its graph runs untimed first
  full     forward + regulariser + backward

Providers (one definition each, shared by the pytest-benchmark tests and the standalone runner):
  fused      RelaxedLinear(backend="native"): one C++ (CPU) or CUDA pass gives y and (G, s); closed-form
             regulariser
  triton     RelaxedLinear(backend="triton"): the Triton kernel (CUDA devices only)
  reference  the same layer with backend="reference" (pure PyTorch closed form)
  compiled   torch.compile of the reference step (forward + regulariser; backward through AOTAutograd)
  compiled_fused  the same compiled step on the fused op (reported, not targeted)
  paper      the paper code's approach: separate equivariant / relaxation maps, dense generators
             A_k = I_C ⊗ G_k [D, D], Lie derivative by re-running the relaxation map per generator
  plain      the unrelaxed EquivariantLinear (no regulariser): reported, not targeted
  floor      the four matmuls any exact implementation needs: y = x Mᵀ, G = xᵀx, dx = dy M, dM = dyᵀx
             (forward mode: the first two)

Run:
  python benchmarks/bench_relaxed_linear.py [--quick]         # runner: JSON + markdown + PNG in benchmarks/results/
  python benchmarks/bench_relaxed_linear.py --device cuda     # on a GPU: CUDA events, achieved bandwidth
  python benchmarks/bench_relaxed_linear.py --profile         # where the fused step's time goes
  pytest benchmarks/ --benchmark-only                         # pytest-benchmark, one group per size and mode
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from relaxeq_fast import combine_regularizers
from relaxeq_fast.backend import cuda_fused_max_dim
from relaxeq_fast.bench import (achieved_bandwidth, describe_machine, machine_info as harness_machine_info,
                                median_iqr_ms, pedantic, resolve_device, result_suffix, roofline, run_once,
                                target, time_round_robin, write_json)
# the workload, its providers and the agreement check (benchmarks/ is on sys.path: the script's folder, and
# pytest's rootdir-relative import of bench_*.py)
from relaxed_linear_problem import (DTYPE, LAMBDA_LD, LAMBDA_N, MODES, PROVIDERS, THETA, MatmulFloorImpl,
                                    RelaxedLayerImpl, assert_agreement, build_providers, format_verification,
                                    make_problem, size_label, verify)

try:  # the runner works without pytest; the benchmark tests need it
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

THREADS = 2
torch.set_num_threads(THREADS)

SIZES: Tuple[Tuple[int, int], ...] = ((7200, 21), (144000, 21), (7200, 64), (7200, 341))  # (rows N, VN channels C)
QUICK_SIZES: Tuple[Tuple[int, int], ...] = ((2048, 21),)

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Targets the project sets for the full step (DESIGN/plan): name, numerator, denominator, kind, bound.
TARGETS = (
    ("paper-style / fused", "paper", "fused", ">=", 5.0),
    ("fused / floor", "fused", "floor", "<=", 1.5),
    ("compiled / fused", "compiled", "fused", ">=", 1.2),
    ("compiled / compiled fused", "compiled", "compiled_fused", None, None),
    ("fused / plain", "fused", "plain", None, None),
)
FLOOR_MIN_MS = 20.0  # the fused/floor target applies only where the floor takes longer than this


# ----------------------------------------------------------------------------------------------------
# Machine description
# ----------------------------------------------------------------------------------------------------

def machine_info(device: torch.device = torch.device("cpu")) -> dict:
    return harness_machine_info(device, DTYPE, theta=THETA, lambda_ld=LAMBDA_LD, lambda_n=LAMBDA_N)


def op_bytes(n: int, d: int, mode: str, d_out: Optional[int] = None) -> float:
    """Compulsory DRAM bytes of the relaxed_linear op itself (float32, x [N, D], M [D_out, D]): the forward
    reads x and M and writes y, G, s; the backward reads dy, x and M and writes dx, dM, dc. The step's loss and
    regulariser algebra add a few more passes, so bytes / step time under-states the kernels' own bandwidth."""
    o = d if d_out is None else d_out
    fwd = 4 * (n * d + n * o + o * d + d * d + d)
    return fwd + (4 * (n * o + 2 * n * d + 2 * o * d + o) if mode == "full" else 0)


def op_flops(n: int, d: int, mode: str) -> float:
    """y = x Mᵀ and G = xᵀx (2·N·D² each); the backward adds dx = dy M and dM = dyᵀx."""
    return 4 * n * d * d * (2 if mode == "full" else 1)


# ----------------------------------------------------------------------------------------------------
# pytest-benchmark:  pytest benchmarks/ --benchmark-only   (benchmarks/conftest.py collects bench_*.py)
# ----------------------------------------------------------------------------------------------------

# Seconds of timed rounds per (provider, size, mode); rounds in [MIN_ROUNDS, MAX_ROUNDS]. With 2 threads
# the whole file (48 cells, 4 compiles, 4 float64 checks) stays within about 8 minutes.
BENCH_BUDGET_S = float(os.environ.get("RELAXEQ_BENCH_BUDGET", "2.0"))
MIN_ROUNDS, MAX_ROUNDS = 3, 200

_setup_cache: Dict[Tuple[int, int], tuple] = {}


def _setup(size):
    """Problem, providers and verification for one size, built once and kept while that size runs."""
    if size not in _setup_cache:
        _setup_cache.clear()  # one size in memory at a time
        gc.collect()
        p = make_problem(*size)
        impls, unavailable = build_providers(p)
        report = verify(p, impls)
        print("\n" + format_verification(p.label, report))
        _setup_cache[size] = (p, impls, unavailable, report)
    return _setup_cache[size]


_BENCH_PARAMS = [(size, mode, name) for size in SIZES for mode in MODES for name in PROVIDERS]

if pytest is not None:
    @pytest.mark.parametrize("size,mode,provider", _BENCH_PARAMS,
                             ids=[f"{size_label(s)}-{m}-{n}" for s, m, n in _BENCH_PARAMS])
    def test_relaxed_linear_step(benchmark, size, mode, provider):
        p, impls, unavailable, report = _setup(size)
        if provider in unavailable:
            pytest.skip(unavailable[provider])
        impl = impls[provider]
        if impl.verifiable:
            assert_agreement(p.label, report, provider)
        t0 = time.perf_counter()
        run_once(impl.timed(mode))  # warm this mode and size the rounds
        t_one = time.perf_counter() - t0
        rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, math.ceil(BENCH_BUDGET_S / max(t_one, 1e-6))))
        benchmark.group = f"{p.label} {mode}"
        benchmark.extra_info.update(machine_info())
        benchmark.extra_info.update(provider=provider, mode=mode, n=p.n, channels=p.c, d=p.d)
        if impl.verifiable:
            benchmark.extra_info["max_rel_err_vs_f64"] = max(report[provider]["errors"].values())
        pedantic(benchmark, impl.timed(mode), rounds)


# ----------------------------------------------------------------------------------------------------
# Standalone runner: round-robin timing, JSON + markdown + PNG
# ----------------------------------------------------------------------------------------------------

def row_targets(n: int, c: int, medians_ms: Dict[str, float], mode: str, unavailable: Dict[str, str],
                device: str) -> List[dict]:
    """The TARGETS ratios of one size and mode; bounds apply to the full step only, and fused / floor only
    where the floor takes more than FLOOR_MIN_MS."""
    out = []
    for label, num, den, kind, bound in TARGETS:
        a, b = medians_ms.get(num), medians_ms.get(den)
        ratio = None if a is None or b is None else a / b
        note = next((f"{k} unavailable" for k in (num, den) if k in unavailable), "")
        applies = kind is not None and mode == "full"
        if applies and den == "floor" and b is not None and b <= FLOOR_MIN_MS:
            applies, note = False, f"n/a: floor {b:.1f} ms ≤ {FLOOR_MIN_MS:g}"
        out.append(target("relaxed_linear", label, f"N={n} C={c}", ratio, bound if applies else None, kind or ">=",
                          mode, device, note))
    return out


def ratio_cell(t: dict) -> str:
    if t["ratio"] is None:
        return f"n/a ({t['note']})" if t["note"] else "n/a"
    if t["note"]:
        return f"{t['ratio']:.2f} ({t['note']})"
    return f"{t['ratio']:.2f}" if t["pass"] is None else f"{t['ratio']:.2f} {'PASS' if t['pass'] else 'MISS'}"


def markdown_report(results: dict) -> str:
    meta = results["meta"]
    out = [f"## relaxed VN linear layer, one training step ({meta['dtype']}, {meta['device']})", ""]
    out += describe_machine(meta) + [
        f"- θ = {meta['theta']}, λ_LD = {meta['lambda_ld']}, λ_N = {meta['lambda_n']}",
        "- median ms per step over interleaved repeats (providers round-robin"
        + ("; CUDA events, L2 flushed before each call" if meta["device"].startswith("cuda") else "")
        + "); ratios of medians"]
    compile_s = {f"{r['n']}x{r['c']}": r["compile_s"] for r in results["rows"] if r.get("compile_s") is not None}
    if compile_s:
        out.append("- torch.compile + first steps (untimed warm-up), s: "
                   + ", ".join(f"{k} {v:.1f}" for k, v in compile_s.items()))
    out.append("")
    labels = {name: PROVIDERS[name][0] for name in PROVIDERS}
    for mode in results["modes"]:
        rows = [r for r in results["rows"] if r["mode"] == mode]
        if not rows:
            continue
        names = [n for n in PROVIDERS if any(n in r["median_ms"] or n in r["unavailable"] for r in rows)]
        what = {"full": "forward + regulariser + backward",
                "forward": "forward + regulariser value, no backward (targets apply to the full step)",
                "backward": "the backward alone, its graph built untimed before each call"}[mode]
        out += [f"### mode `{mode}`: {what}", "",
                "| N × C (D) | repeats | " + " | ".join(labels[n] for n in names) + " |",
                "|---|---:|" + "---:|" * len(names)]
        for r in rows:
            cells = []
            for n in names:
                if n in r["unavailable"]:
                    cells.append(f"— ({r['unavailable'][n]})")
                elif r["median_ms"].get(n) is None:
                    cells.append("—")
                else:
                    flag = "" if r["verified"].get(n, True) else " MISMATCH"
                    cells.append(f"{r['median_ms'][n]:.2f}{flag}")
            out.append(f"| {r['n']} × {r['c']} ({3 * r['c']}) | {r['repeats']} | " + " | ".join(cells) + " |")
        out += ["", "| N × C (D) | " + " | ".join(
            f"{t[0]}" + (f" (target {t[3]} {t[4]:g})" if t[3] and mode == "full" else "") for t in TARGETS) + " |",
            "|---|" + "---|" * len(TARGETS)]
        for r in rows:
            out.append(f"| {r['n']} × {r['c']} | " + " | ".join(ratio_cell(t) for t in r["targets"]) + " |")
        out.append("")
    bw = [r for r in results["rows"] if r.get("bandwidth")]
    if bw:
        out += ["### achieved bandwidth (GPU): the op's compulsory bytes / the whole step's median time", "",
                "| N × C | mode | provider | bytes | GB/s | of datasheet peak |", "|---|---|---|---:|---:|---:|"]
        for r in bw:
            for name, b in r["bandwidth"].items():
                frac = "—" if b["fraction_of_peak"] is None else f"{100 * b['fraction_of_peak']:.0f}%"
                out.append(f"| {r['n']} × {r['c']} | {r['mode']} | {name} | {b['bytes'] / 1e6:.1f} MB "
                           f"| {b['gb_per_s']:.0f} | {frac} |")
        out.append("")
    out += ["### roofline estimate for the fused op on an H100 (an ESTIMATE from datasheet peaks, not a "
            "measurement)", "", "| N × C (D) | mode | bytes | FLOPs | FLOP/byte | memory-bound µs | FP32 µs "
            "| TF32 µs | bound (FP32) |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["rows"]:
        e32, etf = r["roofline"]["fp32"], r["roofline"]["tf32"]
        out.append(f"| {r['n']} × {r['c']} ({3 * r['c']}) | {r['mode']} | {e32['bytes'] / 1e6:.1f} MB "
                   f"| {e32['flops'] / 1e9:.2f} G | {e32['intensity_flop_per_byte']:.1f} | {e32['t_memory_us']:.1f} "
                   f"| {e32['t_math_us']:.1f} | {etf['t_math_us']:.1f} | {e32['bound']} |")
    out.append("")
    if results.get("mismatches"):
        out += ["**Provider mismatches (see JSON for all errors):** " + "; ".join(results["mismatches"]), ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in results["modes"] if any(r["mode"] == m for r in results["rows"])]
    fig, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4.8), squeeze=False)
    names = list(PROVIDERS)
    width = 0.8 / len(names)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in results["rows"] if r["mode"] == mode]
        for j, name in enumerate(names):
            xs, hs = [], []
            for i, r in enumerate(rows):
                v = r["median_ms"].get(name)
                if v is not None:
                    xs.append(i + (j - (len(names) - 1) / 2) * width)
                    hs.append(v)
            bars = ax.bar(xs, hs, width, label=PROVIDERS[name][0])
            for b, (i, r) in zip(bars, [(i, r) for i, r in enumerate(rows) if r["median_ms"].get(name) is not None]):
                fused = r["median_ms"].get("fused")
                if fused and name != "fused":
                    ax.annotate(f"{b.get_height() / fused:.1f}×", (b.get_x() + b.get_width() / 2, b.get_height()),
                                ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(rows)), [f"{r['n']}×{r['c']}\n(D={3 * r['c']})" for r in rows])
        ax.set_yscale("log")
        top = max((v for r in rows for v in r["median_ms"].values() if v is not None), default=1.0)
        ax.set_ylim(top=top * 4)  # headroom for the labels
        ax.set_ylabel("median ms per step (log)")
        ax.set_title(f"mode: {mode} (labels: time / fused)")
        ax.grid(axis="y", which="both", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(names), fontsize=8)
    meta = results["meta"]
    where = (meta["gpu"]["name"] if isinstance(meta.get("gpu"), dict) and meta["device"].startswith("cuda")
             else f"{meta['threads']} threads, {meta['cpu_model']}")
    fig.suptitle(f"relaxed VN linear step, {meta['dtype']}, {where}, "
                 f"torch {meta['torch']}" + (" [quick]" if meta.get("quick") else ""), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args) -> int:
    device = resolve_device(args.device)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")] if args.sizes else \
        list(QUICK_SIZES if args.quick else SIZES)
    modes = args.modes.split(",") if args.modes else list(MODES)
    names = args.providers.split(",") if args.providers else list(PROVIDERS)
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: expected a subset of {MODES}, got {m!r}")
    for n in names:
        if n not in PROVIDERS:
            raise SystemExit(f"--providers: expected a subset of {tuple(PROVIDERS)}, got {n!r}")
    meta = machine_info(device)
    meta.update(quick=args.quick, budget_s=args.budget, min_repeats=args.min_repeats, warmup=args.warmup)
    results = {"meta": meta, "modes": modes, "rows": [], "verification": {}, "mismatches": [], "targets": []}
    for size in sizes:
        t0 = time.perf_counter()
        p = make_problem(*size, device=device)
        impls, unavailable = build_providers(p, names)
        compile_s = getattr(impls.get("compiled"), "compile_s", None)
        report = verify(p, impls)
        print(format_verification(p.label, report), flush=True)
        results["verification"][p.label] = report
        verified = {k: r["ok"] for k, r in report.items() if k not in ("closed_form_vs_direct_f64", "truth")}
        if not report["closed_form_vs_direct_f64"]["ok"]:
            results["mismatches"].append(f"{p.label}: closed form vs direct float64 sums")
        results["mismatches"] += [f"{p.label}: {k}" for k, ok in verified.items() if not ok]
        for mode in modes:
            times = time_round_robin({k: i.timed(mode) for k, i in impls.items()},
                                     args.min_repeats, args.warmup, device, args.budget, args.max_repeats)
            stats = {k: median_iqr_ms(v) for k, v in times.items()}
            med = {k: v[0] for k, v in stats.items()}
            row = {"n": p.n, "c": p.c, "mode": mode, "repeats": len(next(iter(times.values()))),
                   "median_ms": med, "iqr_ms": {k: v[1] for k, v in stats.items()},
                   "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
                   "unavailable": unavailable, "verified": verified, "compile_s": compile_s,
                   "roofline": {u: roofline(op_bytes(p.n, p.d, mode), op_flops(p.n, p.d, mode), "H100", u)
                                for u in ("fp32", "tf32")}}
            if device.type == "cuda":
                row["bandwidth"] = {k: achieved_bandwidth(op_bytes(p.n, p.d, mode), med[k] / 1e3, meta)
                                    for k in ("fused", "triton") if k in med}
            row["targets"] = row_targets(p.n, p.c, med, mode, unavailable, str(device))
            results["rows"].append(row)
            results["targets"] += row["targets"]
            print(f"{p.label} {mode}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items())
                  + "".join(f", {k}: {v}" for k, v in unavailable.items()), flush=True)
        print(f"{p.label}: {time.perf_counter() - t0:.1f} s (compile {compile_s and round(compile_s, 1)} s)",
              flush=True)
        del impls
        gc.collect()
    out_dir = Path(args.out_dir)
    stem = "relaxed_linear" + result_suffix(device, args.quick)
    write_json(out_dir / f"{stem}.json", results)
    md = markdown_report(results)
    (out_dir / f"{stem}.md").write_text(md + "\n")
    plot(results, out_dir / f"{stem}.png")
    print("\n" + md)
    print(f"wrote {out_dir / stem}.json, .md and .png")
    return 1 if results["mismatches"] else 0


# ----------------------------------------------------------------------------------------------------
# Profile of the fused step
# ----------------------------------------------------------------------------------------------------

def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile_fused(size: Tuple[int, int], steps: int) -> None:
    """Where the fused full step's time goes: a phase breakdown timed piece by piece, then torch.profiler."""
    from relaxeq_fast.functional import InputStats
    from relaxeq_fast.regularizer import relaxation_regularizers

    p = make_problem(*size)
    impl = RelaxedLayerImpl(p, "native")
    floor = MatmulFloorImpl(p)
    layer = impl.layer
    xf = p.x.reshape(p.n, p.d)
    with torch.no_grad():
        M, c = layer.effective_params()
    dy = p.g.reshape(p.n, p.d).contiguous()
    _, G, s = torch.ops.relaxeq.relaxed_linear(xf, M, c, True)
    stats = InputStats(G, s, p.n)
    W_r = layer.weight_relax.detach().clone().requires_grad_(True)
    b_r = layer.bias_relax.detach().clone().requires_grad_(True)

    def regularizer_algebra():
        terms = relaxation_regularizers(W_r, b_r, layer.irreps_in, layer.irreps_out, stats)
        combine_regularizers([terms], LAMBDA_LD, LAMBDA_N, "paper").backward()

    def gemm(a, b):
        return lambda: torch.mm(a, b)

    phases = {
        "full step (fused provider)": lambda: impl.step("full"),
        "  relaxeq::relaxed_linear (y, G, s)": lambda: torch.ops.relaxeq.relaxed_linear(xf, M, c, True),
        "  relaxeq::relaxed_linear_backward (dx, dM, dc)":
            lambda: torch.ops.relaxeq.relaxed_linear_backward(dy, xf, M, [True, True, True]),
        "  regulariser algebra on (G, s, N), fwd + bwd": regularizer_algebra,
        "floor: 4 GEMMs": lambda: floor.step("full"),
        "  floor y = x Mᵀ": gemm(xf, M.t()),
        "  floor G = xᵀx": gemm(xf.t(), xf),
        "  floor dx = dy M": gemm(dy, M),
        "  floor dM = dyᵀx": gemm(dy.t(), xf),
    }
    print(f"fused step at {p.label} (D = {p.d}), {torch.get_num_threads()} threads, median of {steps} runs each:")
    t = {k: 1e3 * _median_time(fn, steps) for k, fn in phases.items()}
    for k, v in t.items():
        print(f"  {k:52s} {v:9.2f} ms")
    parts = sum(t[k] for k in list(phases)[1:4])
    print(f"  {'  rest (params, kron, task loss, autograd)':52s} {t['full step (fused provider)'] - parts:9.2f} ms")
    print(f"  fused / floor = {t['full step (fused provider)'] / t['floor: 4 GEMMs']:.2f}")

    from torch.profiler import ProfilerActivity, profile
    for what, fn in (("fused full step", lambda: impl.step("full")), ("regulariser algebra", regularizer_algebra)):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS)
        # The profiler records the calling thread's ops only: the chunks the native kernel runs on the other
        # OpenMP threads are missing (with 2 threads, half of its addmm_ calls), so these shares under-count
        # the kernel's GEMMs. The timed phase breakdown above is the reliable split.
        print(f"\ntorch.profiler, {steps} x {what} at {p.label}: recorded self CPU time per call "
              f"{total / steps / 1e3:.1f} ms, GEMMs ({', '.join(sorted(GEMM_OPS))}) {100 * gemm / total:.0f}%, "
              f"other ops {100 * (total - gemm) / total:.0f}% (calling thread only)")
        print(events.table(sort_by="self_cpu_time_total", row_limit=15))


OP_ROUTE_SIZES = ((144000, 9, 63), (144000, 63, 63), (7200, 63, 63), (7200, 126, 126), (7200, 255, 255),
                  (7200, 1023, 1023), (24, 1023, 1023))


def op_routes(device: torch.device, repeats: int = 20) -> dict:
    """The raw CUDA op, forward (y, G, s) and backward (dx, dM, dc), through each of its routes — the tiled
    kernel and cuBLAS, forced with relaxeq_fast.backend.cuda_fused_max_dim — and through the Triton op; median
    ms per call (CUDA events, L2 flushed), with the op's compulsory bytes / time. Sets the default switch."""
    from relaxeq_fast.triton_kernels import relaxed_linear as triton_rl
    meta = machine_info(device)
    rows = []
    for n, d_in, d_out in OP_ROUTE_SIZES:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(n, d_in, generator=gen).to(device)
        M = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device)
        c = torch.randn(d_out, generator=gen).to(device)
        dy = torch.randn(n, d_out, generator=gen).to(device)
        row = {"n": n, "d_in": d_in, "d_out": d_out, "median_ms": {}}
        tri = triton_rl.op()
        for route, max_dim in (("tiled", 100000), ("cublas", 0), ("triton", None)):
            fwd = (lambda: torch.ops.relaxeq.relaxed_linear(x, M, c, True)) if max_dim is not None else \
                (lambda: tri(x, M, c, True))
            bwd = (lambda: torch.ops.relaxeq.relaxed_linear_backward(dy, x, M, [True, True, True])) \
                if max_dim is not None else None
            fns = {f"{route} forward": fwd}
            if bwd is not None:
                fns[f"{route} backward"] = bwd
            with cuda_fused_max_dim(max_dim) if max_dim is not None else contextlib.nullcontext():
                times = time_round_robin(fns, repeats, 3, device)
            for k, v in times.items():
                row["median_ms"][k] = median_iqr_ms(v)[0]
        for mode, fwd_only in (("forward", True), ("backward", False)):
            fwd_bytes = op_bytes(n, d_in, "forward", d_out)
            bytes_ = fwd_bytes if fwd_only else op_bytes(n, d_in, "full", d_out) - fwd_bytes
            for k, v in row["median_ms"].items():
                if k.endswith(mode):
                    row.setdefault("gb_per_s", {})[k] = bytes_ / (v / 1e3) / 1e9
        rows.append(row)
        print(f"{n}x{d_in}x{d_out}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in row["median_ms"].items()), flush=True)
    return {"meta": meta, "rows": rows}


def op_routes_markdown(res: dict) -> str:
    keys = ["tiled forward", "cublas forward", "triton forward", "tiled backward", "cublas backward"]
    out = ["## relaxed_linear op alone on the GPU: tiled CUDA kernel vs cuBLAS vs Triton (float32)", ""]
    out += describe_machine(res["meta"]) + ["- median ms per call (CUDA events, L2 flushed), 20 calls each; "
                                            "GB/s = the op's compulsory bytes / time", "",
                                            "| N × D_in × D_out | " + " | ".join(keys) + " |",
                                            "|---|" + "---:|" * len(keys)]
    for r in res["rows"]:
        cells = [f"{r['median_ms'][k]:.3f} ({r['gb_per_s'][k]:.0f} GB/s)" if k in r["median_ms"] else "—"
                 for k in keys]
        out.append(f"| {r['n']} × {r['d_in']} × {r['d_out']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addmv_",
                      "aten::mv", "aten::dot"})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="small sizes, few repeats: checks the pipeline end to end, not for numbers")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    ap.add_argument("--sizes", help="comma-separated NxC, e.g. 7200x21,7200x341 (default: all)")
    ap.add_argument("--modes", help=f"comma-separated subset of {MODES}")
    ap.add_argument("--providers", help=f"comma-separated subset of {tuple(PROVIDERS)}")
    ap.add_argument("--budget", type=float, help="seconds of timed repeats per size and mode (default 30, quick 2)")
    ap.add_argument("--min-repeats", type=int, help="default 5, quick 3")
    ap.add_argument("--max-repeats", type=int, default=200)
    ap.add_argument("--warmup", type=int, help="untimed rounds before timing (default 2, quick 1)")
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--profile", action="store_true", help="profile the fused step (at the largest size) and exit")
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--op-routes", action="store_true",
                    help="only (CUDA): the raw op through its tiled kernel, cuBLAS and Triton, per size")
    args = ap.parse_args(argv)
    if args.op_routes:
        device = resolve_device(args.device)
        if device.type != "cuda":
            raise SystemExit("--op-routes: needs --device cuda (the routes are those of the CUDA op)")
        res = op_routes(device)
        out_dir = Path(args.out_dir)
        write_json(out_dir / "relaxed_linear_op_routes_cuda.json", res)
        md = op_routes_markdown(res)
        (out_dir / "relaxed_linear_op_routes_cuda.md").write_text(md)
        print(md)
        return 0
    if args.budget is None:
        args.budget = 2.0 if args.quick else 30.0
    if args.min_repeats is None:
        args.min_repeats = 3 if args.quick else 5
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.profile:
        size = tuple(int(v) for v in args.sizes.split(",")[0].split("x")) if args.sizes else SIZES[-1]
        profile_fused(size, args.profile_steps)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
