"""relaxeq::relaxed_linear_triton (and its backward) against the float64 reference.

On a machine without a GPU the kernels run in the Triton interpreter, which has to be switched
on (TRITON_INTERPRET=1) before the kernel module is imported; shapes are kept tiny because
the interpreter executes every program in numpy.
"""
import pytest
import torch

from testing import (TRITON_BFLOAT16_MARKS, TRITON_DEVICE as DEVICE, TRITON_FLOAT16_MARKS,  # noqa: F401
                     assert_close_scaled, ieee_fp32, skip_module_unless_triton_runs)

skip_module_unless_triton_runs()

from relaxeq_fast import functional  # noqa: E402
from relaxeq_fast.reference import relaxed_linear_backward_ref, relaxed_linear_ref  # noqa: E402
from relaxeq_fast.triton_kernels import relaxed_linear as triton_rl  # noqa: E402

# (dtype, tolerances): an error passes when max|got - ref| <= tol * max(1, max|ref|), scaled once, the
# reference being float64 on the same (upcast) inputs. "stats" is for G and s.
DTYPES = [
    # Summation order of the fp32 accumulators (blocked dot, atomics across row blocks) differs
    # from the float64 reference: ~1e-6 relative at these sizes; TF32 is off (testing.ieee_fp32).
    pytest.param(torch.float32, {"y": 1e-4, "stats": 1e-4, "grad": 1e-4}, id="float32"),
    # Same algorithm in float64: only rounding of a few dozen terms.
    pytest.param(torch.float64, {"y": 1e-10, "stats": 1e-10, "grad": 1e-10}, id="float64"),
    # Outputs are rounded to the input dtype once (fp32 accumulate): 2^-11 and 2^-8 relative. Statistics
    # stay in fp32 and products of halves are exact in fp32: fp32 summation error only.
    pytest.param(torch.float16, {"y": 5e-3, "stats": 1e-4, "grad": 5e-3}, id="float16", marks=TRITON_FLOAT16_MARKS),
    pytest.param(torch.bfloat16, {"y": 2e-2, "stats": 1e-4, "grad": 2e-2}, id="bfloat16",
                 marks=TRITON_BFLOAT16_MARKS),
]
# D not a multiple of the 16/32/64-wide blocks; (40, 40) gives several Gram column blocks.
DIMS = [(5, 3), (17, 33), (40, 40)]
NS = [0, 1, 7, 37, 70]


@pytest.fixture(scope="module")
def op():
    return triton_rl.op()


