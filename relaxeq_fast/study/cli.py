"""relaxeq-study's command line: parse, check every run's arguments, run the grid, write the report."""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from .._deps import MissingDependency
from ..train.cli import parse_args
from ..train.config import ConfigError
from ..train.report import format_metric
from .grid import StudyError, _execute, _read_run, _split_list, check_run_dir, make_grid, parse_axes, run_state
from .report import aggregate, write_outputs

def _parser() -> argparse.ArgumentParser:
    from . import __doc__ as doc  # the package's docstring is the command's help
    p = argparse.ArgumentParser(prog="relaxeq-study", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    p.add_argument("--out", required=True, help="study directory (runs/ and the study.* files)")
    p.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default: 0,1,2)")
    p.add_argument("--lrs", default="1e-3", help="comma list of learning rates (default: 1e-3)")
    p.add_argument("--methods", default="relaxed,plain", help="comma list of relaxed, plain (default: relaxed,plain)")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="an ablation axis over a relaxeq-train setting (repeatable; augment values separated by ';') "
                        "(default: none)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (each gets cores / jobs threads) (default: 1)")
    p.add_argument("--title", default=None,
                   help="title of study.md and study.png (default: 'relaxeq-study:' and the relaxeq-train arguments)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (default: off)")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="-- then relaxeq-train arguments common to every run")
    return p


def run_study(argv=None) -> dict:
    a = _parser().parse_args(argv)
    common = a.train_args[1:] if a.train_args[:1] == ["--"] else a.train_args
    for bad in ("--seed", "--lr", "--plain", "--run-dir", "--resume", "--threads"):
        if any(t == bad or t.startswith(bad + "=") for t in common):
            raise StudyError(f"{bad} is set by the study per run; remove it from the relaxeq-train arguments")
    seeds = _split_list(a.seeds, "--seeds", int)
    lrs = _split_list(a.lrs, "--lrs", float)
    methods = _split_list(a.methods, "--methods", str)
    if not isinstance(a.jobs, int) or a.jobs < 1:
        raise StudyError(f"--jobs must be >= 1, got {a.jobs}")
    runs = make_grid(seeds, lrs, methods, parse_axes(a.axis))
    try:  # every run's training arguments are checked before anything runs (axes: sizes, depths)
        from ..train.cli import require_for
        from ..train.config import validate
        first = parse_args(runs[0].argv(common, "x", 1))[0].resolved()
        require_for(first)
        for r in runs:
            try:
                validate(parse_args(r.argv(common, "x", 1))[0].resolved())
            except ConfigError as e:
                where = f"{r.name}: " if r.axes else ""
                raise ConfigError(f"{where}{e}") from None
    except ConfigError as e:
        raise StudyError(f"training arguments: {e}") from None
    except MissingDependency as e:
        raise StudyError(str(e)) from None
    run_root = os.path.join(a.out, "runs")
    dirs = {r: os.path.join(run_root, r.name) for r in runs}
    for r in runs:
        check_run_dir(r, dirs[r], common)
    os.makedirs(run_root, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // a.jobs)
    todo = [r for r in runs if run_state(dirs[r]) not in ("finished", "diverged")]
    print(f"[relaxeq-study] {len(runs)} runs, {len(runs) - len(todo)} already done; {len(todo)} to run, "
          f"{a.jobs} at a time, {threads} thread(s) each", flush=True)
    bar = None
    if not a.no_progress and todo:
        from ..progress import progress, stderr_is_terminal
        # on a terminal an overall bar; in a log the per-run lines below already say it all
        bar = progress(total=len(todo), desc="study") if stderr_is_terminal() else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = {pool.submit(_execute, r, dirs[r], common, threads): r for r in todo}
        for fut in as_completed(futures):
            r = futures[fut]
            state, err = fut.result()
            row = _read_run(r, dirs[r])
            if state == "finished":
                m = row["metric"]
                score = f"projected test {m} {format_metric(m, row[f'test_{m}_projected'])}"
            else:
                score = err
            line = f"[relaxeq-study] {r.name}: {state}, {score} ({time.perf_counter() - t0:.0f} s)"
            (bar.write(line) if bar else print(line, flush=True))
            if bar:
                bar.update(1)
    if bar:
        bar.close()
    rows = [_read_run(r, dirs[r]) for r in runs]
    title = a.title or f"relaxeq-study: {' '.join(common) or 'defaults'}"
    paths = write_outputs(a.out, rows, title)
    return dict(rows=rows, groups=aggregate(rows), paths=paths)


def main(argv=None) -> int:
    try:
        result = run_study(argv)
    except StudyError as e:
        print(f"relaxeq-study: error: {e}", file=sys.stderr)
        return 2
    print(open(result["paths"][1]).read())
    print("[relaxeq-study] " + ", ".join(p for p in result["paths"] if p))
    return 0

