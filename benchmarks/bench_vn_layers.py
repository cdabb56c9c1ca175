"""One training step of a relaxed VNLinearLeakyReLU block at VN-PointNet sizes: time and peak memory.

Workload: x [rows, C_in, 3] float32 (requires grad), block = VN linear → VN batch norm (training
mode) → VN leaky ReLU with a direction map of the same input; both maps relaxed (θ = 0.5, W_r ≠ 0);
loss = (y · g).sum() + λ_LD √R_LD + λ_N √R_N over both maps. Sizes (rows, C_in, C_out) are the
blocks of VN-PointNet at batch 24 × 300 points, k = 20: conv_pos (144000 edge rows, 3 → 21),
conv1 (7200, 21 → 21), conv2 (7200, 42 → 42), STN conv3 (7200, 42 → 341).

Providers:
  fused      relaxeq_fast.vn.VNLinearLeakyReLU relaxed, backend "native" (fused relaxed-linear for both
             maps in one call, fused VN batch norm and VN leaky ReLU where built)
  reference  the same block with backend "reference" (pure PyTorch everywhere)
  compiled   torch.compile of the reference step
  paper      the public VN code's block (nn.Linear maps over channels, batch norm on norms, leaky ReLU
             written out) with the paper code's relaxation: a separate dense relaxation layer per map and
             the Lie derivative by re-running it per dense generator
  plain      the unrelaxed block (no relaxation, no regulariser): reported, not targeted

Targets (issue #3): fused ≥ 2× faster than reference and ≥ 5× faster than paper-style; peak memory of
the fused step ≤ 0.6× the reference's. Peak memory is the peak of torch's live CPU allocations during
one warm step, from torch.profiler's memory records (see peak_step_memory).

    python benchmarks/bench_vn_layers.py [--quick]     # table + JSON in benchmarks/results/
    pytest benchmarks/bench_vn_layers.py --benchmark-only
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Dict, Tuple

import torch
import torch.nn.functional as TF

from relaxeq_fast import VN, combine_regularizers, use_backend
from relaxeq_fast.bench import (describe_machine, machine_info, median_iqr_ms, peak_memory_mib, resolve_device,
                                result_suffix, target, time_round_robin, write_json)
from relaxeq_fast.regularizer import RegularizerTerms
from relaxeq_fast.vn import VNLinearLeakyReLU, model_regularizers, relax, relaxed_layers

try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

THREADS = 2
torch.set_num_threads(THREADS)
DTYPE = torch.float32
THETA, LAMBDA_LD, LAMBDA_N, SLOPE, EPS = 0.5, 1.0, 0.1, 0.2, 1e-6
SIZES: Tuple[Tuple[int, int, int], ...] = ((144000, 3, 21), (7200, 21, 21), (7200, 42, 42), (7200, 42, 341))
RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = (("reference / fused", "reference", "fused", 2.0), ("paper-style / fused", "paper", "fused", 5.0))
MEMORY_TARGET = 0.6  # fused peak / reference peak
QUICK_SIZES: Tuple[Tuple[int, int, int], ...] = ((2048, 21, 21),)
MODES = ("full", "forward", "backward")  # targets apply to full
AGREEMENT_TOL = 1e-3  # float32 loss and input gradient against the float32 reference (relative)


def label(size) -> str:
    return "x".join(map(str, size))


def regularizer_loss(terms) -> torch.Tensor:
    return combine_regularizers(terms, lambda_ld=LAMBDA_LD, lambda_n=LAMBDA_N, reduction="paper")


class ProviderUnavailable(Exception):
    """A provider that cannot run here (torch.compile failed); reported in the table, not raised."""


class Step:
    """One provider on one size; ``run()`` is one timed training step (grads set to None first)."""

    def __init__(self, size, seed=0, device=torch.device("cpu")):
        rows, cin, cout = size
        self.device = torch.device(device)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(rows, cin, 3, generator=g, dtype=DTYPE).to(self.device).requires_grad_()
        self.g = torch.randn(rows, cout, 3, generator=g, dtype=DTYPE).to(self.device)
        torch.manual_seed(seed)
        self.block = VNLinearLeakyReLU(cin, cout, negative_slope=SLOPE, dtype=DTYPE).to(self.device).train()

    def params(self):
        return [self.x, *self.block.parameters()]

    def loss(self) -> torch.Tensor:
        raise NotImplementedError

    def run(self) -> None:
        for p in self.params():
            p.grad = None
        self.loss().backward()

    def _graph(self) -> torch.Tensor:
        for p in self.params():
            p.grad = None
        return self.loss()

    def timed(self, mode: str):
        """What the timer calls: the full step, the forward + loss alone, or for "backward" the pair
        (untimed forward + loss, timed backward)."""
        if mode == "backward":
            return (self._graph, lambda loss: loss.backward())
        return {"full": self.run, "forward": self.loss}[mode]


class RelaxedBlock(Step):
    def __init__(self, size, backend: str, seed=0, device=torch.device("cpu")):
        super().__init__(size, seed, device)
        relax(self.block, relax_init="default", theta=THETA)
        with torch.no_grad():
            for m in relaxed_layers(self.block):
                m.bias_relax.normal_(0, 0.1)
        self.backend = backend

    def loss(self):
        with use_backend(self.backend):
            y = self.block(self.x)
            return (y * self.g).sum() + regularizer_loss(model_regularizers(self.block))


class CompiledBlock(RelaxedBlock):
    def __init__(self, size, seed=0, device=torch.device("cpu")):
        super().__init__(size, "reference", seed, device)
        self._fn = torch.compile(self._loss, dynamic=False)
        try:
            self.run()
        except Exception as e:
            raise ProviderUnavailable(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    def _loss(self, x, g):
        y = self.block(x)
        return (y * g).sum() + regularizer_loss(model_regularizers(self.block))

    def loss(self):
        with use_backend("reference"):
            return self._fn(self.x, self.g)


class PlainBlock(Step):
    def loss(self):
        return (self.block(self.x) * self.g).sum()


class PaperBlock(Step):
    """The public VN block plus the paper code's relaxation, on [rows, C, 3] features."""

    def __init__(self, size, seed=0, device=torch.device("cpu")):
        super().__init__(size, seed, device)
        ref = RelaxedBlock(size, "reference", seed, device)  # same weights as the other providers
        rows, cin, cout = size
        lin = lambda o, i: torch.nn.Linear(i, o, bias=False)  # noqa: E731
        self.feat, self.dir = lin(cout, cin), lin(cout, cin)
        self.relax_feat, self.relax_dir = torch.nn.Linear(3 * cin, 3 * cout), torch.nn.Linear(3 * cin, 3 * cout)
        self.bn = torch.nn.BatchNorm1d(cout)
        for m in (self.feat, self.dir, self.relax_feat, self.relax_dir, self.bn):
            m.to(self.device)
        with torch.no_grad():
            self.feat.weight.copy_(ref.block.map_to_feat.weights[0])
            self.dir.weight.copy_(ref.block.map_to_dir.weights[0])
            for dst, src in ((self.relax_feat, ref.block.map_to_feat), (self.relax_dir, ref.block.map_to_dir)):
                dst.weight.copy_(src.weight_relax)
                dst.bias.copy_(src.bias_relax)
        self.A = VN(cin).generator_matrices(dtype=DTYPE, device=self.device)      # dense [3, D_in, D_in]
        self.A_out = VN(cout).generator_matrices(dtype=DTYPE, device=self.device)

    def params(self):
        return [self.x, *self.feat.parameters(), *self.dir.parameters(), *self.relax_feat.parameters(),
                *self.relax_dir.parameters(), *self.bn.parameters()]

    def _terms(self, relax_map, xf):
        xh = xf.detach()
        r0 = relax_map(xh)
        r_ld = 0
        for k in range(3):
            lie = TF.linear(xh @ self.A[k].T, relax_map.weight) - r0 @ self.A_out[k].T
            r_ld = r_ld + lie.square().sum()
        return RegularizerTerms(r_ld, r0.square().sum(), len(xf))

    def loss(self):
        x = self.x
        rows = x.shape[0]
        xf = x.reshape(rows, -1)
        p = self.feat(x.transpose(1, -1)).transpose(1, -1) + THETA * self.relax_feat(xf).reshape(rows, -1, 3)
        d = self.dir(x.transpose(1, -1)).transpose(1, -1) + THETA * self.relax_dir(xf).reshape(rows, -1, 3)
        norm = torch.norm(p, dim=2) + EPS
        p = p / norm.unsqueeze(2) * self.bn(norm).unsqueeze(2)
        dot = (p * d).sum(2, keepdim=True)
        mask = (dot >= 0).to(p.dtype)
        d_sq = (d * d).sum(2, keepdim=True)
        y = SLOPE * p + (1 - SLOPE) * (mask * p + (1 - mask) * (p - (dot / (d_sq + EPS)) * d))
        terms = [self._terms(self.relax_feat, xf), self._terms(self.relax_dir, xf)]
        return (y * self.g).sum() + regularizer_loss(terms)