def _inputs(n, d_in, d_out, dtype, with_c, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    M = torch.randn(d_out, d_in, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    c = torch.randn(d_out, generator=g, dtype=torch.float64).to(dtype).to(DEVICE) if with_c else None
    return x, M, c


def _check(name, got, ref, tol):
    assert_close_scaled(got, ref, tol, name)


class _GridSpy:
    """Stands in for the kernel in the launcher and records each launch grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _spy_on_grids(monkeypatch) -> list:
    real = triton_rl._relaxed_linear_kernel
    spy = _GridSpy(real)
    monkeypatch.setattr(triton_rl, "_relaxed_linear_kernel", spy)
    check = triton_rl.check_device  # it inspects the kernel object (interpreted or not): give it the real one
    monkeypatch.setattr(triton_rl, "check_device", lambda t, opname, _kernel, module: check(t, opname, real, module))
    return spy.grids


def _ref64(*ts):
    return [t.double() if t is not None else None for t in ts]


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("d_in, d_out", DIMS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("with_c", [False, True], ids=["no_c", "c"])
@pytest.mark.parametrize("stats", [False, True], ids=["no_stats", "stats"])
def test_forward(op, n, d_in, d_out, dtype, tol, with_c, stats):
    x, M, c = _inputs(n, d_in, d_out, dtype, with_c)
    y, G, s = op(x, M, c, stats)
    yr, Gr, sr = relaxed_linear_ref(*_ref64(x, M, c), stats)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.dtype == dtype and G.dtype == sdt and s.dtype == sdt
    _check("y", y, yr, tol["y"])
    if stats:
        _check("G", G, Gr, tol["stats"])
        _check("s", s, sr, tol["stats"])
        assert torch.equal(G, G.T), "G must be exactly symmetric (mirrored upper triangle)"
    else:
        assert G.shape == (0, 0) and s.shape == (0,)


@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("sub_blocks", [None, 2], ids=["auto_rows", "2_row_blocks_per_program"])
def test_forward_noncontiguous(op, monkeypatch, dtype, tol, layout, sub_blocks):
    # sub_blocks=2 makes each program loop over two 32-row blocks (N=70: one full and one
    # partial program), the path large inputs take on a GPU.
    monkeypatch.setattr(triton_rl, "_SUB_BLOCKS_PER_PROGRAM", sub_blocks)
    n, d_in, d_out = 70, 40, 33
    g = torch.Generator().manual_seed(1)
    if layout == "transposed":
        x = torch.randn(d_in, n, generator=g, dtype=torch.float64).to(dtype).to(DEVICE).T
    else:
        x = torch.randn(n, 2 * d_in + 1, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)[:, 1::2]
    assert not x.is_contiguous()
    _, M, c = _inputs(n, d_in, d_out, dtype, True)
    M = M.T.contiguous().T  # column-major M as well
    c = torch.stack([c, -c], 1)[:, 0]  # strided c
    assert not c.is_contiguous()
    y, G, s = op(x, M, c, True)
    yr, Gr, sr = relaxed_linear_ref(*_ref64(x, M, c), True)
    _check("y", y, yr, tol["y"])
    _check("G", G, Gr, tol["stats"])
    _check("s", s, sr, tol["stats"])


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("d_in, d_out", DIMS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("with_c", [False, True], ids=["no_c", "c"])
def test_backward_autograd(op, n, d_in, d_out, dtype, tol, with_c):
    x, M, c = _inputs(n, d_in, d_out, dtype, with_c, seed=2)
    dy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, M, c) if t is not None]
    y, G, s = op(x, M, c, True)
    grads = torch.autograd.grad(y, inputs, grad_outputs=dy.to(dtype).to(DEVICE))

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    xr, Mr = ref_inputs[:2]
    cr = ref_inputs[2] if with_c else None
    yr, _, _ = relaxed_linear_ref(xr, Mr, cr, True)
    ref_grads = torch.autograd.grad(yr, ref_inputs, grad_outputs=dy.to(dtype).double().to(DEVICE))
    for name, got, ref in zip(("dx", "dM", "dc"), grads, ref_grads):
        assert got.dtype == dtype
        _check(name, got, ref, tol["grad"])


@pytest.mark.parametrize("dtype, tol", DTYPES[:2])
@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, False],
                                  [False, False, True], [False, True, True], [True, False, True],
                                  [False, False, False]], ids=lambda m: "".join("1" if b else "0" for b in m))
@pytest.mark.parametrize("n", [0, 37])
def test_backward_output_mask(n, dtype, tol, mask):
    bop = triton_rl.backward_op()
    x, M, _ = _inputs(n, 17, 33, dtype, False, seed=4)
    dy = torch.randn(n, 33, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(dtype).to(DEVICE)
    got = bop(dy, x, M, mask)
    ref = relaxed_linear_backward_ref(*_ref64(dy, x, M), mask)
    for name, want, g, r in zip(("dx", "dM", "dc"), mask, got, ref):
        assert g.dtype == dtype
        if not want:
            assert g.shape == (0,), f"{name} not requested: expected an empty [0] tensor, got {tuple(g.shape)}"
        _check(name, g, r, tol["grad"])


# Several row programs. G, s (forward) and dM, dc (backward) are merged across row programs with atomics,
# but the launcher gives the interpreter up to 16 row blocks per program (program_slots = 1), so the
# tests above run one row program. One row block per program (32 rows in the interpreter, 64 on a GPU)
# and N = 3 blocks + 5 rows give 4 row programs, the last one partial.
MASKS = [[True, True, True], [False, True, False], [False, False, True], [True, False, True]]


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("mask", MASKS, ids=lambda m: "".join("1" if b else "0" for b in m))
def test_backward_several_row_programs(monkeypatch, dtype, tol, mask):
    monkeypatch.setattr(triton_rl, "_SUB_BLOCKS_PER_PROGRAM", 1)
    grids = _spy_on_grids(monkeypatch)
    n = 3 * triton_rl._block_sizes(dtype, torch.device(DEVICE))[0] + 5
    x, M, _ = _inputs(n, 40, 33, dtype, False, seed=9)
    dy = torch.randn(n, 33, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(dtype).to(DEVICE)
    got = triton_rl.backward_op()(dy, x, M, mask)
    ref = relaxed_linear_backward_ref(*_ref64(dy, x, M), mask)
    assert [g[0] for g in grids] == [4], f"expected one launch with 4 row programs, got grids {grids}"
    for name, g, r in zip(("dx", "dM", "dc"), got, ref):
        _check(name, g, r, tol["grad"])


@pytest.mark.parametrize("dtype, tol", DTYPES)
@pytest.mark.parametrize("with_c", [False, True], ids=["no_c", "c"])
def test_forward_several_row_programs(op, monkeypatch, dtype, tol, with_c):
    monkeypatch.setattr(triton_rl, "_SUB_BLOCKS_PER_PROGRAM", 1)
    grids = _spy_on_grids(monkeypatch)
    n = 3 * triton_rl._block_sizes(dtype, torch.device(DEVICE))[0] + 5
    x, M, c = _inputs(n, 40, 33, dtype, with_c, seed=11)
    y, G, s = op(x, M, c, True)
    yr, Gr, sr = relaxed_linear_ref(*_ref64(x, M, c), True)
    assert [g[0] for g in grids] == [4], f"expected one launch with 4 row programs, got grids {grids}"
    _check("y", y, yr, tol["y"])
    _check("G", G, Gr, tol["stats"])
    _check("s", s, sr, tol["stats"])


# Every GPU tile configuration (_block_sizes on a CUDA device: one per dtype), forced onto this device:
# compiled on a GPU (scripts/gpu_check.sh), in the interpreter elsewhere (index and mask logic only; warps
# and shared memory are the GPU's). Each config gets 3 row programs of 2 row blocks (the in-kernel row
# loop; the last block partial), 3 column blocks of G (the triangular tile enumeration) and 3 output tiles.
GPU_TILE_CONFIGS = [pytest.param(p.values[0], p.values[1], id=f"{p.id}-" + "x".join(
    map(str, triton_rl._block_sizes(p.values[0], torch.device("cuda")))), marks=p.marks) for p in DTYPES]


@pytest.mark.parametrize("dtype, tol", GPU_TILE_CONFIGS)
def test_gpu_tile_config(op, monkeypatch, dtype, tol):
    config = triton_rl._block_sizes(dtype, torch.device("cuda"))
    block_n, block_o, _block_k, block_s, _ = config
    monkeypatch.setattr(triton_rl, "_block_sizes", lambda *_: config)
    monkeypatch.setattr(triton_rl, "_SUB_BLOCKS_PER_PROGRAM", 2)
    grids = _spy_on_grids(monkeypatch)
    n, d_in, d_out = 5 * block_n + 5, 2 * block_s + 7, 2 * block_o + 3
    x, M, c = _inputs(n, d_in, d_out, dtype, True, seed=12)
    y, G, s = op(x.requires_grad_(), M.requires_grad_(), c.requires_grad_(), True)
    dy = torch.randn(n, d_out, generator=torch.Generator().manual_seed(13), dtype=torch.float64).to(dtype).to(DEVICE)
    grads = torch.autograd.grad(y, (x, M, c), dy)
    yr, Gr, sr = relaxed_linear_ref(*_ref64(x.detach(), M.detach(), c.detach()), True)
    ref_grads = relaxed_linear_backward_ref(*_ref64(dy, x.detach(), M.detach()), [True, True, True])
    assert [g[0] for g in grids] == [3, 3], f"expected 3 row programs per launch, got grids {grids}"
    _check("y", y, yr, tol["y"])
    _check("G", G, Gr, tol["stats"])
    _check("s", s, sr, tol["stats"])
    for name, g, r in zip(("dx", "dM", "dc"), grads, ref_grads):
        _check(name, g, r, tol["grad"])


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter's bfloat16 refusal; a GPU runs bfloat16")
def test_bfloat16_refused_in_the_interpreter(op):
    # The interpreter computes garbage in bfloat16 (testing.TRITON_BFLOAT16_MARKS): a clear error instead.
    x, M, c = _inputs(4, 5, 3, torch.bfloat16, True)
    with pytest.raises(TypeError, match="bfloat16"):
        op(x, M, c, True)


def test_functional_backend_triton():
    x, M, c = _inputs(14, 6, 3, torch.float64, True, seed=6)
    x = x.reshape(2, 7, 6)
    y, st = functional.relaxed_linear(x, M, c, stats=True, backend="triton")
    yr, Gr, sr = relaxed_linear_ref(x.reshape(14, 6), M, c, True)
    _check("y", y.reshape(14, 3), yr, 1e-10)
    _check("G", st.G, Gr, 1e-10)
    _check("s", st.s, sr, 1e-10)
    assert st.n == 14


def test_opcheck(op):
    # Full default test_utils (schema, autograd registration, fake tensor, aot_dispatch_dynamic):
    # the op is opaque to tracing, so the interpreter only ever sees real tensors.
    x, M, c = _inputs(7, 5, 3, torch.float64, True, seed=7)
    x.requires_grad_()
    M.requires_grad_()
    c.requires_grad_()
    torch.library.opcheck(op, (x, M, c, True))
    torch.library.opcheck(op, (x, M, None, False))
    dy = torch.randn(7, 3, dtype=torch.float64, device=DEVICE)
    torch.library.opcheck(triton_rl.backward_op(), (dy, x.detach(), M.detach(), [True, True, True]))
    torch.library.opcheck(triton_rl.backward_op(), (dy, x.detach(), M.detach(), [False, True, False]))


def test_compile_smoke(op):
    # aot_eager: exercises the fake kernels and the autograd formula under tracing without an
    # inductor C++/Triton compile, which would dominate this file's runtime.
    x, M, c = _inputs(9, 5, 3, torch.float64, True, seed=8)
    M.requires_grad_()

    def loss(y, G, s):
        return (y ** 2).sum() + G.trace() + s.sum()

    def f(x, M, c):
        return loss(*op(x, M, c, True))

    out = torch.compile(f, backend="aot_eager", fullgraph=True)(x, M, c)
    (gM,) = torch.autograd.grad(out, M)
    Mr = M.detach().clone().requires_grad_()
    (gMr,) = torch.autograd.grad(loss(*relaxed_linear_ref(x, Mr, c, True)), Mr)
    _check("compiled dM", gM, gMr, 1e-10)


@pytest.mark.parametrize("case, match", [
    ("x_1d", "x must be 2-D"),
    ("M_1d", "M must be 2-D"),
    ("shape_mismatch", r"x must have shape \[N, D_in\] with D_in = M.shape\[1\]"),
    ("dtype_mismatch", "M must have the dtype of x"),
    ("c_shape", r"c must have shape \[D_out\]"),
    ("c_dtype", "c must have the dtype of x"),
    ("int_dtype", "x must be float16, bfloat16, float32 or float64"),
])
def test_bad_input(op, case, match):
    x, M, c = _inputs(4, 5, 3, torch.float32, True)
    args = {
        "x_1d": (x[0], M, c),
        "M_1d": (x, M[0], c),
        "shape_mismatch": (x[:, :4], M, c),
        "dtype_mismatch": (x, M.double(), c),
        "c_shape": (x, M, c[:2]),
        "c_dtype": (x, M, c.double()),
        "int_dtype": (x.int(), M.int(), c.int()),
    }[case]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        op(*args, True)


def test_bad_input_backward():
    x, M, _ = _inputs(4, 5, 3, torch.float32, False)
    bop = triton_rl.backward_op()
    with pytest.raises((ValueError, RuntimeError), match=r"dy must have shape \[N, D_out\]"):
        bop(torch.zeros(4, 2, device=DEVICE), x, M, [True, True, True])
    with pytest.raises((TypeError, RuntimeError), match="dy must have the dtype of x"):
        bop(torch.zeros(4, 3, dtype=torch.float64, device=DEVICE), x, M, [True, True, True])


def test_reloaded_module_reuses_its_defined_ops():
    # The dispatcher outlives the module: a reload must not define the ops again (a second definition
    # raises) and its getters must return the ops already defined, which still compute the same.
    import importlib
    x, M, c = _inputs(7, 5, 3, torch.float64, True)
    before_ops = (triton_rl.op(), triton_rl.backward_op())
    before = triton_rl.op()(x, M, c, True)
    module = importlib.reload(triton_rl)
    assert (module.op(), module.backward_op()) == before_ops
    assert module.op.__doc__ == "``torch.ops.relaxeq.relaxed_linear_triton`` (registered on first call)."
    for got, want in zip(module.op()(x, M, c, True), before):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
