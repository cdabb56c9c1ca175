"""Shared test helpers: devices, tolerances, comparisons against float64 references, the Triton set-up."""
import os

import pytest
import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


CUDA_SKIP_REASON = "needs a CUDA GPU (none visible on this machine)"

# Devices for native kernels: CPU always, CUDA where a GPU exists (skipped with a reason elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not has_cuda(), reason=CUDA_SKIP_REASON))]

# Triton kernels run on the GPU, or on CPU tensors in the interpreter, which triton.jit switches on
# when a kernel is decorated: TRITON_INTERPRET=1 (conftest.py) must be set before triton is imported.
TRITON_DEVICE = "cuda" if has_cuda() else "cpu"
# The interpreter has no bfloat16 arithmetic, so half-precision Triton tests need a GPU.
TRITON_HALF_MARKS = [pytest.mark.cuda, pytest.mark.skipif(
    not has_cuda(), reason="half precision needs a GPU: the interpreter has no bfloat16 arithmetic")]


def skip_module_unless_triton_runs():
    """Skip the calling test module unless Triton can run here. Call it at module level, before
    importing triton or a kernel module, so the interpreter switch is read in time."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" and not has_cuda():
        pytest.skip("Triton needs a CUDA device, or TRITON_INTERPRET=1 set before triton is imported "
                    "(the interpreter runs the kernels on CPU tensors)", allow_module_level=True)
    pytest.importorskip("triton", reason="triton is not installed")


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
