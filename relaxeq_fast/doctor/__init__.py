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

# one module per concern: the facts, the self-check, the diagnosis and tables, the command line
from .facts import CONCRETE_BACKENDS, INTEROP_LIBRARIES, OPS, report
from .self_check import ATOL, RTOL, check_backends, self_check
from .diagnose import SETUP_HINT, diagnose, format_report, format_self_check
from .cli import main

__all__ = ["ATOL", "CONCRETE_BACKENDS", "INTEROP_LIBRARIES", "OPS", "RTOL", "SETUP_HINT", "check_backends", "diagnose",
           "format_report", "format_self_check", "main", "report", "self_check"]
