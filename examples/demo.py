"""relaxeq_fast demo: the fused relaxed-linear op against the reference, then a tiny relaxed training run.

    python examples/demo.py [--steps 200] [--rows 20000] [--channels 32]

1. Runs the fused op (backend "native": C++ kernels) and the pure-PyTorch reference on the same VN
   features, prints their agreement and the time of one forward+backward+regulariser step each.
2. Trains a two-layer relaxed VN network on seeded synthetic point features whose target is slightly
   non-equivariant, with θ held then decayed linearly to 0 and the closed-form regularisers in the loss;
   projects it and prints the equivariance error of the result.
"""
import argparse
import json
import statistics
import time

import torch

import relaxeq_fast
from relaxeq_fast import VN, combine_regularizers, equivariance_error, project, use_backend
from relaxeq_fast.relaxation import HoldThenLinearDecay, ThetaScheduler
from relaxeq_fast.vn import model_regularizers
from relaxeq_fast.progress import progress
from relaxeq_fast.nn import RelaxedLinear


def one_step(layer, x, backend):
    layer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    with use_backend(backend):
        y = layer(x)
        loss = y.square().mean() + combine_regularizers([layer.regularizers()], 1e-2, 1e-3)
    loss.backward()
    return time.perf_counter() - t0, y.detach(), layer.last_stats


def compare_backends(rows, channels, repeats=9):
    torch.manual_seed(0)
    layer = RelaxedLinear(VN(channels), VN(channels), relax_init="default", theta=0.5)
    x = torch.randn(rows, channels, 3)
    times = {"native": [], "reference": []}
    outs = {}
    for r in range(repeats + 2):  # two untimed warm-up rounds; then the backends alternate
        for backend in (("native", "reference") if r % 2 else ("reference", "native")):
            t, y, st = one_step(layer, x, backend)
            outs[backend] = (y, st)
            if r >= 2:
                times[backend].append(t)
    t_fused, t_ref = (statistics.median(times[b]) * 1e3 for b in ("native", "reference"))
    (y_fused, st_fused), (y_ref, st_ref) = outs["native"], outs["reference"]
    err_y = ((y_fused - y_ref).abs().max() / y_ref.abs().max()).item()
    err_G = ((st_fused.G - st_ref.G).abs().max() / st_ref.G.abs().max()).item()
    print(f"\n[1] relaxed VN linear, {rows} rows x {channels} channels (D = {3 * channels}), float32, "
          f"{torch.get_num_threads()} threads")
    print(f"    fused vs reference: max rel. error y {err_y:.1e}, G {err_G:.1e}")
    print(f"    forward+regulariser+backward: fused {t_fused:.1f} ms, reference {t_ref:.1f} ms "
          f"(reference / fused {t_ref / t_fused:.2f}, median of {repeats}, interleaved; "
          f"benchmarks/ has the full comparison)")


class TinyVNNet(torch.nn.Module):
    """VN(4) -> VN(16) -> VN(2) with an equivariant norm gate between the relaxed linear maps."""

    def __init__(self):
        super().__init__()
        self.l1 = RelaxedLinear(VN(4), VN(16), theta=1.0)
        self.l2 = RelaxedLinear(VN(16), VN(2), theta=1.0)

    def forward(self, x):
        h = self.l1(x)
        h = h * torch.sigmoid(h.norm(dim=-1, keepdim=True) - 1.0)
        return self.l2(h)


def relaxed_training(steps):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 4, 3, generator=g)
    W_teacher = torch.randn(2, 4, generator=g)
    y = torch.einsum("oc,nci->noi", W_teacher, x)
    y = y + 0.1 * torch.tanh(x[:, :2, :] * torch.tensor([1.0, 0.0, 0.0]))  # a small x-axis preference
    torch.manual_seed(0)
    net = TinyVNNet()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    theta = ThetaScheduler(net, HoldThenLinearDecay(steps))  # θ exactly 0 after the last step
    print(f"\n[2] relaxed training: {steps} steps, θ held at 1 then decayed linearly to 0")
    bar = progress(range(steps), desc="relaxed training", log_every=10.0)
    for step in bar:
        task = (net(x) - y).square().mean()
        reg = combine_regularizers(model_regularizers(net), lambda_ld=1e-3, lambda_n=1e-4)
        opt.zero_grad()
        (task + reg).backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{task.item():.4f}", theta=f"{theta.theta:.2f}", reg=f"{reg.item():.3f}")
        theta.step()
    theta_end = float(net.l1.theta)
    plain = project(net).eval()
    with torch.no_grad():
        final = (plain(x) - y).square().mean().item()
    eq_err = equivariance_error(plain, x, output="equivariant")
    print(f"    θ at the end: {theta_end}; projected model: train MSE {final:.4f}, "
          f"equivariance error {eq_err:.1e} (relative, float32)")
    return eq_err


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="training steps in part 2")
    parser.add_argument("--rows", type=int, default=20000, help="rows of the benchmark batch in part 1")
    parser.add_argument("--channels", type=int, default=32, help="VN channels in part 1")
    args = parser.parse_args()
    for name, v in (("--steps", args.steps), ("--rows", args.rows), ("--channels", args.channels)):
        if v <= 0:
            parser.error(f"{name} must be positive, got {v}")
    print("relaxeq_fast", relaxeq_fast.__version__, json.dumps(relaxeq_fast.build_info()))
    compare_backends(args.rows, args.channels)
    eq_err = relaxed_training(args.steps)
    if eq_err > 1e-4:
        raise SystemExit(f"projected model is not equivariant: error {eq_err:.2e}")


if __name__ == "__main__":
    main()
