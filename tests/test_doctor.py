"""relaxeq_fast.doctor: the report, the self-check (it compares: perturbed forward or backward outputs fail,
on the path the check really takes), the exit status and its one-line diagnosis, no CUDA at import."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from relaxeq_fast import _ops, backend, doctor, functional, reference

pytestmark = pytest.mark.usefixtures("single_thread")
needs_extension = pytest.mark.skipif(not _ops.EXTENSION_LOADED, reason="the native extension is not built")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_BACKENDS = ("native", "reference")  # triton is not checked on CPU (the interpreter is slow)


def diagnosis_lines(out: str) -> list:
    return [line for line in out.splitlines() if line.startswith(("OK:", "UNHEALTHY:"))]


@needs_extension
def test_main_is_healthy_here_and_prints_every_op(capsys):
    assert doctor.main([]) == 0
    out = capsys.readouterr().out
    for op in doctor.OPS:
        for name in CPU_BACKENDS:
            assert re.search(rf"^\s+{op}\s+cpu\s+{name}\s+ok\s", out, re.M), f"no passing {op}/{name} row:\n{out}"
        assert re.search(rf"^\s+{op}\s+native\s*$", out, re.M), f"no auto -> native line for {op}"
    for fact in ("python", "torch", "triton", "c++ compiler", "nvcc", "extension", "build"):
        assert re.search(rf"^\s+{re.escape(fact)}\s", out, re.M), fact
    lines = diagnosis_lines(out)
    assert len(lines) == 1 and lines[0].startswith("OK:") and out.rstrip().endswith(lines[0])


@needs_extension
def test_json_has_the_facts_and_one_row_per_op_and_backend(capsys):
    assert doctor.main(["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("python", "platform", "torch", "cuda", "triton", "toolchain", "relaxeq_fast", "build_info",
                "auto_backend", "self_check", "healthy", "diagnosis", "notes"):
        assert key in data, key
    assert data["healthy"] is True and data["diagnosis"].startswith("OK:")
    assert data["torch"]["version"] == torch.__version__
    assert data["relaxeq_fast"]["extension_loaded"] is True
    assert data["build_info"]["cpu"] is True
    assert data["auto_backend"]["cpu"] == {op: "native" for op in doctor.OPS}
    rows = [r for r in data["self_check"] if r["device"] == "cpu"]
    assert sorted((r["op"], r["backend"]) for r in rows) == sorted(
        (op, name) for op in doctor.OPS for name in CPU_BACKENDS)
    for r in rows:
        assert r["ok"] is True and r["error"] is None, r
        assert 0 <= r["max_err"] <= r["tol"] and r["seconds"] >= 0, r


def test_interop_libraries_are_reported_as_they_import(monkeypatch):
    """Each interop library: its version where it imports, "not importable: <why>" where it does not."""
    import importlib
    import importlib.util
    info = doctor.facts._interop()
    assert [name for name, _ in doctor.INTEROP_LIBRARIES] == list(info)
    for name in info:
        if importlib.util.find_spec(name) is None:
            assert info[name].startswith("not importable: ModuleNotFoundError"), info
    real = importlib.import_module

    def broken(name, *a, **k):
        if name == "escnn":
            raise ImportError("numpy.core.multiarray failed to import")
        return real(name, *a, **k)
    monkeypatch.setattr(importlib, "import_module", broken)
    assert doctor.facts._interop()["escnn"] == "not importable: ImportError: numpy.core.multiarray failed to import"
    assert "escnn (R2Conv relax / project)" in doctor.format_report({**doctor.report(), "interop": doctor.facts._interop()})


@needs_extension
def test_cpu_self_check_is_fast():
    rows = doctor.self_check(["cpu"], time_budget_s=None)
    assert all(r["ok"] for r in rows)
    assert sum(r["seconds"] for r in rows) < 2.0  # measured ~0.2 s on a loaded 2-core machine


def _perturb_native_relaxed_linear(monkeypatch, perturb):
    """Wrap the op the functional layer picks for backend "native" (the path the check takes)."""
    original = functional._raw_relaxed_linear

    def raw(name):
        op = original(name)
        if name != "native":
            return op

        def wrong(x, M, c, stats):
            y, G, s = op(x, M, c, stats)
            return perturb(y), G, s
        return wrong
    monkeypatch.setattr(functional, "_raw_relaxed_linear", raw)


@needs_extension
def test_a_wrong_forward_fails_its_row_and_main(monkeypatch, capsys):
    _perturb_native_relaxed_linear(monkeypatch, lambda y: y * (1 + 1e-3))  # 10x the relative tolerance
    assert doctor.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^\s+relaxed_linear\s+cpu\s+native\s+FAIL\s", out, re.M), out
    lines = diagnosis_lines(out)
    assert len(lines) == 1 and out.rstrip().endswith(lines[0]), out
    assert lines[0].startswith("UNHEALTHY: 1 self-check(s) failed") and "relaxed_linear on cpu/native" in lines[0]
    assert _ops.REINSTALL_HINT in lines[0]
    rows = doctor.self_check(["cpu"], None)
    bad = [(r["op"], r["backend"]) for r in rows if not r["ok"]]
    assert bad == [("relaxed_linear", "native")]


@needs_extension
def test_a_wrong_gradient_with_a_right_forward_is_caught(monkeypatch):
    # forward values unchanged (y + 0), gradients 1.001x: only the backward comparison can see it
    _perturb_native_relaxed_linear(monkeypatch, lambda y: y + 1e-3 * (y - y.detach()))
    rows = {r["backend"]: r for r in doctor.self_check(["cpu"], None, ops=["relaxed_linear"])}
    assert rows["native"]["ok"] is False and rows["native"]["worst"] in ("dx", "dM", "dc"), rows["native"]
    assert rows["reference"]["ok"] is True


def test_the_reference_backend_is_compared_too(monkeypatch):
    # the functional layer imports vn_leaky_relu_ref from relaxeq_fast.reference at call time; a reference
    # that ignores negative_slope (uses the default 0.2 instead of the check's 0.3) must fail its row
    original = reference.vn_leaky_relu_ref
    monkeypatch.setattr(reference, "vn_leaky_relu_ref", lambda x, d, slope, eps: original(x, d, 0.2, eps))
    rows = doctor.self_check(["cpu"], None, ops=["vn_leaky_relu"])
    by_backend = {r["backend"]: r for r in rows}
    assert by_backend["reference"]["ok"] is False and by_backend["reference"]["worst"] in ("y", "dx", "dd")
    if _ops.EXTENSION_LOADED:
        assert by_backend["native"]["ok"] is True


def test_unloaded_extension_gives_exit_1_and_the_reinstall_hint(monkeypatch, capsys):
    monkeypatch.setattr(_ops, "EXTENSION_LOADED", False)
    monkeypatch.setattr(_ops, "EXTENSION_ERROR", ImportError("simulated: undefined symbol"))
    monkeypatch.setattr(_ops, "_warned", True)  # no fallback warning from this test
    monkeypatch.setattr(backend, "_resolved", {})  # resolve afresh, and leave the real cache alone
    assert doctor.main(["--device", "cpu"]) == 1
    out = capsys.readouterr().out
    assert "NOT LOADED: simulated: undefined symbol" in out
    lines = diagnosis_lines(out)
    assert len(lines) == 1 and out.rstrip().endswith(lines[0]), out
    assert "did not load" in lines[0] and _ops.REINSTALL_HINT in lines[0] and doctor.SETUP_HINT in lines[0]
    # nothing native is claimed: auto falls back to the reference, and only reference rows ran (and passed)
    assert re.search(r"^\s+relaxed_linear\s+reference\s*$", out, re.M), out
    rows = doctor.self_check(["cpu"], None)
    assert {r["backend"] for r in rows} == {"reference"} and all(r["ok"] for r in rows)


def test_time_budget_skips_and_says_so():
    rows = doctor.self_check(["cpu"], time_budget_s=0.0)
    assert rows and all(r["ok"] is None and r["error"].startswith("skipped") for r in rows)
    healthy, verdict, notes = doctor.diagnose(doctor.report(), rows)
    assert any("not run" in n for n in notes)


_IMPORT_TRAP = r"""
import torch
calls = []
def trapped(name):
    def trap(*args, **kwargs):
        calls.append(name)
        raise RuntimeError(f"torch.cuda.{name} was called")
    return trap
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device", "get_device_name",
             "get_device_capability", "get_device_properties", "synchronize"):
    setattr(torch.cuda, name, trapped(name))
import relaxeq_fast.doctor as doctor
if not calls:
    print("imported without touching CUDA")
import warnings
warnings.simplefilter("ignore")
info = doctor.report()  # reports the trapped query as a CUDA error instead of crashing
if calls and "was called" in info["cuda"].get("error", ""):
    print("report() queries CUDA: the trap works")
"""


def test_import_does_not_touch_cuda():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_TRAP], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "imported without touching CUDA" in proc.stdout, proc.stderr
    assert "report() queries CUDA: the trap works" in proc.stdout, proc.stdout + proc.stderr


@needs_extension
def test_python_dash_m_json_exits_0():
    proc = subprocess.run([sys.executable, "-m", "relaxeq_fast.doctor", "--json", "--device", "cpu"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert json.loads(proc.stdout)["healthy"] is True
