"""Vector-Neuron batch norm: the fused ops (vn_norm_stats, vn_batch_norm_apply + backward) on the
native CPU/CUDA kernels and on Triton, through functional.vn_batch_norm, against the float64
reference relaxeq_fast.reference.vn_batch_norm_ref (its autograd gives the reference gradients).

Triton tests run through the interpreter on machines without a GPU (TRITON_INTERPRET=1 is set by
conftest.py before anything imports the kernel module); their shapes are kept tiny.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relaxeq_fast
from relaxeq_fast import functional
from relaxeq_fast.reference import vn_batch_norm_ref

from testing import DEVICES, WRITABLE_LAYOUTS, RecordOps, assert_close_scaled, layouts, num_threads, with_layout

needs_native = pytest.mark.skipif(not relaxeq_fast.build_info()["extension_loaded"],
                                  reason="relaxeq_fast._C is not built")
_triton_runnable = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_triton = pytest.mark.skipif(
    not (_triton_runnable and relaxeq_fast.triton_available()),
    reason="Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported (and triton installed)")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# rtol relative to the largest entry of the float64 reference (see assert_close_scaled).
# float32: norms, normalisation and rescaling each round once (~1e-7), and the gradient of the
# batch statistics sums N terms: 1e-5 for y, 1e-4 for the gradients. But batch norm is badly
# conditioned when a channel's norms nearly coincide (N = 2 at random: σ can be ~1e-3 of the
# norms), invstd amplifying the rounding of the norms; there a float32 kernel is only asked to be
# no worse than 4x torch's own float32 evaluation of the reference (see check()).
# float64: the same algorithm up to summation order; the Triton path adds norm_eps as a float32
# constant (its scalar arguments are fp32), ~1e-15 on the norms.
TOLS = [
    pytest.param(torch.float32, {"y": 1e-5, "grad": 1e-4, "stats": 1e-5}, id="float32"),
    pytest.param(torch.float64, {"y": 1e-12, "grad": 1e-10, "stats": 1e-12}, id="float64"),
]
NS = [2, 7, 300]
CS = [1, 5, 33]
# train_running: batch stats + running stats updated; train_batch: batch stats, no running stats;
# eval: running stats (eval mode without them is an error, as in torch's batch_norm).
MODES = ["train_running", "train_batch", "eval"]


def make_inputs(n, c, dtype, device, affine=True, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    shape = (*(lead if lead is not None else (n,)), c, 3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    w = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    rm = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b), cast(rm), cast(rv)


def _mode_args(mode, rm, rv):
    training = mode != "eval"
    if mode == "train_batch":
        return None, None, training
    return rm, rv, training


def check_against(got, ref, same_dtype_ref, dtype, tol, name):
    """assert_close_scaled against the float64 reference `ref`; below float64, no tighter than 4x the error of
    torch's own evaluation of the reference in the input dtype (`same_dtype_ref`): see TOLS."""
    if dtype != torch.float64 and ref.numel():
        floor = (same_dtype_ref.double() - ref.double()).abs().max().item()
        tol = max(tol, 4 * floor / max(1.0, ref.abs().max().item()))
    assert_close_scaled(got, ref, tol, name)


def run_and_compare(backend, device, dtype, tols, n, c, mode, affine, seed=0, x=None, momentum=0.1, eps=1e-5,
                    norm_eps=1e-6):
    """Forward, running stats and gradients (x, weight, bias) of the functional on ``backend``
    against the reference in float64 on the same (rounded) inputs, at the given momentum / eps /
    norm_eps (torch's and the functional's defaults unless said)."""
    x0, w, b, rm, rv = make_inputs(n, c, dtype, device, affine, seed)
    x = x0 if x is None else x.to(device=device, dtype=dtype)
    training = mode != "eval"
    if mode == "train_batch":
        rm = rv = None

    def running(cast):
        return (None, None) if rm is None else (cast(rm.detach().clone()), cast(rv.detach().clone()))

    rm_r, rv_r = running(torch.Tensor.double)  # reference in float64
    rm_d, rv_d = running(lambda t: t)          # reference evaluated by torch in the input dtype

    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    y = functional.vn_batch_norm(x, rm, rv, w, b, training, momentum, eps, norm_eps, backend=backend)
    assert y.dtype == dtype and y.shape == x.shape
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, gy.to(device=device, dtype=dtype))

    def reference(cast, rm_, rv_):
        ls = [cast(t.detach()).requires_grad_() for t in leaves]
        wr, br = (ls[1], ls[2]) if affine else (None, None)
        yr = vn_batch_norm_ref(ls[0], rm_, rv_, wr, br, training, momentum, eps, norm_eps)
        return yr, torch.autograd.grad(yr, ls, cast(gy.to(device)))

    yr, grads_r = reference(torch.Tensor.double, rm_r, rv_r)
    yd, grads_d = reference(lambda t: t.to(dtype).clone(), rm_d, rv_d)

    def check(got, ref, same_dtype_ref, tol, name):
        check_against(got, ref, same_dtype_ref, dtype, tol, name)

    assert torch.isfinite(y).all()
    check(y, yr, yd, tols["y"], "y")
    for name, g, gr, gd in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_r, grads_d):
        assert g.dtype == dtype
        check(g, gr, gd, tols["grad"], name)
    if rm is not None:
        check(rm, rm_r, rm_d, tols["stats"], "running_mean")
        check(rv, rv_r, rv_d, tols["stats"], "running_var")


