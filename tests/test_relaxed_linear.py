"""relaxed_linear op (native CPU/CUDA kernels) against the float64 pure-PyTorch reference."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import relaxeq_fast
from relaxeq_fast import relaxed_linear, relaxed_linear_ref, use_backend
from relaxeq_fast.backend import cuda_fused_max_dim
from relaxeq_fast.reference import relaxed_linear_backward_ref

from testing import CUDA_SKIP_REASON, DEVICES, assert_close_scaled, num_threads

pytestmark = pytest.mark.skipif(not relaxeq_fast.build_info()["extension_loaded"],
                                reason="relaxeq_fast._C is not built")

# rtol relative to the largest reference entry, applied once: max|err| <= tol * max(1, max|ref|)
# (see assert_close_scaled).
# float32: y sums D_in products, G/dM sum N products: accumulated rounding ~ sqrt(K) * 6e-8 per entry,
# plus GEMM blocking order; 1e-5 for y/dx, 5e-5 for sums over rows (up to ~1000).
# float64: round-off only.
TOLS = {
    torch.float32: {"y": 1e-5, "stats": 5e-5, "grad": 5e-5},
    torch.float64: {"y": 1e-12, "stats": 1e-11, "grad": 1e-11},
}
# (40000, 63, 63) is past the CPU kernel's cache-resident size: the row-chunked single-pass path.
SHAPES = [(0, 5, 3), (1, 3, 6), (7, 63, 63), (1031, 65, 17), (513, 300, 257), (40000, 63, 63)]


def make_inputs(n, d_in, d_out, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    M = torch.randn(d_out, d_in, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) / d_in ** 0.5
    c = torch.randn(d_out, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) if bias else None
    return x, M, c


def ref64(x, M, c, stats=True):
    return relaxed_linear_ref(x.double(), M.double(), None if c is None else c.double(), stats)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d_in,d_out", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_reference(device, dtype, n, d_in, d_out, bias):
    x, M, c = make_inputs(n, d_in, d_out, dtype, device, bias)
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    y_ref, G_ref, s_ref = ref64(x, M, c)
    assert y.dtype == dtype and G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_scaled(y, y_ref, TOLS[dtype]["y"], "y")
    assert_close_scaled(G, G_ref, TOLS[dtype]["stats"], "G")
    assert_close_scaled(s, s_ref, TOLS[dtype]["stats"], "s")
    assert torch.equal(G, G.T), "G must be exactly symmetric"


@pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)
@pytest.mark.parametrize("max_dim", [0, 100000], ids=["cublas", "tiled_kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d_in,d_out", [(7, 63, 63), (1031, 65, 17), (40000, 63, 63)])
def test_cuda_routes_match_reference(max_dim, dtype, n, d_in, d_out):
    """The CUDA op runs narrow layers through its tiled kernel and wide ones through cuBLAS
    (cuda_fused_max_dim moves the switch): each route, forced, against float64."""
    with cuda_fused_max_dim(max_dim):
        _check_cuda_route(dtype, n, d_in, d_out)


def _check_cuda_route(dtype, n, d_in, d_out):
    x, M, c = make_inputs(n, d_in, d_out, dtype, "cuda")
    x.requires_grad_(); M.requires_grad_(); c.requires_grad_()
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    y_ref, G_ref, s_ref = ref64(x.detach(), M.detach(), c.detach())
    for name, got, want, tol in (("y", y, y_ref, "y"), ("G", G, G_ref, "stats"), ("s", s, s_ref, "stats")):
        assert_close_scaled(got, want, TOLS[dtype][tol], name)
    assert torch.equal(G, G.T), "G must be exactly symmetric"
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, M, c), dy)
    x64, M64, c64 = (t.detach().double().requires_grad_() for t in (x, M, c))
    grads64 = torch.autograd.grad(relaxed_linear_ref(x64, M64, c64, True)[0], (x64, M64, c64), dy.double())
    for name, g, g64 in zip(("dx", "dM", "dc"), grads, grads64):
        assert_close_scaled(g, g64, TOLS[dtype]["grad"], name)


@pytest.mark.parametrize("device", DEVICES)
def test_no_stats_returns_empty(device):
    x, M, c = make_inputs(9, 4, 2, torch.float32, device)
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, False)
    assert G.shape == (0, 0) and s.shape == (0,) and y.shape == (9, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,d_in,d_out", SHAPES)
def test_backward_matches_reference(device, dtype, n, d_in, d_out):
    x, M, c = make_inputs(n, d_in, d_out, dtype, device)
    x.requires_grad_(); M.requires_grad_(); c.requires_grad_()
    y, _, _ = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, M, c), dy)
    x64, M64, c64 = (t.detach().double().requires_grad_() for t in (x, M, c))
    y64, _, _ = relaxed_linear_ref(x64, M64, c64, True)
    grads64 = torch.autograd.grad(y64, (x64, M64, c64), dy.double())
    for name, g, g64 in zip(("dx", "dM", "dc"), grads, grads64):
        assert_close_scaled(g, g64, TOLS[dtype]["grad"], name)


@pytest.mark.parametrize("mask", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, True, True), (False, False, False)])
def test_backward_op_output_mask(mask):
    x, M, _ = make_inputs(37, 11, 5, torch.float64, "cpu")
    dy = torch.randn(37, 5, dtype=torch.float64)
    got = torch.ops.relaxeq.relaxed_linear_backward(dy, x, M, list(mask))
    want = relaxed_linear_backward_ref(dy, x, M, mask)
    for g, w, m in zip(got, want, mask):
        assert g.shape == w.shape
        if m:
            assert_close_scaled(g, w, 1e-12)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_batch_dims(device):
    base = torch.randn(4, 6, 2 * 13, dtype=torch.float64, device=device)
    x = base[..., ::2]  # [4, 6, 13], stride 2 in the last dim
    xt = torch.randn(13, 24, dtype=torch.float64, device=device).T  # transposed view [24, 13]
    M = torch.randn(5, 13, dtype=torch.float64, device=device)
    with use_backend("native"):
        y, st = relaxed_linear(x, M, stats=True)
        yt, stt = relaxed_linear(xt, M, stats=True)
    y_ref, G_ref, _ = relaxed_linear_ref(x.reshape(-1, 13).contiguous(), M, None, True)
    assert y.shape == (4, 6, 5) and st.n == 24
    assert_close_scaled(y.reshape(-1, 5), y_ref, 1e-12, "y")
    assert_close_scaled(st.G, G_ref, 1e-12, "G")
    assert_close_scaled(yt, xt.contiguous() @ M.T, 1e-12, "y (transposed x)")
    assert_close_scaled(stt.G, xt.T @ xt, 1e-12, "G (transposed x)")


def test_threads_do_not_change_results():
    x, M, c = make_inputs(40000, 40, 30, torch.float64, "cpu")  # 12.8 MB: the chunked path
    with num_threads(1):
        one = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    with num_threads(2):
        two = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    for a, b, name in zip(one, two, "yGs"):
        assert_close_scaled(a, b, 1e-12, name)


# The CPU kernel's row-chunked path (csrc/cpu/relaxed_linear.cpp), mirrored here to build shapes that reach
# it: taken when max(D_in, D_out) < kWideColumns = 256 and x is larger than kCacheResidentBytes = 8 MiB;
# chunks of max(64, 256 KiB / row bytes) rows, rows D_in wide in the forward, max(D_in, D_out) wide in the
# backward; one partial G/s (dM/dc) per thread, added at the end.
def chunk_rows(width: int, dtype: torch.dtype) -> int:
    return max(64, (256 * 1024) // (width * dtype.itemsize))


def chunked_n(d_in: int, dtype: torch.dtype, width: int, tail: int, extra_chunks: int = 0) -> int:
    """The smallest N past the cache-resident size that ends on a partial chunk of `tail` rows (0: full)."""
    chunk = chunk_rows(width, dtype)
    n_full = (8 << 20) // (d_in * dtype.itemsize) // chunk + 1 + extra_chunks
    return n_full * chunk + tail


def assert_chunked(n, d_in, d_out, dtype):
    assert max(d_in, d_out) < 256 and n * d_in * dtype.itemsize > 8 << 20, "not the chunked path"


# (dtype, D_in, D_out, tail rows of the last chunk): non-square, odd widths, a one-row tail (where an
# off-by-one chunk count drops the last chunk), a tail one short of a full chunk, no tail; D_in from 3
# (chunks of ~11000 rows) to 255 (128-row chunks). Tolerances: TOLS. float32 keeps D_in >= 16: G sums a
# whole chunk (65536 / D_in rows) in one GEMM, ~1e-4 relative error at D_in = 7 (measured), within 5e-5
# from D_in = 16 (chunks <= 4096 rows); float64 has room for any width.
CHUNKED_SHAPES = [
    (torch.float64, 61, 37, 1),
    (torch.float64, 37, 130, "full-1"),
    (torch.float64, 255, 3, 0),
    (torch.float64, 3, 5, 1),
    (torch.float32, 67, 41, 1),
    (torch.float32, 17, 45, 5),
    (torch.float32, 129, 255, "full-1"),
]
CHUNKED_IDS = [f"{str(dt)[6:]}-{d_in}x{d_out}-tail{tail}" for dt, d_in, d_out, tail in CHUNKED_SHAPES]


def _tail(spec, width, dtype):
    return chunk_rows(width, dtype) - 1 if spec == "full-1" else spec


@pytest.mark.parametrize("dtype,d_in,d_out,tail", CHUNKED_SHAPES, ids=CHUNKED_IDS)
@pytest.mark.parametrize("stats", [True, False], ids=["stats", "no_stats"])
@pytest.mark.parametrize("threads", [1, 3])
def test_chunked_path_forward(dtype, d_in, d_out, tail, stats, threads):
    # 3 threads: more partial sums than the 2 of this machine's default (and the 1-thread path).
    n = chunked_n(d_in, dtype, d_in, _tail(tail, d_in, dtype))
    assert_chunked(n, d_in, d_out, dtype)
    x, M, c = make_inputs(n, d_in, d_out, dtype, "cpu", bias=stats, seed=n)
    with num_threads(threads):
        y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, stats)
    y_ref, G_ref, s_ref = ref64(x, M, c, stats)
    assert_close_scaled(y, y_ref, TOLS[dtype]["y"], "y")
    assert_close_scaled(G, G_ref, TOLS[dtype]["stats"], "G")
    assert_close_scaled(s, s_ref, TOLS[dtype]["stats"], "s")


@pytest.mark.parametrize("dtype,d_in,d_out,tail", CHUNKED_SHAPES, ids=CHUNKED_IDS)
@pytest.mark.parametrize("mask", [(True, True, True), (False, True, False), (False, False, True)],
                         ids=["all", "dM", "dc"])
def test_chunked_path_backward(dtype, d_in, d_out, tail, mask):
    width = max(d_in, d_out)  # the backward chunks by the wider side
    n = chunked_n(d_in, dtype, width, _tail(tail, width, dtype))
    assert_chunked(n, d_in, d_out, dtype)
    x, M, _ = make_inputs(n, d_in, d_out, dtype, "cpu", seed=n + 1)
    dy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(n + 2), dtype=torch.float64).to(dtype)
    with num_threads(3):
        got = torch.ops.relaxeq.relaxed_linear_backward(dy, x, M, list(mask))
    want = relaxed_linear_backward_ref(dy.double(), x.double(), M.double(), mask)
    for name, g, w, m in zip(("dx", "dM", "dc"), got, want, mask):
        if m:
            assert_close_scaled(g, w, TOLS[dtype]["grad"], name)
        else:
            assert g.numel() == 0, name


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(d_in=st.integers(16, 255), d_out=st.integers(1, 64), tail=st.integers(0, 10 ** 6),
       dtype=st.sampled_from([torch.float32, torch.float64]), stats=st.booleans(), bias=st.booleans(),
       extra_chunks=st.integers(0, 3))
def test_fuzz_chunked_path(d_in, d_out, tail, dtype, stats, bias, extra_chunks):
    # Widths below 256 (D_in >= 16 for float32, see CHUNKED_SHAPES; D_out <= 64 keeps y, N x D_out with
    # N ~ 2^21 / D_in rows, small enough to compare quickly), any tail of the last chunk.
    tail %= chunk_rows(d_in, dtype)
    n = chunked_n(d_in, dtype, d_in, tail, extra_chunks)
    assert_chunked(n, d_in, d_out, dtype)
    x, M, c = make_inputs(n, d_in, d_out, dtype, "cpu", bias, seed=n)
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, stats)
    y_ref, G_ref, s_ref = ref64(x, M, c, stats)
    assert_close_scaled(y, y_ref, TOLS[dtype]["y"], "y")
    assert_close_scaled(G, G_ref, TOLS[dtype]["stats"], "G")
    assert_close_scaled(s, s_ref, TOLS[dtype]["stats"], "s")


def test_cuda_kernels_registered_when_built():
    info = relaxeq_fast.build_info()
    if not info["cuda"]:
        pytest.skip("extension built without CUDA kernels")
    table = torch._C._dispatch_dump("relaxeq::relaxed_linear")
    assert "CUDA" in table and "CPU" in table, table
    assert "CUDA" in torch._C._dispatch_dump("relaxeq::relaxed_linear_backward")
    assert info["cuda_archs"], "build_info must list the CUDA archs compiled"


def test_meta_tensors_use_the_fake_kernel():
    x, M = torch.empty(11, 6, device="meta"), torch.empty(4, 6, device="meta")
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, None, True)
    assert y.shape == (11, 4) and G.shape == (6, 6) and s.shape == (6,) and y.device.type == "meta"


# fp16/bf16: inputs rounded to 8/11-bit mantissas, fp32 accumulation; bf16 has the coarser rounding.
HALF_TOLS = {torch.float16: 2e-3, torch.bfloat16: 2e-2}
HALF_SHAPES = [shape for shape in SHAPES[1:] if shape[0] < 10000]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,d_in,d_out", HALF_SHAPES)
def test_half_precision(dtype, n, d_in, d_out, device):
    x, M, c = make_inputs(n, d_in, d_out, dtype, device)
    x.requires_grad_(); M.requires_grad_()
    y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
    assert G.dtype == torch.float32 and s.dtype == torch.float32
    y_ref, G_ref, s_ref = ref64(x.detach(), M.detach(), c)  # reference on the rounded inputs
    assert_close_scaled(y, y_ref, HALF_TOLS[dtype], "y")
    assert_close_scaled(G, G_ref, 1e-5, "G (fp32 accumulation of exactly representable products)")
    assert_close_scaled(s, s_ref, 1e-5, "s")
    dy = torch.randn_like(y)
    dx, dM = torch.autograd.grad(y, (x, M), dy)
    assert_close_scaled(dx, dy.double() @ M.detach().double(), HALF_TOLS[dtype], "dx")
    assert_close_scaled(dM, dy.double().T @ x.detach().double(), HALF_TOLS[dtype], "dM")


def test_gradcheck_float64():
    x, M, c = make_inputs(6, 5, 4, torch.float64, "cpu")
    inputs = tuple(t.requires_grad_() for t in (x, M, c))
    assert torch.autograd.gradcheck(lambda x, M, c: torch.ops.relaxeq.relaxed_linear(x, M, c, True)[0], inputs)


@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(stats, bias):
    x, M, c = make_inputs(7, 5, 3, torch.float64, "cpu", bias)
    args = (x.requires_grad_(), M.requires_grad_(), None if c is None else c.requires_grad_(), stats)
    torch.library.opcheck(torch.ops.relaxeq.relaxed_linear.default, args)
    dy = torch.randn(7, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.relaxeq.relaxed_linear_backward.default,
                          (dy, x.detach(), M.detach(), [True, True, bias]))


def test_stats_are_not_differentiable():
    x, M, c = make_inputs(5, 4, 3, torch.float64, "cpu")
    y, G, s = torch.ops.relaxeq.relaxed_linear(x.requires_grad_(), M, c, True)
    assert y.requires_grad and not G.requires_grad and not s.requires_grad


# Bad input: every error names the argument at fault.
BAD_CALLS = [
    ("x must be 2-D", lambda: torch.ops.relaxeq.relaxed_linear(torch.randn(2, 3, 4), torch.randn(5, 4), None, True)),
    ("M must be 2-D", lambda: torch.ops.relaxeq.relaxed_linear(torch.randn(2, 4), torch.randn(4), None, True)),
    ("D_in = M.shape[1] = 4", lambda: torch.ops.relaxeq.relaxed_linear(torch.randn(2, 5), torch.randn(3, 4), None, True)),
    ("M must have the dtype of x", lambda: torch.ops.relaxeq.relaxed_linear(
        torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64), None, True)),
    ("c must have shape [D_out]", lambda: torch.ops.relaxeq.relaxed_linear(
        torch.randn(2, 4), torch.randn(3, 4), torch.randn(4), True)),
    ("c must have the dtype of x", lambda: torch.ops.relaxeq.relaxed_linear(
        torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, dtype=torch.float64), True)),
    ("x must be float32, float64, bfloat16 or float16 on CPU", lambda: torch.ops.relaxeq.relaxed_linear(
        torch.ones(2, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32), None, True)),
    ("dy must have shape [N, D_out]", lambda: torch.ops.relaxeq.relaxed_linear_backward(
        torch.randn(2, 2), torch.randn(2, 4), torch.randn(3, 4), [True, True, True])),
    # through the functional layer (checks before dispatch, so device mismatches name the argument too)
    ("M must be on the device of x", lambda: relaxed_linear(torch.randn(2, 4), torch.randn(3, 4, device="meta"))),
    ("M must be 2-D", lambda: relaxed_linear(torch.randn(2, 4), torch.randn(3, 4, 1))),
    ("x must have shape [..., D_in]", lambda: relaxed_linear(torch.tensor(1.0), torch.randn(3, 4))),
    ("backend must be one of", lambda: relaxed_linear(torch.randn(2, 4), torch.randn(3, 4), backend="fast")),
]


@pytest.mark.parametrize("message,call", BAD_CALLS, ids=[m for m, _ in BAD_CALLS])
def test_bad_input_names_the_argument(message, call):
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        call()
    assert message in str(info.value), str(info.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 300), d_in=st.integers(1, 80), d_out=st.integers(1, 80), bias=st.booleans(),
       stats=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_fuzz_shapes_cpu(n, d_in, d_out, bias, stats, seed):
    x, M, c = make_inputs(n, d_in, d_out, torch.float64, "cpu", bias, seed)
    got = torch.ops.relaxeq.relaxed_linear(x, M, c, stats)
    want = relaxed_linear_ref(x, M, c, stats)
    for g, w, name in zip(got, want, "yGs"):
        assert_close_scaled(g, w, 1e-12, name)


def test_torch_compile_fullgraph_op():
    x, M, c = make_inputs(33, 12, 7, torch.float32, "cpu")

    def step(x, M, c):
        y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
        return (y.square().sum() + G.trace() + s.sum())

    compiled = torch.compile(step, fullgraph=True)
    M.requires_grad_()
    out_c = compiled(x, M, c)
    (gc,) = torch.autograd.grad(out_c, M)
    out_e = step(x, M, c)
    (ge,) = torch.autograd.grad(out_e, M)
    assert_close_scaled(out_c, out_e, 1e-6, "loss")
    assert_close_scaled(gc, ge, 1e-6, "dM")