PROVIDERS = {
    "fused": lambda s, d: RelaxedBlock(s, "native", device=d),
    "triton": lambda s, d: RelaxedBlock(s, "triton", device=d),
    "reference": lambda s, d: RelaxedBlock(s, "reference", device=d),
    "compiled": lambda s, d: CompiledBlock(s, device=d),
    "paper": lambda s, d: PaperBlock(s, device=d),
    "plain": lambda s, d: PlainBlock(s, device=d),
}


def build(name: str, size, device=torch.device("cpu")) -> Step:
    if name == "triton" and torch.device(device).type != "cuda":
        raise ProviderUnavailable("needs a CUDA device")
    return PROVIDERS[name](size, torch.device(device))


def check_agreement(size, device=torch.device("cpu"), names=tuple(PROVIDERS)) -> Dict[str, float]:
    """Relative error of each relaxed provider's loss and input gradient against the reference."""
    base = build("reference", size, device)
    base.run()
    want_loss, want_gx = base.loss().item(), base.x.grad.clone()
    errs = {}
    for name in [n for n in ("fused", "triton", "compiled", "paper") if n in names]:
        try:
            impl = build(name, size, device)
        except ProviderUnavailable:
            continue
        impl.run()
        errs[name] = max(abs(impl.loss().item() - want_loss) / abs(want_loss),
                         ((impl.x.grad - want_gx).norm() / want_gx.norm()).item())
    return errs