# ------------------------------------------------------------------ native (CPU, CUDA) kernels

@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tols", TOLS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_native_matches_reference(device, dtype, tols, n, c, mode, affine):
    run_and_compare("native", device, dtype, tols, n, c, mode, affine)


# Non-default (momentum, eps, norm_eps): every other case runs at 0.1 / 1e-5 / 1e-6, which a backend
# hard-coding them would pass. Each value is chosen to matter on unit-Gaussian vectors, whose norms have
# a variance of about 0.45: eps = 0.5 or 1e-2 is a large or a visible part of var + eps; norm_eps = 0.25
# shifts every norm (the mean absorbs the shift, the rescaling y = x nb / norm does not); momentum 0.5
# and 1.0 (running stats := batch stats) and 0.03 move the running stats to visibly different places.
BN_PARAMS = [
    pytest.param(0.5, 0.5, 1e-6, id="m0.5-eps0.5"),
    pytest.param(1.0, 1e-2, 0.25, id="m1-eps1e-2-normeps0.25"),
    pytest.param(0.03, 1e-5, 1e-6, id="m0.03"),
]
BN_DEFAULTS = {"momentum": 0.1, "eps": 1e-5, "norm_eps": 1e-6}


def assert_params_matter(n, c, mode, params, seed=0):
    """Non-vacuity of a non-default case: putting any one non-default parameter back to its default
    changes the float64 reference (y or the running stats) by far more than any tolerance."""
    x, w, b, rm, rv = make_inputs(n, c, torch.float64, "cpu", seed=seed)
    rm_, rv_, training = _mode_args(mode, rm, rv)

    def outputs(p):
        rm2, rv2 = (None, None) if rm_ is None else (rm_.clone(), rv_.clone())
        y = vn_batch_norm_ref(x, rm2, rv2, w, b, training, p["momentum"], p["eps"], p["norm_eps"])
        return [y] + ([] if rm2 is None else [rm2, rv2])

    want = outputs(params)
    for name, default in BN_DEFAULTS.items():
        if params[name] == default or (name == "momentum" and (not training or rm_ is None)):
            continue  # momentum only acts on running stats in training mode
        other = outputs({**params, name: default})
        diff = max((a - o).abs().max().item() for a, o in zip(want, other))
        assert diff > 1e-3, f"{name} = {params[name]} vs {default}: references differ by only {diff:.1e}"


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tols", TOLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum, eps, norm_eps", BN_PARAMS)
def test_native_nondefault_momentum_and_eps(device, dtype, tols, mode, momentum, eps, norm_eps):
    params = {"momentum": momentum, "eps": eps, "norm_eps": norm_eps}
    assert_params_matter(300, 5, mode, params, seed=21)
    run_and_compare("native", device, dtype, tols, 300, 5, mode, True, seed=21, **params)


# Property test of the native CPU ops (vn_norm_stats, vn_batch_norm_apply and its backward op, checked to
# run) through functional.vn_batch_norm: tiny shapes (one or two leading dims, size 1 and odd sizes, C up to
# 9), both dtypes (tolerances: TOLS, with check_against's floor for badly conditioned float32 batches), every
# mode, affine or not, non-default momentum / eps / norm_eps drawn too, and x, weight, bias and the running
# stats each in a drawn memory layout (testing.LAYOUTS; x broadcast along channels or xyz only -- rows all
# equal would make the variance 0; running stats, updated in place, never broadcast). With one leading dim
# the ops get x's strides as they are (the reshape to [N, C, 3] is a view). Against the float64 reference on
# contiguous copies.
@needs_native
@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), c=st.integers(1, 9),
       dtype_tols=st.sampled_from([(p.values[0], p.values[1]) for p in TOLS]), mode=st.sampled_from(MODES),
       affine=st.booleans(), momentum=st.sampled_from([0.1, 0.5]), eps=st.sampled_from([1e-5, 1e-2]),
       norm_eps=st.sampled_from([1e-6, 0.25]), layout_x=layouts((-2, -1)), layout_w=layouts(), layout_b=layouts(),
       layout_rm=layouts(allowed=WRITABLE_LAYOUTS), layout_rv=layouts(allowed=WRITABLE_LAYOUTS),
       seed=st.integers(0, 2 ** 16))
