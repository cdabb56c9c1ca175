"""relaxeq-doctor's command line."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional, Sequence

from .diagnose import diagnose, format_report, format_self_check
from .facts import report
from .self_check import ATOL, RTOL, self_check

DEFAULT_CLI_TIME_BUDGET_S = 60.0  # Triton compiles each kernel on its first GPU call: seconds each


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="relaxeq-doctor", description="Check a relaxeq_fast installation: versions, toolchain, the compiled "
        "extension, backend resolution, and a numerical self-check of every op against the float64 reference. "
        "Exit status 0 when healthy, 1 otherwise.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--device", action="append", default=None,
                        help="device to self-check (repeatable; default: cpu, and cuda when visible)")
    parser.add_argument("--time-budget", type=float, default=DEFAULT_CLI_TIME_BUDGET_S, metavar="SECONDS",
                        help="soft limit on the self-check; checks past it are listed as skipped "
                             f"(default {DEFAULT_CLI_TIME_BUDGET_S:g}; 0 or less: none)")
    parser.add_argument("--triton-interpreter", action="store_true",
                        help="also check the Triton backend on CPU (needs TRITON_INTERPRET=1; slow)")
    args = parser.parse_args(argv)

    info = report()
    budget = args.time_budget if args.time_budget > 0 else None
    t0 = time.perf_counter()
    rows = self_check(args.device, budget, triton_on_cpu=args.triton_interpreter)
    elapsed = time.perf_counter() - t0
    healthy, verdict, notes = diagnose(info, rows, elapsed)
    if args.json:
        out = dict(info, self_check=rows, self_check_seconds=elapsed, tolerance={"rtol": RTOL, "atol": ATOL},
                   healthy=healthy, diagnosis=verdict, notes=notes)
        print(json.dumps(out, indent=2, default=str))
        if not healthy:
            print(verdict, file=sys.stderr)
    else:
        print(format_report(info))
        print()
        print(format_self_check(rows))
        print()
        for note in notes:
            print(f"note: {note}")
        print(verdict)
    return 0 if healthy else 1

