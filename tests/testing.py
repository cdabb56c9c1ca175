"""Shared test helpers: devices, tolerances, comparisons against float64 references, the Triton set-up."""
import contextlib
import math
import os

import pytest
import torch
from hypothesis import strategies as st


def has_cuda() -> bool:
    return torch.cuda.is_available()


CUDA_SKIP_REASON = "needs a CUDA GPU (none visible on this machine)"

# Devices for native kernels: CPU always, CUDA where a GPU exists (skipped with a reason elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not has_cuda(), reason=CUDA_SKIP_REASON))]

# Triton kernels run on the GPU, or on CPU tensors in the interpreter, which triton.jit switches on
# when a kernel is decorated: TRITON_INTERPRET=1 (conftest.py) must be set before triton is imported.
TRITON_DEVICE = "cuda" if has_cuda() else "cpu"
# Half precision in Triton. float16 runs in the interpreter (numpy has float16; measured errors ~2e-4 of the
# scale, inside the float16 tolerances), so its tests run everywhere. bfloat16 does not: numpy has no
# bfloat16, the interpreter keeps bfloat16 tensors as their raw uint16 bits and tl.dot (np.matmul) multiplies
# those integers, which gives errors ~1e10 (measured, triton 3.8); the ops therefore refuse bfloat16 on CPU
# with a TypeError, and bfloat16 Triton tests need a GPU.
TRITON_FLOAT16_MARKS = []
TRITON_BFLOAT16_MARKS = [pytest.mark.cuda, pytest.mark.skipif(
    not has_cuda(), reason="bfloat16 Triton needs a GPU: the interpreter keeps bfloat16 as raw uint16 bits and "
                           "tl.dot multiplies those integers (garbage), so the ops refuse bfloat16 on CPU")]


def skip_module_unless_triton_runs():
    """Skip the calling test module unless Triton can run here. Call it at module level, before
    importing triton or a kernel module, so the interpreter switch is read in time."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not has_cuda():
        pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
                    "(the interpreter runs the kernels on CPU tensors)", allow_module_level=True)
    pytest.importorskip("triton", reason="triton is not installed")


@contextlib.contextmanager
def num_threads(n: int):
    """Run the body with n intra-op threads (1 and several take different native paths)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """TF32 off for matmuls and convolutions: the Triton kernels follow torch's switches, and fp32
    tolerances should mean the same on every machine. Autouse in the modules that import it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, name: str = "value"):
    """max|actual - expected| <= rtol * max(1, max|expected|), with the errors printed first.

    Error of a float32 GEMM/reduction grows with the magnitude of the result, not element by element,
    so tolerances here are relative to the largest entry of the float64 reference.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    err = (a - e).abs()
    scale = max(1.0, e.abs().max().item())
    print(f"{name}: max abs err {err.max().item():.3e}, mean {err.mean().item():.3e}, scale {scale:.3e}, "
          f"rtol {rtol:.1e}")
    assert err.max().item() <= rtol * scale, f"{name}: max abs err {err.max().item():.3e} > {rtol:.1e} * {scale:.3e}"


def binomial_tol(p: float, n: int, sigmas: float = 5.0) -> float:
    """Tolerance on an observed fraction of n Bernoulli(p) draws."""
    return sigmas * math.sqrt(p * (1 - p) / n)


def assert_fraction(observed: float, expected: float, n: int, name: str, extra: float = 0.0):
    tol = binomial_tol(expected, n) + extra
    print(f"{name}: observed {observed:.4f}, expected {expected:.4f}, tol {tol:.4f}")
    assert abs(observed - expected) <= tol, f"{name}: observed {observed:.4f}, expected {expected:.4f} ± {tol:.4f}"