def test_hypothesis_native_strided_inputs_match_reference(lead, c, dtype_tols, mode, affine, momentum, eps, norm_eps,
                                                          layout_x, layout_w, layout_b, layout_rm, layout_rv, seed):
    dtype, tols = dtype_tols
    training = mode != "eval"
    if training and math.prod(lead) < 2:
        lead = [2] + lead[1:]  # batch statistics need two rows
    x, w, b, rm, rv = make_inputs(0, c, dtype, "cpu", affine, seed, lead=lead)
    x = with_layout(x, *layout_x)
    w = None if w is None else with_layout(w, *layout_w)
    b = None if b is None else with_layout(b, *layout_b)
    running = mode != "train_batch"
    rm_d = with_layout(rm, *layout_rm) if running else None
    rv_d = with_layout(rv, *layout_rv) if running else None
    leaves = [t.requires_grad_() for t in (x, w, b) if t is not None]
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    with RecordOps() as ops:
        y = functional.vn_batch_norm(x, rm_d, rv_d, w, b, training, momentum, eps, norm_eps, backend="native")
        grads = torch.autograd.grad(y, leaves, gy.to(dtype))
    expected_ops = ["relaxeq.vn_batch_norm_apply", "relaxeq.vn_batch_norm_apply_backward"]
    assert all(op in ops.ops for op in expected_ops + ["relaxeq.vn_norm_stats"] * training), ops.ops

    def reference(ref_dtype):
        """y, the gradients and the running stats by vn_batch_norm_ref on contiguous [N, C, 3] copies."""
        ls = [t.detach().to(ref_dtype).contiguous().requires_grad_() for t in leaves]
        wr, br = (ls[1], ls[2]) if affine else (None, None)
        rm_r, rv_r = (rm.to(ref_dtype).clone(), rv.to(ref_dtype).clone()) if running else (None, None)
        yr = vn_batch_norm_ref(ls[0].reshape(-1, c, 3), rm_r, rv_r, wr, br, training, momentum, eps, norm_eps)
        yr = yr.reshape(x.shape)
        return yr, torch.autograd.grad(yr, ls, gy.to(ref_dtype)), rm_r, rv_r

    yr, grads_r, rm_r, rv_r = reference(torch.float64)
    yd, grads_d, rm_dd, rv_dd = reference(dtype)
    assert y.shape == x.shape and y.dtype == dtype
    check_against(y, yr, yd, dtype, tols["y"], "y")
    for name, leaf, g, gr, gd in zip(("grad_x", "grad_weight", "grad_bias"), leaves, grads, grads_r, grads_d):
        assert g.shape == leaf.shape, f"{name}: shape {tuple(g.shape)} != the input's {tuple(leaf.shape)}"
        check_against(g, gr, gd, dtype, tols["grad"], name)
    if running:
        check_against(rm_d, rm_r, rm_dd, dtype, tols["stats"], "running_mean")
        check_against(rv_d, rv_r, rv_dd, dtype, tols["stats"], "running_var")


@needs_native
@pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision kernels are CUDA-only (needs a GPU)")
@pytest.mark.parametrize("dtype, tols", [
    # Inputs/outputs rounded once to 2^-11 (float16) / 2^-8 (bfloat16); fp32 math and fp32 stats.
    pytest.param(torch.float16, {"y": 5e-3, "grad": 2e-2, "stats": 1e-3}, id="float16"),
    pytest.param(torch.bfloat16, {"y": 3e-2, "grad": 1e-1, "stats": 1e-2}, id="bfloat16"),
])
@pytest.mark.parametrize("mode", MODES)
def test_native_half_precision_cuda(dtype, tols, mode):
    run_and_compare("native", "cuda", dtype, tols, 300, 33, mode, True)


# 1 vs 2 threads. The CPU kernels (csrc/cpu/vn_batch_norm.cpp) split the rows with at::parallel_for in
# chunks of at least row_grain(C) = 4096 // C rows: with 2 threads and N >= 2 * grain, the forward merges
# two per-thread Welford partials (Chan's update) and the backward adds two per-thread partial sums;
# with 1 thread neither merge runs. The two halves of the batch get different scales, so a merge that
# dropped or double-counted one thread's partial would move the statistics by O(1).
THREAD_N, THREAD_C = 4096, 7
THREAD_TOLS = [
    # float32: the kernels accumulate in double and round the stats once to float32: the two thread
    # counts can differ by an ulp of the stats, ~1e-7 relative, amplified a few times by invstd.
    pytest.param(torch.float32, 2e-6, id="float32"),
    # float64: the same sums in another order: round-off only.
    pytest.param(torch.float64, 1e-13, id="float64"),
]