def peak_step_memory(impl: Step) -> float:
    """Peak MiB torch allocates during one warm step above what is live before it (relaxeq_fast.bench.
    peak_memory_mib); grads are cleared first, so the step's own gradient buffers count."""
    impl.run()  # warm
    for p in impl.params():
        p.grad = None
    return peak_memory_mib(lambda: impl.loss().backward(), impl.device)


if pytest is not None:
    _PARAMS = [(s, n) for s in SIZES for n in PROVIDERS]

    @pytest.mark.parametrize("size,provider", _PARAMS, ids=[f"{label(s)}-{n}" for s, n in _PARAMS])
    def test_vn_block_step(benchmark, size, provider):
        try:
            impl = build(provider, size)
        except ProviderUnavailable as e:
            pytest.skip(str(e))
        impl.run()
        benchmark.group = f"VNLinearLeakyReLU {label(size)}"
        benchmark.extra_info.update(machine_info())
        benchmark.extra_info.update(provider=provider, size=label(size))
        benchmark.pedantic(impl.run, rounds=5, iterations=1, warmup_rounds=1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats; checks the pipeline, not for numbers")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--sizes", default=None, help="comma-separated rows x C_in x C_out, e.g. 7200x21x21")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timed repeats per size (20, quick 2)")
    parser.add_argument("--modes", default="full", help=f"comma-separated subset of {','.join(MODES)} (full is "
                        "always timed: the targets apply to it)")
    parser.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated subset of "
                        + ",".join(PROVIDERS))
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    sizes = (QUICK_SIZES if args.quick else SIZES) if not args.sizes else \
        [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    budget, min_rep, max_rep = (2.0, 3, 20) if args.quick else (20.0, 5, 200)
    budget = args.budget if args.budget is not None else budget
    meta = machine_info(device, DTYPE, theta=THETA, lambda_ld=LAMBDA_LD, lambda_n=LAMBDA_N)
    rows_md, results = [], {"meta": meta, "rows": [], "targets": []}
    modes = ["full"] + [m for m in args.modes.split(",") if m != "full"]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: expected a subset of {','.join(MODES)}, got {m!r}")
    names = args.providers.split(",")
    for n in names:
        if n not in PROVIDERS:
            raise SystemExit(f"--providers: expected a subset of {','.join(PROVIDERS)}, got {n!r}")
    status = 0
    for size in sizes:
        errs = check_agreement(size, device, names)
        bad = {k: v for k, v in errs.items() if v > AGREEMENT_TOL}
        impls, unavailable = {}, {}
        for name in names:
            try:
                impls[name] = build(name, size, device)
            except ProviderUnavailable as e:
                unavailable[name] = str(e)
        times = time_round_robin({k: i.timed("full") for k, i in impls.items()}, min_rep, 1, device, budget, max_rep)
        med = {k: median_iqr_ms(v)[0] for k, v in times.items()}
        other_modes = {}
        for mode in modes[1:]:
            t_mode = time_round_robin({k: i.timed(mode) for k, i in impls.items()}, min_rep, 1, device, budget,
                                      max_rep)
            other_modes[mode] = {k: median_iqr_ms(v)[0] for k, v in t_mode.items()}
        mem = {} if args.no_memory else {name: peak_step_memory(impls[name]) for name in ("fused", "reference", "plain")
                                         if name in impls}
        del impls
        gc.collect()
        case = label(size)
        tg = [target("vn_layers", lbl, case, med[num] / med[den] if num in med and den in med else None, bound, ">=",
                     device=str(device)) for lbl, num, den, bound in TARGETS]
        tg.append(target("vn_layers", "fused / reference peak memory", case,
                         mem["fused"] / mem["reference"] if mem.get("fused") is not None and mem.get("reference")
                         else None, MEMORY_TARGET, "<=", device=str(device)))
        if "triton" in med:
            tg.append(target("vn_layers", "triton / fused (CUDA)", case, med["triton"] / med["fused"], None,
                             device=str(device)))
        results["targets"] += [t for t in tg if t["ratio"] is not None]
        cells = [f"{med[n]:.2f}" if n in med else "—" for n in names]
        mem_cells = [f"{mem[n]:.0f}" if mem.get(n) is not None else "—" for n in ("fused", "reference", "plain")]
        ratio_cells = [("n/a" if t["ratio"] is None else f"{t['ratio']:.2f} {'PASS' if t['pass'] else 'MISS'}")
                       for t in tg[:3]]
        rows_md.append(f"| {case} | " + " | ".join(cells + mem_cells + ratio_cells) + " |")
        results["rows"].append({"size": case, "median_ms": med, "modes_median_ms": other_modes,
                                "peak_step_mib": mem, "agreement": errs,
                                "unavailable": unavailable, "repeats": {k: len(v) for k, v in times.items()}})
        if bad:
            status = 1
            print(f"MISMATCH at {case}: {bad}", file=sys.stderr)
    header = ("| rows×C_in×C_out | " + " | ".join(f"{n} ms" for n in names)
              + " | fused MiB | reference MiB | plain MiB | reference / fused (≥ 2) | paper / fused (≥ 5)"
              " | fused / reference memory (≤ 0.6) |")
    table = [header, "|" + "---|" * (len(names) + 7)] + rows_md
    unavailable_note = sorted({f"{k}: {v}" for r in results["rows"] for k, v in r["unavailable"].items()})
    md = [f"## relaxed VNLinearLeakyReLU block, one training step ({meta['dtype']}, {device})", ""]
    md += describe_machine(meta) + [f"- not run: {'; '.join(unavailable_note)}" if unavailable_note else "", ""]
    md += table
    for mode in modes[1:]:
        md += ["", f"### mode `{mode}` (" + ("forward + loss, no backward" if mode == "forward" else
                                             "the backward alone, forward + loss untimed before each") + "): median ms",
               "", "| rows×C_in×C_out | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        md += [f"| {r['size']} | " + " | ".join(f"{r['modes_median_ms'][mode][n]:.2f}"
                                                if n in r["modes_median_ms"][mode] else "—" for n in names) + " |"
               for r in results["rows"]]
    print("\n".join(md))
    out = Path(args.out_dir)
    stem = "vn_layers" + result_suffix(device, args.quick)
    write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / stem}.json and .md")
    return status


if __name__ == "__main__":
    sys.exit(main())
