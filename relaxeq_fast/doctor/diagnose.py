"""What the facts and the self-check say: one verdict line with its fix (:func:`diagnose`), and the tables
(:func:`format_report`, :func:`format_self_check`)."""
from __future__ import annotations

from typing import Optional, Sequence

from .. import _ops
from .facts import INTEROP_LIBRARIES, OPS, _arch_key
from .self_check import ATOL, RTOL

SETUP_HINT = "bash scripts/setup.sh"


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
