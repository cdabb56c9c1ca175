"""Mutation checks: each entry breaks the package in one small way and names the tests that must fail.

    python tests/mutations.py            # every mutation; a table of caught / MISSED; exit 1 if any missed
    python tests/mutations.py --list
    python tests/mutations.py theta_steps_twice lr_schedule_not_restored

A mutation is a literal text substitution in one source file, applied in place and always reverted
(the file is rewritten from the saved original, even on Ctrl-C). Python sources only: a C++/CUDA
mutation needs a rebuild and is recorded by hand in tests/README.md. Not collected by pytest.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids or "file -k expr"
    why: str


MUTATIONS = [
    # ---- the trainer's θ wiring and resume (tests/test_train.py) ----
    Mutation("theta_steps_twice", "relaxeq_fast/train/loop.py",
             'if theta is not None and cfg.theta_unit == "step":\n                theta.step()',
             'if theta is not None and cfg.theta_unit == "step":\n                theta.step()\n                theta.step()',
             ("tests/test_train.py -k theta_used",), "θ stepped twice per optimisation step"),
    Mutation("theta_epoch_steps_twice", "relaxeq_fast/train/loop.py",
             'if theta is not None and cfg.theta_unit == "epoch":\n            theta.step()',
             'if theta is not None and cfg.theta_unit == "epoch":\n            theta.step()\n            theta.step()',
             ("tests/test_train.py -k theta_used",), "θ stepped twice per epoch (--theta-unit epoch)"),
    Mutation("theta_total_plus_one", "relaxeq_fast/train/loop.py",
             "total = cfg.epochs * steps_per_epoch if", "total = 1 + cfg.epochs * steps_per_epoch if",
             ("tests/test_train.py -k theta_used",), "θ schedule built over total + 1 steps"),
    Mutation("theta_scaled_lambda_ignored", "relaxeq_fast/train/loop.py",
             "th = theta.theta if cfg.theta_scaled_lambda else None", "th = None",
             ("tests/test_train.py -k theta_used",), "--theta-scaled-lambda has no effect"),
    Mutation("lr_schedule_not_restored", "relaxeq_fast/train/checkpoint.py",
             'lr_schedule.load_state_dict(ck["lr_schedule"])', "pass",
             ("tests/test_train.py -k resume_reproduces",), "resume keeps a fresh lr schedule (no-op load_state_dict)"),
    Mutation("validate_after_device", "relaxeq_fast/train/loop.py",
             "    validate(cfg, D.world_size() if D.is_distributed() else int(os.environ.get(\"WORLD_SIZE\", \"1\")))\n",
             "", ("tests/test_train.py -k bad_configuration",), "a config is used before it is validated"),
    # ---- distributed helpers (tests/test_distributed.py) ----
    Mutation("moments_equal_weights", "relaxeq_fast/distributed.py",
             "global_mean = all_reduce(mean * (n / total))", "global_mean = all_reduce(mean * 0.5)",
             ("tests/test_distributed.py -k moments",), "ranks' means averaged with equal weights"),
    Mutation("moments_var_without_shift", "relaxeq_fast/distributed.py",
             "all_reduce((var + (mean - global_mean).square()) * (n / total))", "all_reduce(var * (n / total))",
             ("tests/test_distributed.py -k moments",), "global variance misses the between-rank term"),
    Mutation("sync_bn_biased_running_var", "relaxeq_fast/distributed.py",
             "var.detach() * (total / max(total - 1, 1))", "var.detach()",
             ("tests/test_distributed.py -k sync_batch_norm",), "running variance left biased"),
    Mutation("sync_bn_ignores_momentum", "relaxeq_fast/distributed.py",
             "m = self.momentum if self.momentum is not None else", "m = 0.1 if self.momentum is not None else",
             ("tests/test_distributed.py -k sync_batch_norm",), "momentum hard-coded to the default"),
    Mutation("input_stats_keep_local_rows", "relaxeq_fast/distributed.py",
             "m.last_rows = None  # this rank's rows only", "pass  # this rank's rows only",
             ("tests/test_distributed.py -k input_stats",), "the regulariser uses this rank's rows after the reduction"),
    Mutation("input_stats_unshared", "relaxeq_fast/distributed.py",
             "unique.setdefault(id(m.last_stats), m.last_stats)", "unique.setdefault(id(m), m.last_stats)",
             ("tests/test_distributed.py -k input_stats",),
             "fused maps stop sharing one statistics object (and are all-reduced twice)"),
]


def _run_tests(selection: tuple[str, ...]) -> tuple[int, float]:
    rc_all, t0 = 0, time.perf_counter()
    for sel in selection:
        args = sel.split(" -k ", 1)
        cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", args[0]]
        if len(args) == 2:
            cmd += ["-k", args[1]]
        rc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).returncode
        if rc not in (0, 1):  # 2-5: interrupted, internal error, usage error, nothing collected
            raise RuntimeError(f"{' '.join(cmd)}: pytest exit {rc} (not a test outcome)")
        rc_all = rc_all or rc
    return rc_all, time.perf_counter() - t0


def apply_and_test(m: Mutation) -> tuple[bool, float]:
    """True if the tests failed with the mutation in place (caught), and the seconds they took."""
    path = os.path.join(ROOT, m.path)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    count = original.count(m.old)
    if count != 1:
        raise RuntimeError(f"{m.name}: the text to replace occurs {count} times in {m.path}, expected once")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new))
        rc, seconds = _run_tests(m.tests)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    return rc == 1, seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="mutations to run (default: all)")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--baseline", action="store_true", help="first check the selected tests pass unmutated")
    a = p.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in a.names if n not in by_name]
    if unknown:
        p.error(f"unknown mutation(s) {unknown}; --list shows them")
    chosen = [by_name[n] for n in a.names] if a.names else MUTATIONS
    if a.list:
        for m in chosen:
            print(f"{m.name:32s} {m.path}: {m.why}")
        return 0
    if a.baseline:
        for sel in sorted({s for m in chosen for s in m.tests}):
            rc, _ = _run_tests((sel,))
            if rc:
                print(f"baseline fails: {sel}", file=sys.stderr)
                return 2
    print(f"| mutation | file | tests | result | s |\n|---|---|---|---|---|")
    missed = 0
    for m in chosen:
        caught, seconds = apply_and_test(m)
        missed += not caught
        print(f"| {m.name} ({m.why}) | {m.path} | `{'`, `'.join(m.tests)}` | {'caught' if caught else 'MISSED'} "
              f"| {seconds:.0f} |", flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
