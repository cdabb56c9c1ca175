"""Benchmark harness shared by ``benchmarks/bench_*.py``, and the ``relaxeq-bench`` console script.

The harness: machine description (CPU, threads, versions, the GPU or the plain statement that none was
present), interleaved timing on CPU (``time.perf_counter``) or CUDA (CUDA events, L2 flushed before each
call, as ``triton.testing.do_bench`` does), median ± IQR, peak memory of one call, a datasheet table of
GPU peaks for achieved-bandwidth figures and roofline *estimates*, and one results format (JSON with a
``targets`` list) that the runner gathers into a summary table and chart.

    relaxeq-bench                      # every benchmark on the default device (CUDA if present, else CPU)
    relaxeq-bench --quick              # short budgets: checks the pipeline, not for numbers
    relaxeq-bench --only train_step --device cuda
    pytest benchmarks/ --benchmark-only   # the same providers under pytest-benchmark (tiny sizes)
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

BENCHMARKS = ("relaxed_linear", "vn_layers", "relaxed_conv2d", "train_step")
# Every benchmark times forward, backward and the full step (relaxed_linear and relaxed_conv2d by default).
# train_step also compiled: issue 12's compiled targets (adds minutes of compiling)
ALL_MODES_ARGS = {"vn_layers": ["--modes", "full,forward,backward"],
                  "train_step": ["--forward", "--backward", "--compile"]}
NO_GPU = "no GPU present: CUDA and Triton providers were not run; all times are CPU times"

# Datasheet peaks (SXM parts, dense, no sparsity): HBM bandwidth B/s, FP32 FLOP/s (CUDA cores), TF32 and
# BF16 tensor-core FLOP/s. Matched against torch.cuda.get_device_name; used for the achieved-bandwidth
# column and the roofline estimates, which are labelled as estimates wherever they are printed.
GPU_PEAKS = {
    "H200": dict(bandwidth=4.8e12, fp32=67e12, tf32=495e12, bf16=989e12),
    "H100": dict(bandwidth=3.35e12, fp32=67e12, tf32=495e12, bf16=989e12),
    "A100": dict(bandwidth=2.039e12, fp32=19.5e12, tf32=156e12, bf16=312e12),
}


# ------------------------------------------------------------------------------------------------
# Machine
# ------------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_peaks(name: str) -> Optional[dict]:
    for key, peaks in GPU_PEAKS.items():
        if key in name:
            return dict(peaks, matched=key)
    return None


def gpu_info(device: torch.device) -> dict:
    """The GPU behind ``device`` (called only when a benchmark runs there, never at import)."""
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2 ** 30, 1), "cuda": torch.version.cuda,
            "datasheet_peaks": gpu_peaks(props.name)}


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda if a GPU is visible, else cpu; 'cuda' without a GPU is an error naming the option."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA GPU is visible on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device: expected auto, cpu or cuda, got {name!r}")
    return dev


def loadavg() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def machine_info(device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32, **extra) -> dict:
    import relaxeq_fast
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    info = {
        "machine": f"{platform.node()} ({platform.machine()}, {platform.system()} {platform.release()})",
        "cpu_model": cpu_model(), "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
        "device": str(device), "dtype": str(dtype).replace("torch.", ""), "torch": torch.__version__,
        "triton": triton_version, "python": platform.python_version(), "relaxeq_fast": relaxeq_fast.__version__,
        "native_build": relaxeq_fast.build_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "loadavg_start": loadavg(),
    }
    info["gpu"] = gpu_info(device) if device.type == "cuda" else NO_GPU if not torch.cuda.is_available() else \
        "a GPU is present but this run used the CPU"
    info.update(extra)
    return info


def describe_machine(meta: dict) -> List[str]:
    """Markdown bullet lines for a report's header."""
    gpu = meta.get("gpu")
    gpu_line = (f"GPU: {gpu['name']} ({gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']})"
                if isinstance(gpu, dict) else f"**{gpu}**")
    return [f"- machine: {meta['machine']}; CPU: {meta['cpu_model']} ({meta['logical_cpus']} logical CPUs, "
            f"{meta['threads']} torch threads); {gpu_line}",
            f"- torch {meta['torch']}, triton {meta['triton']}, relaxeq_fast {meta['relaxeq_fast']}, python "
            f"{meta['python']}; device {meta['device']}, {meta['dtype']}",
            f"- {meta['date']}; command: `{meta['command']}`; load average at start {meta['loadavg_start']}"
            + (f", at end {meta['loadavg_end']}" if meta.get("loadavg_end") else "")]


