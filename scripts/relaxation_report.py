"""Per-layer size and equivariant share of the relaxation in relaxeq-train runs' last checkpoints.

    python scripts/relaxation_report.py RUN_DIR [RUN_DIR ...]

For each finished run: a table of its relaxed layers (module path, ‖W‖/‖W_eq‖ and ‖P_eq W‖²/‖W‖², from
relaxeq_fast.relaxation_report, θ_ℓ and, for a --theta-schedule dual / elastic run, the multiplier μ_ℓ), then the
energy-weighted equivariant share over all layers: the part of the relaxation that "drop" projection throws away
and "nearest" keeps (a random VN W_r has 1/9).
"""
import argparse
import json
import os
import sys

import torch

from relaxeq_fast.relaxation import relaxation_report
from relaxeq_fast.train import TrainConfig, build_model


def run_report(run_dir: str) -> list[dict]:
    """relaxation_report of the model in ``run_dir``/checkpoint.pt (built from its config.json), with each layer's
    multiplier ``mu`` when θ was learnt (NaN otherwise)."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = TrainConfig(**json.load(f))
    with open(os.path.join(run_dir, "summary.json")) as f:
        num_classes = json.load(f).get("num_classes", 0)
    ck = torch.load(os.path.join(run_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)
    model = build_model(cfg.resolved(), num_classes=num_classes)
    model.load_state_dict(ck["model"])
    rows = relaxation_report(model)
    mus = (ck.get("theta") or {}).get("multipliers")  # DualTheta's state, in relaxed_layers order as the rows
    for i, row in enumerate(rows):
        row["mu"] = float(mus[i]) if mus is not None else float("nan")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", help="relaxeq-train run directories (with config.json, checkpoint.pt)")
    a = p.parse_args(argv)
    for run_dir in a.run_dirs:
        rows = run_report(run_dir)
        if not rows:
            print(f"{run_dir}: no relaxed layers (a --plain run?)", file=sys.stderr)
            return 2
        print(f"## {run_dir}\n\n| layer | ‖W‖/‖W_eq‖ | equivariant share | θ_ℓ | μ_ℓ |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['relative_size']:.3g} | {r['equivariant_share']:.3f} | {r['theta']:.4g} | "
                  f"{r['mu']:.4g} |")
        total = sum(r["relax_norm"] ** 2 for r in rows)
        share = sum(r["equivariant_share"] * r["relax_norm"] ** 2 for r in rows if r["relax_norm"] > 0)
        print(f"\noverall equivariant share (energy-weighted): {share / total if total else float('nan'):.3f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