# Memory layouts for the property tests (hypothesis) of the ops' non-contiguous inputs. with_layout(t, layout,
# dim) returns a tensor with t's values (for "expanded": t's first slice along dim, repeated) in that layout;
# an op's result on it must equal the reference on a contiguous copy of it.
#   contiguous  a plain copy
#   transposed  the last two dims swapped, made contiguous, swapped back (.mT): the rows are strided
#   permuted    every dim reversed, made contiguous, put back: no dim has stride 1 where it should
#   sliced      every other entry, in every dim, of a buffer twice as large that holds NaN in between (a
#               kernel that steps by the wrong stride reads NaN); for a 0-d tensor, one entry of a 3-vector
#               at storage offset 1
#   expanded    a broadcast view: stride 0 along dim (where the op allows repeated values there)
# "transposed" and "permuted" of a tensor with fewer than 2 dims are "sliced".
LAYOUTS = ("contiguous", "transposed", "permuted", "sliced", "expanded")
WRITABLE_LAYOUTS = ("contiguous", "transposed", "permuted", "sliced")  # for tensors updated in place


def layouts(expand_dims=(0,), allowed=LAYOUTS):
    """Hypothesis strategy: (layout, dim) arguments of with_layout; dim, the one expanded, from expand_dims."""
    return st.tuples(st.sampled_from(allowed), st.sampled_from(expand_dims))


def with_layout(t: torch.Tensor, layout: str, dim: int = 0) -> torch.Tensor:
    """t (detached) in the memory layout `layout` (see LAYOUTS), with the same values except for "expanded"."""
    t = t.detach()
    if layout == "contiguous":
        return t.clone()
    if layout == "expanded":
        if t.dim() == 0 or t.shape[dim] == 0:
            return t.clone()
        return t.narrow(dim, 0, 1).expand(t.shape)
    if layout == "transposed" and t.dim() >= 2:
        return t.mT.contiguous().mT
    if layout == "permuted" and t.dim() >= 2:
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)  # reversing twice is the identity
    if t.dim() == 0:
        buffer = torch.full((3,), float("nan"), dtype=t.dtype, device=t.device)
        buffer[1] = t
        return buffer[1]
    buffer = torch.full([2 * n for n in t.shape], float("nan"), dtype=t.dtype, device=t.device)
    view = buffer[(slice(None, None, 2),) * t.dim()]
    view.copy_(t)
    return view


def contiguous64(t):
    """A detached, contiguous float64 copy for the reference (None stays None)."""
    return None if t is None else t.detach().to(torch.float64).contiguous()


def record_need_S(monkeypatch) -> list:
    """Make relaxeq_fast.functional.relaxed_conv2d log, in the returned list, the need_S it passes to
    the op of whichever backend."""
    from relaxeq_fast import functional

    seen = []
    raw = functional._raw_relaxed_conv2d

    def spy(backend):
        op = raw(backend)

        def call(*args):
            seen.append(args[-1])
            return op(*args)
        return call

    monkeypatch.setattr(functional, "_raw_relaxed_conv2d", spy)
    return seen


