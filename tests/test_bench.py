"""relaxeq_fast.bench: the harness the benchmarks share, and the relaxeq-bench runner."""
import json
import statistics
import time

import pytest
import torch

from relaxeq_fast import bench

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour; a GPU is visible")


def test_median_iqr_ms_by_hand():
    # seconds 1..5: median 3 s; inclusive quartiles 2 s and 4 s
    med, iqr = bench.median_iqr_ms([5.0, 1.0, 4.0, 2.0, 3.0])
    assert med == pytest.approx(3000.0) and iqr == pytest.approx(2000.0)
    assert bench.median_iqr_ms([0.25]) == (250.0, 0.0)


def test_time_round_robin_interleaves_and_rotates():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = bench.time_round_robin(fns, repeats=4, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}
    timed = calls[2 * 3:]  # after the warm-up rounds
    rounds = [timed[i:i + 3] for i in range(0, len(timed), 3)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_time_round_robin_budget_grows_repeats():
    fns = {"sleep": lambda: time.sleep(0.002)}
    times = bench.time_round_robin(fns, repeats=2, warmup=1, budget_s=0.05, max_repeats=1000)
    assert 5 <= len(times["sleep"]) <= 40  # about 0.05 s / 2 ms, less when sleeps overshoot under load
    assert statistics.median(times["sleep"]) >= 0.002


def test_peak_memory_counts_a_temporary():
    n = 4 * 2 ** 20 // 4  # 4 MiB of float32

    def step():
        a = torch.ones(n)
        b = a * 2  # two live 4 MiB buffers at the peak
        return float(b[0])

    peak = bench.peak_memory_mib(step)
    assert 8.0 <= peak < 9.0


def test_roofline_picks_the_binding_limit():
    h100 = bench.GPU_PEAKS["H100"]
    mem = bench.roofline(bytes_moved=h100["bandwidth"] * 1e-3, flops=h100["fp32"] * 1e-4, gpu="H100")
    assert mem["bound"] == "memory" and mem["t_lower_bound_us"] == pytest.approx(1000.0)
    math_bound = bench.roofline(bytes_moved=h100["bandwidth"] * 1e-4, flops=h100["fp32"] * 2e-3, gpu="H100")
    assert math_bound["bound"] == "math" and math_bound["t_lower_bound_us"] == pytest.approx(2000.0)
    assert math_bound["intensity_flop_per_byte"] == pytest.approx(20 * h100["fp32"] / h100["bandwidth"])


def test_gpu_peaks_match_names():
    assert bench.gpu_peaks("NVIDIA H200")["matched"] == "H200"
    assert bench.gpu_peaks("NVIDIA H100 80GB HBM3")["matched"] == "H100"
    assert bench.gpu_peaks("Some Other GPU") is None


@pytest.mark.parametrize("ratio,bound,kind,verdict", [(6.0, 5.0, ">=", True), (4.0, 5.0, ">=", False),
                                                      (1.2, 1.5, "<=", True), (2.0, 1.5, "<=", False),
                                                      (2.0, None, ">=", None)])
def test_target_verdicts(ratio, bound, kind, verdict):
    t = bench.target("b", "x / y", "case", ratio, bound, kind)
    assert t["pass"] is verdict
    text = bench.verdict(t)
    assert ("PASS" in text) == (verdict is True) and ("MISS" in text) == (verdict is False)


@no_gpu
def test_no_gpu_is_said_plainly():
    meta = bench.machine_info()
    assert meta["gpu"] == bench.NO_GPU
    assert any(bench.NO_GPU in line for line in bench.describe_machine(meta))


@no_gpu
def test_cuda_without_gpu_names_the_option():
    with pytest.raises(SystemExit, match="--device cuda: no CUDA GPU"):
        bench.resolve_device("cuda")


def test_bad_options_name_the_argument(tmp_path):
    with pytest.raises(SystemExit, match="--only: expected a subset"):
        bench.main(["--only", "nope", "--out-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--bench-dir: no benchmarks/"):
        bench.main(["--bench-dir", str(tmp_path), "--out-dir", str(tmp_path)])


def test_summarize_gathers_this_device_only(tmp_path):
    cpu_t = bench.target("train_step", "fused / plain step", "m", 1.3, 3.0, "<=")
    cuda_t = bench.target("train_step", "fused / plain step", "m", 4.0, 3.0, "<=", device="cuda")
    (tmp_path / "train_step.json").write_text(json.dumps({"targets": [cpu_t]}))
    (tmp_path / "train_step_full.json").write_text(json.dumps({"targets": [cpu_t]}))
    (tmp_path / "train_step_cuda.json").write_text(json.dumps({"targets": [cuda_t]}))
    (tmp_path / "relaxed_linear.json").write_text(json.dumps({"targets": []}))
    summary = bench.summarize(tmp_path, torch.device("cpu"), ["train_step", "relaxed_linear"], quick=False)
    assert sorted(summary["results"]) == ["relaxed_linear.json", "train_step.json", "train_step_full.json"]
    assert [t["device"] for t in summary["targets"]] == ["cpu", "cpu"]
    md = (tmp_path / "summary.md").read_text()
    assert "1.30 PASS (<= 3)" in md
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "summary.json").read_text())["targets"] == summary["targets"]


