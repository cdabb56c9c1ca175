"""The data-parallel helpers (relaxeq_fast.distributed) on 2 gloo processes against one process on the
whole batch (float64): all_reduce_moments, SyncBatchNorm1d and all_reduce_input_stats.

The batch is split unevenly (4 + 6 rows) so a helper that averaged per-rank moments with equal weights
fails. Each rank writes what it computed; the assertions run here, against references computed on the
whole batch in this process. The trainer-level check (a torchrun run against one process, and a resume
under torchrun) is in test_train_distributed.py.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from relaxeq_fast import distributed as D
from relaxeq_fast.nn import RelaxedLinear
from relaxeq_fast.reps import VN
from relaxeq_fast.vn import VNLinearLeakyReLU, model_regularizers, relax

WORLD = 2
SPLIT = [4, 6]  # rows of the global batch on rank 0 and rank 1
DT = torch.float64
# float64: per-rank partial sums in a different order than one process's sums; rounding only
TOL = dict(rtol=1e-12, atol=1e-12)


def _slice(x: torch.Tensor, rank: int) -> torch.Tensor:
    start = sum(SPLIT[:rank])
    return x[start:start + SPLIT[rank]]


def _worker(rank: int, case: str, init_file: str, out_dir: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        torch.save(CASES[case](rank), os.path.join(out_dir, f"rank{rank}.pt"))
        # no rank tears its gloo pairs down while the other is still using them (a rank that destroyed
        # the group and exited first made its peer abort: 'terminate called without an active exception')
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # the results are on disk: skip the interpreter's teardown, where a thread torch left joinable after the
    # differentiable all-reduces still aborted the process now and then (the barrier above alone did not
    # stop it: 1 of 2 fresh-clone CI runs); exceptions above still propagate and fail the spawn
    os._exit(0)


def _run_ranks(case: str, tmp_path) -> list[dict]:
    mp.spawn(_worker, args=(case, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---- all_reduce_moments -----------------------------------------------------------------------------

def _moments_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SPLIT), 3, generator=g, dtype=DT) * torch.tensor([1.0, 3.0, 0.2], dtype=DT) + 2.0
    a, b = torch.randn(3, generator=g, dtype=DT), torch.randn(3, generator=g, dtype=DT)
    return x, a, b


def _moments_rank(rank):
    x, a, b = _moments_inputs()
    x = _slice(x, rank).clone().requires_grad_()
    var, mean = torch.var_mean(x, dim=0, correction=0)
    gmean, gvar, total = D.all_reduce_moments(mean, var, x.shape[0])
    # every rank holds the global loss; Σ over ranks of loss / world is the single-process loss
    ((gmean * a).sum() + (gvar * b).sum()).div(WORLD).backward()
    return dict(mean=gmean.detach(), var=gvar.detach(), total=total, grad=x.grad)


def test_all_reduce_moments_gives_the_global_moments_and_their_gradient(tmp_path):
    x, a, b = _moments_inputs()
    x = x.clone().requires_grad_()
    mean, var = x.mean(0), (x - x.mean(0)).square().mean(0)
    ((mean * a).sum() + (var * b).sum()).backward()
    ranks = _run_ranks("moments", tmp_path)
    for r in ranks:
        assert r["total"] == sum(SPLIT)
        torch.testing.assert_close(r["mean"], mean.detach(), **TOL)
        torch.testing.assert_close(r["var"], var.detach(), **TOL)
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, **TOL)


# ---- SyncBatchNorm1d ---------------------------------------------------------------------------------

BN_ARGS = dict(num_features=3, eps=1e-2, momentum=0.3)  # not the defaults: both must be used


def _bn_inputs(shape):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(sum(SPLIT), *shape, generator=g, dtype=DT) * 2 + 1
    w = torch.randn(x.shape, generator=g, dtype=DT)
    return x, w


def _bn_state(bn):
    return {"weight": bn.weight.detach().clone(), "bias": bn.bias.detach().clone()}


def _bn_init(bn):
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -1.0], dtype=DT))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=DT))
    return bn


def _sync_bn_rank(rank):
    out = {}
    for name, shape in (("2d", (3,)), ("3d", (3, 5))):
        x, w = _bn_inputs(shape)
        bn = _bn_init(D.SyncBatchNorm1d(**BN_ARGS, dtype=DT))
        xl = _slice(x, rank).clone().requires_grad_()
        y = bn(xl)
        (y * _slice(w, rank)).sum().backward()  # the local part of Σ_all y·w
        out[name] = dict(y=y.detach(), dx=xl.grad, dweight=bn.weight.grad, dbias=bn.bias.grad,
                         running_mean=bn.running_mean, running_var=bn.running_var)
    return out


@pytest.mark.parametrize("name, shape", [("2d", (3,)), ("3d", (3, 5))])
def test_sync_batch_norm_equals_batch_norm_of_the_global_batch(name, shape, tmp_path_factory):
    ranks = _ranks_once("sync_bn", tmp_path_factory)
    x, w = _bn_inputs(shape)
    x = x.clone().requires_grad_()
    # independent reference: the normalisation written out, not nn.BatchNorm1d
    dims = [0] + list(range(2, x.dim()))
    view = [1, -1] + [1] * (x.dim() - 2)
    mean = x.mean(dims)
    var = (x - mean.view(view)).square().mean(dims)
    weight = torch.tensor([0.5, 1.5, -1.0], dtype=DT, requires_grad=True)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=DT, requires_grad=True)
    y = (x - mean.view(view)) / torch.sqrt(var.view(view) + BN_ARGS["eps"]) * weight.view(view) + bias.view(view)
    (y * w).sum().backward()
    n = x.numel() // x.shape[1]
    m = BN_ARGS["momentum"]
    running_mean = m * mean.detach()
    running_var = (1 - m) * 1.0 + m * var.detach() * n / (n - 1)  # unbiased, from the initial 1
    got = [r[name] for r in ranks]
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), y.detach(), **TOL)
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), x.grad, **TOL)
    # DDP sums (then averages) the parameter gradients of the ranks
    torch.testing.assert_close(sum(g["dweight"] for g in got), weight.grad, **TOL)
    torch.testing.assert_close(sum(g["dbias"] for g in got), bias.grad, **TOL)
    for g in got:
        torch.testing.assert_close(g["running_mean"], running_mean, **TOL)
        torch.testing.assert_close(g["running_var"], running_var, **TOL)


_CACHE: dict = {}


def _ranks_once(case, tmp_path_factory):
    """Spawn the ranks once per case per session (process start-up dominates)."""
    if case not in _CACHE:
        _CACHE[case] = _run_ranks(case, tmp_path_factory.mktemp(case))
    return _CACHE[case]


# ---- all_reduce_input_stats --------------------------------------------------------------------------

def _stats_model():
    torch.manual_seed(0)
    # a VNLinearLeakyReLU (two relaxed maps fused into one call: shared statistics) then a relaxed layer
    model = nn.Sequential(VNLinearLeakyReLU(4, 5, use_batchnorm=False, dtype=DT),
                          RelaxedLinear(VN(5), VN(6), relax_init="default", dtype=DT))
    relax(model, relax_init="default")
    return model.train()


def _stats_inputs():
    # [B, N, C, 3]: 2 points per sample, so each rank has fewer rows than the first layer's 12 features
    # (its rows are kept; after the reduction they must not be used)
    return torch.randn(sum(SPLIT), 2, 4, 3, generator=torch.Generator().manual_seed(2), dtype=DT)


def _layer_record(model):
    layers = [model[0].map_to_feat, model[0].map_to_dir, model[1]]
    terms = model_regularizers(model)
    return dict(G=[m.last_stats.G for m in layers], s=[m.last_stats.s for m in layers],
                n=[m.last_stats.n for m in layers], rows_kept=[m.last_rows is not None for m in layers],
                shared=layers[0].last_stats is layers[1].last_stats,
                r_ld=sum(t.lie_derivative for t in terms).detach(), r_n=sum(t.projection for t in terms).detach())


def _input_stats_rank(rank):
    model = _stats_model()
    model(_slice(_stats_inputs(), rank))
    before = _layer_record(model)
    D.all_reduce_input_stats(model)
    return dict(before=before, after=_layer_record(model))


def test_all_reduce_input_stats_gives_every_rank_the_global_statistics(tmp_path):
    model = _stats_model()
    x = _stats_inputs()
    model(x)
    want = _layer_record(model)
    ranks = _run_ranks("input_stats", tmp_path)
    for r in ranks:
        assert any(r["before"]["rows_kept"])  # the rows path was live before the reduction
        got = r["after"]
        assert got["n"] == want["n"] and got["rows_kept"] == [False] * 3 and got["shared"]
        for a, b in zip(got["G"] + got["s"], want["G"] + want["s"]):
            torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(got["r_ld"], want["r_ld"], **TOL)
        torch.testing.assert_close(got["r_n"], want["r_n"], **TOL)
    # and the per-rank statistics were really different from the global ones
    assert ranks[0]["before"]["n"][0] < want["n"][0]


CASES = {"moments": _moments_rank, "sync_bn": _sync_bn_rank, "input_stats": _input_stats_rank}