def conv2d_im2col_ref(x, M, c, D, padding: int, dy=None, dr: float = 0.0) -> dict:
    """relaxed_conv2d and its gradients in float64 by explicit im2col: shifted slices of the zero-padded x
    and einsum, with the gradients written out by hand. Independent of torch's convolution routines
    (F.conv2d, F.unfold, aten.convolution_backward), which the native and Triton backwards and the autograd
    of relaxed_conv2d_ref all share.

    x [B, C_in, H, W], M [C_out, C_in, k, k], c [C_out] or None, D [C_d, C_in, k, k] or None. Returns y and,
    with D, r = Σ z² and S = Σ_pixels z ⊗ patch (z = conv(x, D)); with dy, the gradients of
    L = <y, dy> + dr·r: dx, dM, dc (y only: r sees the detached x) and dD = 2 dr S.
    """
    f64 = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    x, M, c, D, dy = f64(x), f64(M), f64(c), f64(D), f64(dy)
    b, c_in, h, w = x.shape
    k, p = M.shape[-1], padding
    ho, wo = h + 2 * p - k + 1, w + 2 * p - k + 1
    xp = x.new_zeros(b, c_in, h + 2 * p, w + 2 * p)
    xp[:, :, p:p + h, p:p + w] = x
    # patches[b, ci, i, j, oh, ow] = xp[b, ci, oh + i, ow + j]
    patches = torch.stack([torch.stack([xp[:, :, i:i + ho, j:j + wo] for j in range(k)], 2) for i in range(k)], 2)
    out = {"y": torch.einsum("bcijhw,ocij->bohw", patches, M) + (0 if c is None else c.view(1, -1, 1, 1))}
    if D is not None:
        z = torch.einsum("bcijhw,dcij->bdhw", patches, D)
        out["r"] = z.square().sum()
        out["S"] = torch.einsum("bdhw,bcijhw->dcij", z, patches)
    if dy is not None:
        d_patches = torch.einsum("bohw,ocij->bcijhw", dy, M)
        dxp = torch.zeros_like(xp)
        for i in range(k):
            for j in range(k):
                dxp[:, :, i:i + ho, j:j + wo] += d_patches[:, :, i, j]
        out["dx"] = dxp[:, :, p:p + h, p:p + w]
        out["dM"] = torch.einsum("bohw,bcijhw->ocij", dy, patches)
        out["dc"] = dy.sum((0, 2, 3))
        if D is not None:
            out["dD"] = 2 * dr * out["S"]
    return out


class RecordOps:
    """Context manager: the names of the ops dispatched inside it (``aten.mm``, ``relaxeq.relaxed_linear``), in
    order, as a TorchDispatchMode sees them (below autograd: a step's forward and backward ops), per op name
    the dtypes of its first output (``first_output_dtypes``), and (name, shape) of every tensor output
    (``outputs``). With ``data_size``, ``data_ops`` lists the non-view ops that read a tensor of at least that
    many elements (the passes over a batch)."""

    def __init__(self, data_size: int | None = None):
        self.data_size = data_size

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket)
                recorder.ops.append(name)
                if recorder.data_size is not None and not func.is_view and any(
                        isinstance(a, torch.Tensor) and a.numel() >= recorder.data_size
                        for a in (*args, *(kwargs or {}).values())):
                    recorder.data_ops.append(name)
                out = func(*args, **(kwargs or {}))
                outs = out if isinstance(out, (tuple, list)) else (out,)
                if outs and isinstance(outs[0], torch.Tensor):
                    recorder.first_output_dtypes.setdefault(name, set()).add(outs[0].dtype)
                recorder.outputs += [(name, tuple(t.shape)) for t in outs if isinstance(t, torch.Tensor)]
                return out

        self.ops, self.first_output_dtypes, self.outputs, self.data_ops = [], {}, [], []
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def relaxed_layer(rin, rout, theta=0.7, seed=0, relax_space="full"):
    """A float64 RelaxedLinear rin → rout with a random W_r (nn.Linear's init) and a random b_r."""
    from relaxeq_fast.nn import RelaxedLinear
    torch.manual_seed(seed)
    layer = RelaxedLinear(rin, rout, relax_init="default", relax_space=relax_space, theta=theta, dtype=torch.float64)
    with torch.no_grad():
        layer.bias_relax.normal_()
    return layer