@needs_native
@pytest.mark.parametrize("dtype, tol", THREAD_TOLS)
def test_native_one_and_two_threads_agree_and_match_reference(dtype, tol):
    assert THREAD_N >= 2 * (4096 // THREAD_C), "too few rows for the parallel path (row_grain in the .cpp)"
    x, w, b, rm, rv = make_inputs(THREAD_N, THREAD_C, torch.float64, "cpu", seed=30)
    x = x * torch.where(torch.arange(THREAD_N) < THREAD_N // 2, 1.0, 3.0).to(torch.float64).view(-1, 1, 1)
    x, w, b, rm, rv = (t.to(dtype) for t in (x, w, b, rm, rv))
    gy = torch.randn(x.shape, generator=torch.Generator().manual_seed(31), dtype=torch.float64).to(dtype)
    momentum, eps = 0.3, 1e-3

    def run(threads):
        with num_threads(threads):
            assert torch.get_num_threads() == threads
            rm_, rv_ = rm.clone(), rv.clone()
            leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
            y = functional.vn_batch_norm(leaves[0], rm_, rv_, leaves[1], leaves[2], True, momentum, eps,
                                         backend="native")
            grads = torch.autograd.grad(y, leaves, gy)
        return {"y": y, "running_mean": rm_, "running_var": rv_, "grad_x": grads[0], "grad_weight": grads[1],
                "grad_bias": grads[2]}

    one, two = run(1), run(2)
    for name in one:
        assert_close_scaled(two[name], one[name], tol, f"{name}: 2 threads vs 1")

    # and the 2-thread result against the float64 reference
    rm64, rv64 = rm.double(), rv.double()
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    yr = vn_batch_norm_ref(leaves[0], rm64, rv64, leaves[1], leaves[2], True, momentum, eps, 1e-6)
    grads_r = torch.autograd.grad(yr, leaves, gy.double())
    tols = dict(TOLS[0].values[1] if dtype == torch.float32 else TOLS[1].values[1])
    assert_close_scaled(two["y"], yr, tols["y"], "y (2 threads) vs reference")
    assert_close_scaled(two["running_mean"], rm64, tols["stats"], "running_mean (2 threads) vs reference")
    assert_close_scaled(two["running_var"], rv64, tols["stats"], "running_var (2 threads) vs reference")
    for name, g in zip(("grad_x", "grad_weight", "grad_bias"), grads_r):
        assert_close_scaled(two[name], g, tols["grad"], f"{name} (2 threads) vs reference")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train_running", "eval"])
def test_native_zero_vectors(device, mode):
    # norm_eps keeps 0/0 away: zero vectors (scattered, and one whole channel) map to zero, with
    # finite gradients equal to the reference's (torch's norm has gradient 0 at 0).
    x, *_ = make_inputs(7, 5, torch.float64, device, seed=3)
    x[1, 2] = 0
    x[4, 0] = 0
    x[:, 3] = 0
    run_and_compare("native", device, torch.float64, {"y": 1e-12, "grad": 1e-10, "stats": 1e-12}, 7, 5, mode,
                    True, seed=3, x=x)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tols", [
    # invstd = 1/sqrt(eps) ≈ 316 multiplies the float32 rounding of the mean (the statistics are
    # float32 by design, the norms are not): ~316 * 6e-8 * norm on the normalised values.
    pytest.param(torch.float32, {"y": 1e-4, "grad": 1e-3, "stats": 1e-5}, id="float32"),
    pytest.param(torch.float64, {"y": 1e-12, "grad": 1e-10, "stats": 1e-12}, id="float64"),
])
def test_native_duplicated_rows(device, dtype, tols):
    # Every row the same: the batch variance is 0 and invstd = 1/sqrt(eps) (large); the Welford
    # variance of identical values is exactly 0.
    x, *_ = make_inputs(1, 5, torch.float64, device, seed=4)
    x = x.expand(9, 5, 3).clone()
    run_and_compare("native", device, dtype, tols, 9, 5, "train_running", True, seed=4, x=x)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_batch_dims_and_noncontiguous(device):
    # [B, P, C, 3] with a non-contiguous layout: statistics over B*P rows.
    x = torch.randn(6, 4, 5, 3, dtype=torch.float64, device=device).transpose(0, 1)  # [4, 6, 5, 3]
    assert not x.is_contiguous()
    _, w, b, rm, rv = make_inputs(24, 5, torch.float64, device)
    rm_r, rv_r = rm.clone(), rv.clone()
    y = functional.vn_batch_norm(x, rm, rv, w, b, training=True, backend="native")
    yr = vn_batch_norm_ref(x.reshape(24, 5, 3), rm_r, rv_r, w, b, True, 0.1, 1e-5, 1e-6).reshape(x.shape)
    assert_close_scaled(y, yr, 1e-12, "y")
    assert_close_scaled(rm, rm_r, 1e-12, "running_mean")
    # The ops themselves take strided x (channel-strided view here).
    big = torch.randn(7, 10, 3, dtype=torch.float64, device=device)
    xs = big[:, ::2]
    mean, var = torch.ops.relaxeq.vn_norm_stats(xs, 1e-6)
    norms = torch.linalg.vector_norm(xs, dim=-1) + 1e-6
    assert_close_scaled(mean, norms.mean(0), 1e-12, "mean")
    assert_close_scaled(var, norms.var(0, unbiased=False), 1e-12, "var")


