"""swap(): modules in the public VN code's style become our layers with identical outputs and gradients.

The public-style modules below are written here from the published design (layout [B, C, 3, N, ...],
channel mixing as nn.Linear over C), as an independent reference for swap().
"""
import pytest
import torch
from torch import nn

from relaxeq_fast import random_rotation
from relaxeq_fast.interop import VNLayoutAdapter
from relaxeq_fast.vn import relax, relaxed_layers, swap

from testing import assert_close_scaled

EPS = 1e-6


class PubVNLinear(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.map_to_feat = nn.Linear(cin, cout, bias=False)

    def forward(self, x):
        return self.map_to_feat(x.transpose(1, -1)).transpose(1, -1)


class PubVNBatchNorm(nn.Module):
    def __init__(self, c, dim):
        super().__init__()
        self.bn = nn.BatchNorm1d(c) if dim in (3, 4) else nn.BatchNorm2d(c)

    def forward(self, x):
        norm = torch.norm(x, dim=2) + EPS
        return x / norm.unsqueeze(2) * self.bn(norm).unsqueeze(2)


def pub_leaky(p, d, slope):
    dot = (p * d).sum(2, keepdim=True)
    mask = (dot >= 0).to(p.dtype)
    d_sq = (d * d).sum(2, keepdim=True)
    return slope * p + (1 - slope) * (mask * p + (1 - mask) * (p - (dot / (d_sq + EPS)) * d))


class PubVNLeakyReLU(nn.Module):
    def __init__(self, c, share=False, negative_slope=0.2):
        super().__init__()
        self.map_to_dir = nn.Linear(c, 1 if share else c, bias=False)
        self.negative_slope = negative_slope

    def forward(self, x):
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        return pub_leaky(x, d, self.negative_slope)


class PubVNLinearLeakyReLU(nn.Module):
    def __init__(self, cin, cout, dim=4, share=False, negative_slope=0.2):
        super().__init__()
        self.map_to_feat = nn.Linear(cin, cout, bias=False)
        self.batchnorm = PubVNBatchNorm(cout, dim)
        self.map_to_dir = nn.Linear(cin, 1 if share else cout, bias=False)
        self.negative_slope = negative_slope

    def forward(self, x):
        p = self.batchnorm(self.map_to_feat(x.transpose(1, -1)).transpose(1, -1))
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        return pub_leaky(p, d, self.negative_slope)


class PubVNMaxPool(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.map_to_dir = nn.Linear(c, c, bias=False)

    def forward(self, x):
        d = self.map_to_dir(x.transpose(1, -1)).transpose(1, -1)
        idx = (x * d).sum(2, keepdim=True).max(dim=-1, keepdim=False)[1]
        index_tuple = torch.meshgrid([torch.arange(j) for j in x.size()[:-1]], indexing="ij") + (idx,)
        return x[index_tuple]


class PubVNStdFeature(nn.Module):
    def __init__(self, c, dim=4, negative_slope=0.2):
        super().__init__()
        self.vn1 = PubVNLinearLeakyReLU(c, c // 2, dim, negative_slope=negative_slope)
        self.vn2 = PubVNLinearLeakyReLU(c // 2, c // 4, dim, negative_slope=negative_slope)
        self.vn_lin = nn.Linear(c // 4, 3, bias=False)

    def forward(self, x):
        z0 = self.vn2(self.vn1(x))
        z0 = self.vn_lin(z0.transpose(1, -1)).transpose(1, -1).transpose(1, 2)
        return torch.einsum("bijm,bjkm->bikm", x, z0), z0


class PubNet(nn.Module):
    """A small network in the public style: every module kind once."""

    def __init__(self):
        super().__init__()
        self.lin = PubVNLinear(2, 8)
        self.bn = PubVNBatchNorm(8, 4)
        self.act = PubVNLeakyReLU(8)
        self.block = PubVNLinearLeakyReLU(8, 12, share=True)
        self.std = PubVNStdFeature(12)
        self.pool = PubVNMaxPool(12)

    def forward(self, x):
        h = self.block(self.act(self.bn(self.lin(x))))
        inv, _frame = self.std(h)
        return inv.flatten(1, 2).amax(-1), self.pool(h)


LAYERS = {
    "VNLinear": lambda: PubVNLinear(4, 6),
    "VNBatchNorm": lambda: PubVNBatchNorm(4, 4),
    "VNLeakyReLU": lambda: PubVNLeakyReLU(4),
    "VNLeakyReLU_shared": lambda: PubVNLeakyReLU(4, share=True),
    "VNLinearLeakyReLU": lambda: PubVNLinearLeakyReLU(4, 6),
    "VNMaxPool": lambda: PubVNMaxPool(4),
}


def _grads(module, x):
    x = x.clone().requires_grad_()
    out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum() for o in outs)
    (gx,) = torch.autograd.grad(loss, x)
    return outs, gx


# float32: the same math in a different op order (fused calls, layout moves): round-off only.
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_swap_each_layer(name, train):
    torch.manual_seed(0)
    public = LAYERS[name]().train(train)
    x = torch.randn(3, 4, 3, 10)
    want, gx_want = _grads(public, x)
    ours = swap(public)
    assert isinstance(ours, VNLayoutAdapter), type(ours)
    got, gx_got = _grads(ours.train(train), x)
    for g, w in zip(got, want):
        assert_close_scaled(g, w, 1e-5, f"{name} output")
    assert_close_scaled(gx_got, gx_want, 1e-5, f"{name} dx")


# Whole network: float64 agrees to round-off; in float32 the input gradient passes through training-mode
# batch norm over 32 rows and the ε-divisions of the leaky ReLUs, which amplify rounding (measured
# 2.5e-4 of the largest entry), so its float32 tolerance is looser than the outputs'.
NET_TOLS = {torch.float32: {"out": 1e-5, "grad": 1e-3}, torch.float64: {"out": 1e-11, "grad": 1e-10}}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_swap_whole_network_then_relax(train, dtype):
    torch.manual_seed(1)
    public = PubNet().to(dtype).train(train)
    x = torch.randn(2, 2, 3, 16, dtype=dtype)
    tol = NET_TOLS[dtype]
    want, gx_want = _grads(public, x)
    net = swap(public)
    assert not any(type(m).__name__.startswith("Pub") for m in list(net.modules())[1:]), "every public layer replaced"
    got, gx_got = _grads(net.train(train), x)
    for g, w in zip(got, want):
        assert_close_scaled(g, w, tol["out"], "network output")
    assert_close_scaled(gx_got, gx_want, tol["grad"], "network dx")
    relax(net)
    assert len(list(relaxed_layers(net))) == 1 + 1 + 2 + (2 * 2 + 1)  # lin, act dir, block, std (pool stays)
    got_relaxed, _ = _grads(net.train(train), x)
    for g, w in zip(got_relaxed, want):
        assert_close_scaled(g, w, tol["out"], "relaxed at init")


def test_swapped_network_is_invariant():
    torch.manual_seed(2)
    net = swap(PubNet().double()).eval()
    x = torch.randn(2, 2, 3, 16, dtype=torch.float64)
    R = random_rotation(generator=torch.Generator().manual_seed(0))
    inv, pooled = net(x)
    inv_r, pooled_r = net(torch.einsum("ij,bcjn->bcin", R, x))
    assert_close_scaled(inv_r, inv, 1e-10, "invariant features")
    assert_close_scaled(pooled_r, torch.einsum("ij,bcj->bci", R, pooled), 1e-10, "pooled vectors")


def test_swap_leaves_unknown_modules_alone():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    assert swap(model) is model and isinstance(model[0], nn.Linear)
