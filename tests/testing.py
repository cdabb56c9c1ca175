"""Shared test helpers: devices, tolerances, comparisons against float64 references."""
import pytest
import torch


def has_cuda() -> bool:
    return torch.cuda.is_available()


CUDA_SKIP_REASON = "needs a CUDA GPU (none visible on this machine)"

# Devices for native kernels: CPU always, CUDA where a GPU exists (skipped with a reason elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not has_cuda(), reason=CUDA_SKIP_REASON))]


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