@needs_native
@pytest.mark.parametrize("device", DEVICES)
def test_native_single_row_eval(device):
    # One row is fine in eval mode (running statistics); training mode refuses it (BAD_CALLS).
    run_and_compare("native", device, torch.float64, {"y": 1e-12, "grad": 1e-10, "stats": 1e-12}, 1, 5, "eval", True)


@needs_native
def test_native_empty_batch_eval():
    _, w, b, rm, rv = make_inputs(1, 4, torch.float32, "cpu")
    y = functional.vn_batch_norm(torch.zeros(0, 4, 3), rm, rv, w, b, training=False, backend="native")
    assert y.shape == (0, 4, 3)
    mean, var = torch.ops.relaxeq.vn_norm_stats(torch.zeros(0, 4, 3), 1e-6)
    assert mean.shape == (4,) and torch.isnan(mean).all() and torch.isnan(var).all()


@needs_native
@pytest.mark.parametrize("mask", [(True, False, False, False, False), (False, True, True, False, False),
                                  (False, False, False, True, True), (True, True, True, True, True),
                                  (False,) * 5], ids=lambda m: "".join("1" if v else "0" for v in m))
def test_native_backward_output_mask(mask):
    x, w, b, rm, rv = make_inputs(11, 5, torch.float64, "cpu", seed=5)
    gy = torch.randn_like(x)
    args = (gy, x, rm, rv.rsqrt(), w, b, 1e-6)
    full = torch.ops.relaxeq.vn_batch_norm_apply_backward(*args, [True] * 5)
    got = torch.ops.relaxeq.vn_batch_norm_apply_backward(*args, list(mask))
    for want, g, f in zip(mask, got, full):
        if want:
            assert_close_scaled(g, f, 1e-14)
        else:
            assert g.shape == (0,)


@needs_native
def test_native_gradcheck_float64():
    x, w, b, rm, rv = make_inputs(6, 3, torch.float64, "cpu", seed=6)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    # Training mode: gradients flow through the batch statistics (vn_norm_stats' autograd).
    assert torch.autograd.gradcheck(
        lambda x, w, b: functional.vn_batch_norm(x, None, None, w, b, training=True, backend="native"), inputs)
    assert torch.autograd.gradcheck(
        lambda x, w, b: functional.vn_batch_norm(x, rm, rv, w, b, training=False, backend="native"), inputs)
    # The ops on their own, every differentiable input.
    mean = rm.clone().requires_grad_()
    invstd = rv.rsqrt().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, m, s, w, b: torch.ops.relaxeq.vn_batch_norm_apply(x, m, s, w, b, 1e-6),
        (x, mean, invstd, w, b))
    assert torch.autograd.gradcheck(lambda x: torch.ops.relaxeq.vn_norm_stats(x, 1e-6), (x,))


@needs_native
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_native_opcheck(affine):
    x, w, b, rm, rv = make_inputs(7, 5, torch.float64, "cpu", affine=affine, seed=7)
    x.requires_grad_()
    torch.library.opcheck(torch.ops.relaxeq.vn_norm_stats.default, (x, 1e-6))
    mean, invstd = rm.clone().requires_grad_(), rv.rsqrt().requires_grad_()
    if affine:
        w.requires_grad_()
        b.requires_grad_()
    torch.library.opcheck(torch.ops.relaxeq.vn_batch_norm_apply.default, (x, mean, invstd, w, b, 1e-6))
    gy = torch.randn(7, 5, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.relaxeq.vn_batch_norm_apply_backward.default,
                          (gy, x.detach(), rm, rv.rsqrt(), None if w is None else w.detach(),
                           None if b is None else b.detach(), 1e-6, [True, True, True, affine, affine]))


@needs_native
def test_native_torch_compile_fullgraph_eval():
    x, w, b, rm, rv = make_inputs(0, 5, torch.float32, "cpu", lead=(4, 6), seed=8)

    def f(x, rm, rv, w, b):
        return functional.vn_batch_norm(x, rm, rv, w, b, training=False, backend="native").square().sum()

    compiled = torch.compile(f, fullgraph=True)
    w.requires_grad_()
    out_c = compiled(x, rm, rv, w, b)
    (gw_c,) = torch.autograd.grad(out_c, w)
    out_e = f(x, rm, rv, w, b)
    (gw_e,) = torch.autograd.grad(out_e, w)
    assert_close_scaled(out_c, out_e, 1e-6, "loss")
    assert_close_scaled(gw_c, gw_e, 1e-6, "grad_weight")


def random_rotation(seed, dtype=torch.float64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(device=device, dtype=dtype)


@needs_native
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["train_running", "eval"])
def test_native_rotation_equivariance(device, mode):
    # Rotating every vector keeps every norm, hence the statistics: y(x Rᵀ) = y(x) Rᵀ.
    x, w, b, rm, rv = make_inputs(0, 6, torch.float64, device, lead=(5, 8), seed=9)
    rm_, rv_, training = _mode_args(mode, rm, rv)
    R = random_rotation(10, device=device)
    y = functional.vn_batch_norm(x, rm_, rv_, w, b, training=training, backend="native")
    y_rot = functional.vn_batch_norm(x @ R.T, rm_, rv_, w, b, training=training, backend="native")
    assert_close_scaled(y_rot, y @ R.T, 1e-12, "y(x R^T) - y(x) R^T")