def test_relaxeq_bench_end_to_end(tmp_path):
    """The console script runs a benchmark in a subprocess and gathers its targets (smallest one, --quick)."""
    rc = bench.main(["--quick", "--only", "relaxed_conv2d", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "relaxed_conv2d_quick.json").read_text())
    assert result["verification"] and max(max(e.values()) for e in result["verification"].values()) < 1e-4
    summary = json.loads((tmp_path / "summary_quick.json").read_text())
    labels = {(t["label"], t["mode"]) for t in summary["targets"]}
    assert ("reference / fused", "full") in labels and ("gridsample / fused", "full") in labels
    assert all(t["ratio"] > 0 for t in summary["targets"])


def test_time_round_robin_times_only_the_second_half_of_a_pair():
    """(setup, fn) entries: setup runs untimed before every call and its result is passed on."""
    seen = []
    pair = (lambda: time.sleep(0.02) or "graph", lambda arg: seen.append(arg))
    times = bench.time_round_robin({"bwd": pair}, repeats=3, warmup=1)
    assert seen == ["graph"] * 4 and len(times["bwd"]) == 3
    assert max(times["bwd"]) < 0.01  # the 20 ms setup is not in the timings


def test_train_step_ops_per_step_sees_the_fused_regulariser():
    """bench_train_step's op count (issue 12's dispatch target): deterministic, and the fused step dispatches
    one relaxation_regularizer per layer group where the reference dispatches its small ops."""
    B = _bench_train_step()
    TINY, Step = B.TINY, B.Step
    counts = {p: Step("VN-PointNet", p, **TINY).ops_per_step() for p in ("relaxed-fused", "relaxed-reference", "plain")}
    assert Step("VN-PointNet", "plain", **TINY).ops_per_step() == counts["plain"]
    assert counts["plain"] < counts["relaxed-fused"] < counts["relaxed-reference"] / 1.5, counts


def _bench_train_step():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
    try:
        import bench_train_step
    finally:
        sys.path.pop(0)
    return bench_train_step


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_train_step_compiled_targets_by_hand(device):
    """The compiled targets of issue 12 from one row's medians, computed by hand: on CPU compiled fused
    against compiled plain (≤ 1.15); on CUDA compiled fused against eager plain (≤ 1.5) and eager paper
    against compiled fused (≥ 3); compile time fused / plain (≤ 2) on both."""
    B = _bench_train_step()
    row = {"model": "VN-PointNet", "points": 300, "width": 0.25, "batch": 24, "device": device,
           "median_ms": {"relaxed-fused": 50.0, "relaxed-paper": 120.0, "plain": 30.0},
           "compiled_median_ms": {"relaxed-fused": 33.0, "relaxed-paper": 90.0, "plain": 30.0},
           "compiled_iqr_ms": {"relaxed-fused": 1.0, "relaxed-paper": 2.0, "plain": 1.0},
           "compile_s": {"relaxed-fused": 50.0, "relaxed-paper": 70.0, "plain": 20.0},
           "compiled_ops_per_step": {"relaxed-fused": 900, "plain": 600}}
    got = {t["label"]: (round(t["ratio"], 6), t["pass"]) for t in B.compiled_targets(row)}
    want = {"fused / plain step, both compiled": (1.1, True if device == "cpu" else None),  # 33 / 30
            "fused / plain compile time": (2.5, False),  # 50 / 20
            "fused / plain host ops per step, both compiled": (1.5, None)}  # 900 / 600, reported only
    if device == "cuda":
        want["fused compiled / plain eager step"] = (1.1, True)  # 33 / 30 ≤ 1.5
        want["paper eager / fused compiled step"] = (round(120 / 33, 6), True)  # 3.64 ≥ 3
    assert got == want
    assert all(t["mode"] == "compiled" and t["device"] == device for t in B.compiled_targets(row))
    # the markdown row carries the same verdicts, in the header's column order
    cells = B.format_compiled_row(row).strip("| ").split(" | ")
    assert len(cells) == len(B.compiled_table_header(device).split("\n")[0].strip("| ").split(" | "))
    assert "2.50 MISS (<= 2)" in cells and "33 ± 1" in cells
    assert B.compiled_targets({k: v for k, v in row.items() if not k.startswith("compile")}) == []