def rep_features(rep, n, seed=1):
    """n float64 features [n, *rep.feature_shape], off-centre (mean 0.3) so the bias terms matter."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *rep.feature_shape, dtype=torch.float64, generator=g) + 0.3


def jvp_lie_derivative_norm2(layer, x, rin, rout):
    """Σ_k Σ_n ‖(L_k f)(x_n)‖² of a layer f: irreps rin → rout by forward-mode AD, independent of the closed form:
    (L_k f)(x) = d/dt ρ_out(e^{-tA}) f(ρ_in(e^{tA}) x) |_{t=0} = J_f(x) A_in x − A_out f(x). Run it under the
    reference backend (forward-mode AD)."""
    def f(x_flat):
        return layer(x_flat.reshape(x.shape)).reshape(len(x), rout.dim)

    x_flat = x.reshape(len(x), rin.dim)
    total = 0.0
    for k in range(3):
        fx, jv = torch.func.jvp(f, (x_flat,), (rin.apply_generator(k, x_flat),))
        total = total + ((jv - rout.apply_generator(k, fx)) ** 2).sum()
    return total


def nbody_inputs(B=3, n=5, seed=0, dtype=torch.float64):
    """Random N-body inputs: loc, vel [B, n, 3] ~ N(0, 1), charges [B, n, 1] = ±1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.where(torch.rand(B, n, 1, generator=g) < 0.5, -1.0, 1.0).to(dtype)
    return torch.randn(B, n, 3, generator=g, dtype=dtype), torch.randn(B, n, 3, generator=g, dtype=dtype), q


def e3_error(model, loc, vel, q, seed=1, improper=False):
    """max |f(R x + t, R v) − (R f(x, v) + t)| / max |f(x, v)| for a position predictor f, one random rotation R
    (−R: an improper one, for O(3)) and a fixed translation t."""
    from relaxeq_fast.reps import random_rotation
    R = random_rotation(generator=torch.Generator().manual_seed(seed), dtype=loc.dtype)
    R = -R if improper else R
    t = torch.tensor([0.4, -2.0, 1.1], dtype=loc.dtype)
    with torch.no_grad():
        out = model(loc, vel, q)
        moved = model(loc @ R.T + t, vel @ R.T, q)
    return ((moved - (out @ R.T + t)).abs().max() / out.abs().max()).item()


def torchrun_train(argv):
    """relaxeq-train under torchrun with 2 gloo ranks (1 thread each); only rank 0 may report."""
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "relaxeq_fast.train", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[relaxeq-train]") == 1


def assert_projection_is_the_model_at_theta_zero(model, loc, vel, q):
    """A relaxed N-body model at θ = 0: project() leaves no RelaxedLinear, computes the same positions (1e-12)
    and is E(3)-equivariant (1e-10), float64."""
    from relaxeq_fast.nn import RelaxedLinear
    from relaxeq_fast.vn import project
    with torch.no_grad():
        at_zero = model(loc, vel, q)
    plain = project(model)
    assert not any(isinstance(m, RelaxedLinear) for m in plain.modules())
    assert (plain(loc, vel, q) - at_zero).abs().max() < 1e-12
    assert e3_error(plain, loc, vel, q) < 1e-10


def train_run(argv):
    """relaxeq-train's argv run in this process (``--resume`` and ``--stop-after`` honoured); its summary."""
    from relaxeq_fast import train as T
    cfg, resume, stop_after = T.parse_args(argv)
    return T.train(cfg, resume=resume, stop_after=stop_after)


def run_metrics(run_dir):
    """A run's metrics.csv rows without the wall time, the only column that may differ between runs."""
    import csv
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("epoch_seconds")
    return rows


# relaxeq-train's VN-PointNet argv on the procedural shapes, shared by test_train.py, test_train_checkpoint.py,
# test_train_config.py, test_train_distributed.py and test_train_compile.py (the full_run fixture in conftest.py
# runs TINY + FULL once per session)

# tiny but complete: every layer of VN-PointNet runs, θ goes through its schedule to 0
TINY = ["--dataset", "shapes", "--n-train", "64", "--n-test", "28", "--num-points", "32", "--k", "6",
        "--width", "0.2", "--batch-size", "16", "--epochs", "3", "--no-progress", "--threads", "1"]


# cosine lr: a different lr every epoch, so a resume that lost the lr schedule's state shows; θ from
# the first step (the paper's per-epoch triangle holds θ = 0 through a 3-epoch run's first epoch)
FULL = ["--augment", "scale,shift,jitter", "--lr-schedule", "cosine", "--theta-schedule", "hold_linear",
        "--theta-unit", "step"]