# Bad input: every error names the argument at fault.
_x = lambda *s, **kw: torch.randn(*s, **kw)  # noqa: E731
BAD_CALLS = [
    ("x must have shape [..., C, 3]", lambda: functional.vn_batch_norm(_x(4, 5, 2), None, None, training=True)),
    ("weight must have shape [C] = [5]",
     lambda: functional.vn_batch_norm(_x(4, 5, 3), None, None, _x(4), training=True)),
    ("running_mean must have shape [C] = [5]", lambda: functional.vn_batch_norm(_x(4, 5, 3), _x(3), _x(5))),
    ("running_mean and running_var must both be given",
     lambda: functional.vn_batch_norm(_x(4, 5, 3), _x(5), None, training=True)),
    ("eval mode needs running_mean and running_var",
     lambda: functional.vn_batch_norm(_x(4, 5, 3), None, None, training=False)),
    ("training mode needs more than one value per channel",
     lambda: functional.vn_batch_norm(_x(1, 5, 3), None, None, training=True)),
    ("bias must have the dtype of x",
     lambda: functional.vn_batch_norm(_x(4, 5, 3), None, None, None, _x(5, dtype=torch.float64), training=True,
                                      backend="native")),
    ("weight must be on the device of x",
     lambda: functional.vn_batch_norm(_x(4, 5, 3), None, None, _x(5, device="meta"), training=True)),
    ("x must have shape [N, C, 3]", lambda: torch.ops.relaxeq.vn_norm_stats(_x(4, 5), 1e-6)),
    ("x must be float32 or float64 on CPU",
     lambda: torch.ops.relaxeq.vn_norm_stats(_x(4, 5, 3, dtype=torch.float16), 1e-6)),
    ("mean must have dtype", lambda: torch.ops.relaxeq.vn_batch_norm_apply(
        _x(4, 5, 3), _x(5, dtype=torch.float64), _x(5), None, None, 1e-6)),
    ("invstd must have shape [C] with C = x.shape[1] = 5",
     lambda: torch.ops.relaxeq.vn_batch_norm_apply(_x(4, 5, 3), _x(5), _x(4), None, None, 1e-6)),
    ("grad_y must have the shape of x", lambda: torch.ops.relaxeq.vn_batch_norm_apply_backward(
        _x(4, 5), _x(4, 5, 3), _x(5), _x(5), None, None, 1e-6, [True] * 5)),
    ("backend must be one of", lambda: functional.vn_batch_norm(_x(4, 5, 3), None, None, training=True,
                                                                backend="fast")),
]


@needs_native
@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_names_the_argument(message, call):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call()
    assert message in str(info.value), str(info.value)


# ------------------------------------------------------------------ Triton kernels (interpreter on CPU)

TRITON_TOLS = [
    TOLS[0],
    TOLS[1],
    pytest.param(torch.float16, {"y": 5e-3, "grad": 2e-2, "stats": 1e-3}, id="float16",
                 marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="half precision needs a GPU")),
]


@pytest.fixture
def triton_vn(monkeypatch):
    from relaxeq_fast.triton_kernels import vn_batch_norm as triton_vn_batch_norm
    return triton_vn_batch_norm