# ------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------

class _L2Flush:
    """Writes a buffer larger than the GPU's L2 before each timed call, so no call starts on a warm cache."""

    def __init__(self, device: torch.device):
        self.buf = torch.empty(256 * 2 ** 20 // 4, dtype=torch.int32, device=device)

    def __call__(self):
        self.buf.zero_()


def _setup_and_call(f) -> tuple:
    """A timed entry ``fn`` or ``(setup, fn)`` as the pair (setup, call): ``call(setup())`` runs it, and only
    ``call`` is timed."""
    return f if isinstance(f, tuple) else ((lambda: None), (lambda _: f()))


def time_round_robin(fns: Dict[str, object], repeats: int, warmup: int = 1,
                     device: torch.device = torch.device("cpu"), budget_s: Optional[float] = None,
                     max_repeats: int = 200) -> Dict[str, List[float]]:
    """Seconds per call of every function, interleaved: each repeat calls every one once, in an order
    rotated by one per repeat, so all see the same machine state. With ``budget_s`` the repeat count grows
    from ``repeats`` until the timed rounds would take about that long (at most ``max_repeats``).
    On CUDA each call is bracketed by CUDA events (after an L2 flush) and the device is synchronised once
    per round. An entry may be a pair ``(setup, fn)``: ``setup()`` runs untimed (e.g. the forward that
    builds the graph a backward-only timing needs) and its result is passed to ``fn``."""
    names = list(fns)
    fns = {n: _setup_and_call(f) for n, f in fns.items()}
    cuda = device.type == "cuda"
    flush = _L2Flush(device) if cuda else None
    t_round = 0.0
    for _ in range(max(1, warmup)):
        t0 = time.perf_counter()
        for name in names:
            run_once(fns[name])
        synchronize(device)
        t_round = time.perf_counter() - t0
    if budget_s is not None:
        repeats = max(repeats, min(max_repeats, math.ceil(budget_s / max(t_round, 1e-6))))
    times: Dict[str, List[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for r in range(repeats):
            events = []
            for i in range(len(names)):
                name = names[(i + r) % len(names)]
                setup, call = fns[name]
                arg = setup()
                if cuda:
                    flush()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    call(arg)
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    call(arg)
                    times[name].append(time.perf_counter() - t0)
            if cuda:
                torch.cuda.synchronize(device)
                for name, start, end in events:
                    times[name].append(start.elapsed_time(end) / 1e3)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def run_once(entry) -> None:
    """One untimed call of a timed entry (``fn`` or ``(setup, fn)``), setup included."""
    setup, call = _setup_and_call(entry)
    call(setup())


def pedantic(benchmark, entry, rounds: int, warmup_rounds: int = 1) -> None:
    """pytest-benchmark's pedantic run of a timed entry (``fn`` or ``(setup, fn)``, as time_round_robin
    takes them): the setup runs untimed before each round."""
    setup, call = _setup_and_call(entry)
    benchmark.pedantic(call, setup=lambda: ((setup(),), {}), rounds=rounds, iterations=1,
                       warmup_rounds=warmup_rounds)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_iqr_ms(ts: Sequence[float]) -> tuple:
    """(median, interquartile range) in milliseconds of times given in seconds."""
    ms = [t * 1e3 for t in ts]
    if len(ms) < 2:
        return ms[0], 0.0
    q = statistics.quantiles(ms, n=4, method="inclusive")
    return statistics.median(ms), q[2] - q[0]


def peak_memory_mib(fn: Callable[[], object], device: torch.device = torch.device("cpu")) -> float:
    """Peak bytes (MiB) torch allocates during one call of ``fn`` above what is live before it.

    CUDA: the caching allocator's peak statistic. CPU: torch.profiler's memory records — each op's own
    allocations (+) and frees (−) in start order, accumulated; the running maximum is the peak."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak / 2 ** 20


def achieved_bandwidth(bytes_moved: float, seconds: float, meta: dict) -> Optional[dict]:
    """Bytes moved / time, and that as a fraction of the GPU's datasheet bandwidth (GPU runs only)."""
    gpu = meta.get("gpu")
    if not isinstance(gpu, dict) or seconds <= 0:
        return None
    bw = bytes_moved / seconds
    peak = (gpu.get("datasheet_peaks") or {}).get("bandwidth")
    return {"bytes": bytes_moved, "gb_per_s": bw / 1e9, "fraction_of_peak": bw / peak if peak else None}


def roofline(bytes_moved: float, flops: float, gpu: str = "H100", math_unit: str = "fp32") -> dict:
    """An ESTIMATE, not a measurement: the lower bound on a kernel's time from its compulsory DRAM traffic
    and its FLOPs against one GPU's datasheet peaks; ``bound`` says which of the two limits it."""
    peaks = GPU_PEAKS[gpu]
    t_mem, t_math = bytes_moved / peaks["bandwidth"], flops / peaks[math_unit]
    return {"gpu": gpu, "math_unit": math_unit, "bytes": bytes_moved, "flops": flops,
            "intensity_flop_per_byte": flops / max(bytes_moved, 1), "t_memory_us": 1e6 * t_mem,
            "t_math_us": 1e6 * t_math, "t_lower_bound_us": 1e6 * max(t_mem, t_math),
            "bound": "memory" if t_mem >= t_math else "math"}


# ------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------

def target(benchmark: str, label: str, case: str, ratio: Optional[float], bound: Optional[float],
           kind: str = ">=", mode: str = "full", device: str = "cpu", note: str = "") -> dict:
    """One target (or reported ratio, bound None) in the common format the runner's summary reads."""
    ok = None if ratio is None or bound is None else (ratio >= bound if kind == ">=" else ratio <= bound)
    return {"benchmark": benchmark, "label": label, "case": case, "mode": mode, "device": device,
            "ratio": ratio, "bound": bound, "kind": kind, "pass": ok, "note": note}


def verdict(t: dict) -> str:
    if t["ratio"] is None:
        return "n/a" + (f" ({t['note']})" if t["note"] else "")
    if t["bound"] is None:
        return f"{t['ratio']:.2f}"
    return f"{t['ratio']:.2f} {'PASS' if t['pass'] else 'MISS'} ({t['kind']} {t['bound']:g})"


def result_suffix(device: torch.device, quick: bool) -> str:
    """How result files are told apart: name[_full][_quick][_cuda] (CPU results carry no device tag)."""
    return ("_quick" if quick else "") + ("" if device.type == "cpu" else f"_{device.type}")


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    results.setdefault("meta", {})["loadavg_end"] = loadavg()
    path.write_text(json.dumps(results, indent=1, default=str))


def targets_markdown(targets: Iterable[dict]) -> List[str]:
    lines = ["| benchmark | target | case | mode | device | ratio | verdict |", "|---|---|---|---|---|---:|---|"]
    for t in targets:
        ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}"
        lines.append(f"| {t['benchmark']} | {t['label']} | {t['case']} | {t['mode']} | {t['device']} | {ratio} "
                     f"| {verdict(t)} |")
    return lines


def plot_targets(targets: List[dict], path: Path, title: str) -> None:
    """Bar chart of every bounded target as measured / bound, oriented so that ≥ 1 means met."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [t for t in targets if t["ratio"] is not None and t["bound"] is not None]
    if not rows:
        return
    score = [(t["ratio"] / t["bound"]) if t["kind"] == ">=" else (t["bound"] / t["ratio"]) for t in rows]
    labels = [f"{t['benchmark']}: {t['label']}\n{t['case']} [{t['mode']}, {t['device']}]" for t in rows]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(rows) + 1.6))
    colors = ["tab:green" if s >= 1 else "tab:red" for s in score]
    ax.barh(range(len(rows)), score, color=colors)
    for i, (s, t) in enumerate(zip(score, rows)):
        ax.text(s, i, f" {t['ratio']:.2f} ({t['kind']} {t['bound']:g})", va="center", fontsize=7)
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("measured / target (≥ 1: met; 'kind' says which way the ratio must go)")
    ax.set_xlim(0, max(score) * 1.35)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# relaxeq-bench
# ------------------------------------------------------------------------------------------------

def find_benchmarks(explicit: Optional[str]) -> Path:
    candidates = [Path(explicit)] if explicit else [Path.cwd() / "benchmarks",
                                                    Path(__file__).resolve().parent.parent / "benchmarks"]
    for c in candidates:
        if (c / "bench_relaxed_linear.py").is_file():
            return c
    raise SystemExit("--bench-dir: no benchmarks/ folder (with bench_relaxed_linear.py) found at "
                     + ", ".join(str(c) for c in candidates)
                     + "; run from a checkout of relaxeq_fast or pass --bench-dir PATH")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="relaxeq-bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(BENCHMARKS),
                    help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda (default: auto)")
    ap.add_argument("--quick", action="store_true",
                    help="short budgets and small sizes: checks the pipeline (default: off)")
    ap.add_argument("--out-dir", default=None,
                    help="where JSON, markdown and PNGs go (default: results/ in the benchmarks folder)")
    ap.add_argument("--bench-dir", default=None,
                    help="the benchmarks/ folder of a relaxeq_fast checkout (default: ./benchmarks, else the one "
                         "next to the installed package)")
    ap.add_argument("--summarize", action="store_true",
                    help="run nothing: gather the JSON results already in --out-dir into the summary (default: off)")
    args = ap.parse_args(argv)
    from ._deps import MissingDependency, require
    try:
        require("matplotlib")  # the summary's plot (checked before minutes of benchmarks, not after)
    except MissingDependency as e:
        print(f"relaxeq-bench: error: {e}", file=sys.stderr)
        return 2
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    for b in only:
        if b not in BENCHMARKS:
            raise SystemExit(f"--only: expected a subset of {','.join(BENCHMARKS)}, got {b!r}")
    device = resolve_device(args.device)
    bench_dir = find_benchmarks(args.bench_dir)
    out = Path(args.out_dir) if args.out_dir else bench_dir / "results"
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cpu":
        print(f"[relaxeq-bench] {NO_GPU if not torch.cuda.is_available() else 'running on the CPU (--device cpu)'}",
              flush=True)
    status, ran = 0, []
    t_start = time.perf_counter()
    for i, name in enumerate(only if not args.summarize else [], 1):
        cmd = [sys.executable, str(bench_dir / f"bench_{name}.py"), "--device", str(device), "--out-dir", str(out)]
        cmd += ALL_MODES_ARGS.get(name, [])
        if args.quick:
            cmd.append("--quick")
        print(f"\n[relaxeq-bench {i}/{len(only)}] {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"[relaxeq-bench {i}/{len(only)}] {name}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        status = status or rc
        if rc == 0:
            ran.append(name)
    summarize(out, device, only if args.summarize else ran, args.quick, time.perf_counter() - t_start)
    return status


def summarize(out: Path, device: torch.device, names: Sequence[str], quick: bool, wall_s: float = 0.0) -> dict:
    """Gather the ``targets`` of every benchmark's JSON in ``out`` into summary[_cuda].json / .md / .png."""
    suffix = result_suffix(device, quick)
    targets, found = [], []
    for name in names:
        for js in sorted(out.glob(f"{name}*{suffix}.json")):
            if js.stem.replace(name, "", 1).replace("_full", "", 1) != suffix:
                continue  # another device's or mode's file
            targets += json.loads(js.read_text()).get("targets", [])
            found.append(js.name)
    meta = machine_info(device)
    summary = {"meta": meta, "results": found, "targets": targets, "wall_s": wall_s}
    stem = "summary" + suffix
    write_json(out / f"{stem}.json", summary)
    md = ["## relaxeq-bench summary", ""] + describe_machine(meta) + [
        f"- results gathered: {', '.join(found) or 'none'}" + (" (--quick: pipeline check, not numbers)" if quick
                                                              else ""), ""] + targets_markdown(targets)
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    plot_targets(targets, out / f"{stem}.png", f"relaxeq-bench targets on {meta['device']}" + (" [quick]" if quick
                                                                                               else ""))
    print("\n" + "\n".join(md))
    print(f"\nwrote {out / (stem + '.json')}, {out / (stem + '.md')}, {out / (stem + '.png')}")
    return summary


if __name__ == "__main__":
    sys.exit(main())