@needs_triton
@pytest.mark.parametrize("dtype, tols", TRITON_TOLS)
@pytest.mark.parametrize("n, c", [(2, 1), (7, 5), (37, 9)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_triton_matches_reference(triton_vn, dtype, tols, n, c, mode, affine):
    run_and_compare("triton", TRITON_DEVICE, dtype, tols, n, c, mode, affine)


@needs_triton
@pytest.mark.parametrize("dtype, tols", TOLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("momentum, eps, norm_eps", BN_PARAMS)
def test_triton_nondefault_momentum_and_eps(triton_vn, dtype, tols, mode, momentum, eps, norm_eps):
    params = {"momentum": momentum, "eps": eps, "norm_eps": norm_eps}
    assert_params_matter(7, 5, mode, params, seed=22)
    run_and_compare("triton", TRITON_DEVICE, dtype, tols, 7, 5, mode, True, seed=22, **params)


@needs_triton
@pytest.mark.parametrize("dtype, tols", TOLS)
@pytest.mark.parametrize("mode", MODES)
def test_triton_norm_eps_zero(triton_vn, dtype, tols, mode):
    # norm_eps = 0 (allowed): the tiles' masked lanes hold zero vectors, whose 0/0 must not reach the
    # per-channel sums of the backward (it did: grad_mean and grad_invstd came out NaN).
    run_and_compare("triton", TRITON_DEVICE, dtype, tols, 7, 5, mode, True, seed=3, norm_eps=0.0)


@needs_triton
@pytest.mark.parametrize("dtype, tols", TOLS)
def test_triton_several_row_programs(triton_vn, monkeypatch, dtype, tols):
    # 8 rows per program: several partial statistics to combine, atomics across programs in the
    # backward, and (BLOCK_N = 8 in the interpreter) full and partial row chunks.
    monkeypatch.setattr(triton_vn, "_ROWS_PER_PROGRAM", 8)
    run_and_compare("triton", TRITON_DEVICE, dtype, tols, 29, 6, "train_running", True, seed=11)


@needs_triton
def test_triton_zero_vectors_and_duplicates(triton_vn):
    x, *_ = make_inputs(7, 5, torch.float64, "cpu", seed=3)
    x[1, 2] = 0
    x[:, 3] = 0
    x[:, 4] = x[0, 4]  # duplicated rows in channel 4: zero variance
    # grad 1e-8: channel 4's 1/√(var + eps) ~ 1e3 turns last-bit differences in the reductions (GPU FMA
    # contraction and summation order; measured 2.5e-9 of the scale on an H200) into ~1e-9 relative errors.
    run_and_compare("triton", TRITON_DEVICE, torch.float64, {"y": 1e-12, "grad": 1e-8, "stats": 1e-12}, 7, 5,
                    "train_running", True, seed=3, x=x)


@needs_triton
def test_triton_rotation_equivariance(triton_vn):
    x, w, b, _, _ = make_inputs(0, 4, torch.float64, TRITON_DEVICE, lead=(3, 4), seed=12)
    R = random_rotation(13, device=TRITON_DEVICE)
    y = functional.vn_batch_norm(x, None, None, w, b, training=True, backend="triton")
    y_rot = functional.vn_batch_norm(x @ R.T, None, None, w, b, training=True, backend="triton")
    assert_close_scaled(y_rot, y @ R.T, 1e-12, "y(x R^T) - y(x) R^T")


@needs_triton
def test_triton_gradcheck_and_opcheck(triton_vn):
    x, w, b, rm, rv = make_inputs(5, 3, torch.float64, TRITON_DEVICE, seed=14)
    inputs = tuple(t.requires_grad_() for t in (x, w, b))
    assert torch.autograd.gradcheck(
        lambda x, w, b: functional.vn_batch_norm(x, None, None, w, b, training=True, backend="triton"), inputs)
    mean, invstd = rm.clone().requires_grad_(), rv.rsqrt().requires_grad_()
    torch.library.opcheck(triton_vn.stats_op(), (x, 1e-6))
    torch.library.opcheck(triton_vn.apply_op(), (x, mean, invstd, w, b, 1e-6))
    torch.library.opcheck(triton_vn.apply_op(), (x, mean, invstd, None, None, 1e-6))
    gy = torch.randn(5, 3, 3, dtype=torch.float64, device=TRITON_DEVICE)
    torch.library.opcheck(triton_vn.backward_op(),
                          (gy, x.detach(), rm, rv.rsqrt(), w.detach(), b.detach(), 1e-6, [True] * 5))


@needs_triton
def test_triton_bad_input(triton_vn):
    with pytest.raises(ValueError, match=r"x must have shape \[N, C, 3\]"):
        triton_vn.stats_op()(torch.randn(4, 5, device=TRITON_DEVICE), 1e-6)
    with pytest.raises(TypeError, match="mean must have dtype"):
        triton_vn.apply_op()(torch.randn(4, 5, 3, device=TRITON_DEVICE), torch.zeros(5, dtype=torch.float64,
                                                                                     device=TRITON_DEVICE),
                             torch.ones(5, device=TRITON_DEVICE), None, None, 1e-6)


# ------------------------------------------------------------------ stats_reducer (global-batch statistics)
#
# functional.vn_batch_norm(..., stats_reducer=f) hands the local batch moments (mean, biased var, rows)
# to f and normalises with what it returns (relaxeq_fast.distributed.all_reduce_moments across ranks).
# Here f merges them with the moments of a fixed second "virtual rank" batch by Chan's formula, so the
# result must be the batch norm of the concatenated batch, restricted to the local rows, with gradients
# through the local part of the statistics. That expectation is computed below from scratch in float64
# (no relaxeq code), so every backend's reducer path is checked, including the reference backend's own
# branch in functional.vn_batch_norm.

def concat_batch_norm64(x, x_virtual, weight, bias, eps, norm_eps):
    """Float64 VN batch norm of cat([x, x_virtual]) over rows: (y of x's rows, batch mean, biased var)."""
    xa = torch.cat([x.double(), x_virtual.double()])
    norm = (xa * xa).sum(-1).sqrt() + norm_eps
    mean = norm.mean(0)
    var = (norm - mean).square().mean(0)
    nb = (norm - mean) / (var + eps).sqrt() * weight.double() + bias.double()
    return (xa * (nb / norm).unsqueeze(-1))[: len(x)], mean, var


def make_virtual_rank_reducer(x_virtual, norm_eps, calls):
    """stats_reducer merging the local moments with those of x_virtual (constant: no gradient)."""
    norm = (x_virtual.double() * x_virtual.double()).sum(-1).sqrt() + norm_eps
    mean_v, var_v, n_v = norm.mean(0), (norm - norm.mean(0)).square().mean(0), len(x_virtual)

    def reducer(mean, var, n):
        calls.append(n)
        mv, vv = mean_v.to(mean.dtype), var_v.to(var.dtype)
        total = n + n_v
        delta = mv - mean
        return mean + delta * (n_v / total), (n * var + n_v * vv) / total + delta.square() * (n * n_v / total ** 2), total
    return reducer


REDUCER_BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("native", "cpu", marks=needs_native, id="native-cpu"),
    pytest.param("native", "cuda", id="native-cuda", marks=[needs_native, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible on this machine)")]),
    pytest.param("triton", TRITON_DEVICE, marks=needs_triton, id=f"triton-{TRITON_DEVICE}"),
]


@pytest.mark.parametrize("dtype, tols", TOLS)
@pytest.mark.parametrize("backend, device", REDUCER_BACKENDS)
def test_stats_reducer_gives_the_concatenated_batch(backend, device, dtype, tols):
    g = torch.Generator().manual_seed(40)
    c, momentum, eps, norm_eps = 4, 0.25, 1e-3, 1e-6
    x = torch.randn(2, 5, c, 3, generator=g, dtype=torch.float64)      # [B, P, C, 3]: 10 local rows
    x_virtual = 2.0 * torch.randn(13, c, 3, generator=g, dtype=torch.float64) + 0.5
    w = torch.randn(c, generator=g, dtype=torch.float64)
    b = torch.randn(c, generator=g, dtype=torch.float64)
    rm = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    rv = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    gy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    cast = lambda t: t.to(device=device, dtype=dtype, copy=True)  # noqa: E731  (the originals stay put)

    calls = []
    xl, wl, bl = (cast(t).requires_grad_() for t in (x, w, b))
    rm_d, rv_d = cast(rm), cast(rv)
    y = functional.vn_batch_norm(xl, rm_d, rv_d, wl, bl, True, momentum, eps, norm_eps, backend=backend,
                                 stats_reducer=make_virtual_rank_reducer(cast(x_virtual), norm_eps, calls))
    assert calls == [10], f"the reducer must be called once with the local row count, got {calls}"
    grads = torch.autograd.grad(y, (xl, wl, bl), cast(gy))

    x64, w64, b64 = (t.clone().requires_grad_() for t in (x.reshape(10, c, 3), w, b))
    yr, mean, var = concat_batch_norm64(x64, x_virtual, w64, b64, eps, norm_eps)
    grads_r = torch.autograd.grad(yr, (x64, w64, b64), gy.reshape(10, c, 3))
    # non-vacuous: the local batch alone normalises visibly differently
    y_local, _, _ = concat_batch_norm64(x.reshape(10, c, 3), x_virtual[:0], w, b, eps, norm_eps)
    assert (y_local - yr).abs().max() > 1e-1

    assert_close_scaled(y, yr.reshape(x.shape), tols["y"], "y")
    for name, got, want in zip(("grad_x", "grad_weight", "grad_bias"), grads, grads_r):
        assert_close_scaled(got, want.reshape(got.shape), tols["grad"], name)
    # running stats: momentum, and the unbiased variance over all 23 rows
    assert_close_scaled(rm_d, (1 - momentum) * rm + momentum * mean, tols["stats"], "running_mean")
    assert_close_scaled(rv_d, (1 - momentum) * rv + momentum * var * 23 / 22, tols["stats"], "running_var")


def test_vn_batch_norm_module_uses_its_stats_reducer():
    # VNBatchNorm.stats_reducer (what distributed.sync_batch_norms sets) reaches the functional.
    from relaxeq_fast import use_backend
    from relaxeq_fast.vn import VNBatchNorm
    g = torch.Generator().manual_seed(41)
    x = torch.randn(9, 3, 3, generator=g, dtype=torch.float64)
    x_virtual = 3.0 * torch.randn(6, 3, 3, generator=g, dtype=torch.float64)
    bn = VNBatchNorm(3, eps=1e-3, momentum=0.5, dtype=torch.float64).train()
    calls = []
    bn.stats_reducer = make_virtual_rank_reducer(x_virtual, bn.norm_eps, calls)
    with use_backend("reference"):
        y = bn(x)
    yr, mean, _ = concat_batch_norm64(x, x_virtual, bn.weight.detach(), bn.bias.detach(), 1e-3, bn.norm_eps)
    assert calls == [9]
    assert_close_scaled(y, yr, 1e-12, "y")
    assert_close_scaled(bn.running_mean, 0.5 * mean, 1e-12, "running_mean")
