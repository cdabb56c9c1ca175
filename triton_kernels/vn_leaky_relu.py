"""Triton implementation of ``vn_leaky_relu`` and its backward, as the custom ops
``relaxeq::vn_leaky_relu_triton`` / ``relaxeq::vn_leaky_relu_backward_triton``.

Formulas (per vector (n, c); b = 1 − α, s = ‖d‖² + ε, k = ⟨x, d⟩ / s, g = grad_out, gd = ⟨g, d⟩):

    ⟨x, d⟩ ≥ 0:  out = x                  grad_x = g                 grad_d = 0
    ⟨x, d⟩ < 0:  out = x − b k d          grad_x = g − (b/s) gd d    grad_d = −(b/s)(gd x + ⟨x, d⟩ g − 2 gd k d)

A shared direction d [N, 1, 3] gets grad_d summed over the channels of its row. Each program owns
a block of BLOCK_N rows and loops over the channels BLOCK_C at a time, so a shared d is loaded
once per row and its grad_d is reduced inside the program (no atomics, deterministic). Inputs
are made contiguous [N, C, 3]; the three components are loaded with stride 3.

The scalars (1 − α, ε) are kernel arguments, except for float64 inputs: Triton passes Python
floats as float32, which would cost ~1e-8 relative accuracy, so there they come in a tiny float64
tensor (one small host-to-device copy per call, only on that path).

CPU tensors run only under the Triton interpreter, and triton.jit decides that when the
kernel is decorated: TRITON_INTERPRET=1 must be set before this module is imported.
"""
from __future__ import annotations

import functools

from typing import List, Tuple

import torch
import triton
import triton.language as tl

from relaxeq_fast import _ops
from relaxeq_fast.triton_kernels._common import OpsRegistration, check_device, launches_on_input_device

__all__ = ["op", "backward_op", "vn_leaky_relu_triton", "vn_leaky_relu_backward_triton"]

FORWARD_NAME = "relaxeq::vn_leaky_relu_triton"
BACKWARD_NAME = "relaxeq::vn_leaky_relu_backward_triton"
# The native schemas (csrc/registration.cpp), minus the op name.
_FORWARD_SCHEMA = "(Tensor x, Tensor d, float negative_slope, float eps) -> Tensor"
_BACKWARD_SCHEMA = ("(Tensor grad_out, Tensor x, Tensor d, float negative_slope, float eps, bool[2] output_mask)"
                    " -> (Tensor grad_x, Tensor grad_d)")



@triton.jit
def _load3(ptr, offs, mask, DT: tl.constexpr):
    v0 = tl.load(ptr + offs, mask=mask, other=0.0).to(DT)
    v1 = tl.load(ptr + offs + 1, mask=mask, other=0.0).to(DT)
    v2 = tl.load(ptr + offs + 2, mask=mask, other=0.0).to(DT)
    return v0, v1, v2


@triton.jit
def _store3(ptr, offs, v0, v1, v2, mask):
    ty = ptr.dtype.element_ty
    tl.store(ptr + offs, v0.to(ty), mask=mask)
    tl.store(ptr + offs + 1, v1.to(ty), mask=mask)
    tl.store(ptr + offs + 2, v2.to(ty), mask=mask)


@triton.jit
def _scalars_of(scal_ptr, b_arg, eps_arg, SCALARS_IN_PTR: tl.constexpr):
    if SCALARS_IN_PTR:
        b = tl.load(scal_ptr)
        eps = tl.load(scal_ptr + 1)
    else:
        b = b_arg
        eps = eps_arg
    return b, eps


@triton.jit
def _vn_leaky_relu_fwd_kernel(
    x_ptr, d_ptr, out_ptr, scal_ptr, b_arg, eps_arg, N, C,
    D_SHARED: tl.constexpr, SCALARS_IN_PTR: tl.constexpr, DT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, eps = _scalars_of(scal_ptr, b_arg, eps_arg, SCALARS_IN_PTR)  # b = 1 − α
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < N
    if D_SHARED:
        # d [N, 1, 3]: one direction per row, loaded once for all channels.
        sd0, sd1, sd2 = _load3(d_ptr, rows * 3, r_mask, DT)
        sd0, sd1, sd2 = sd0[:, None], sd1[:, None], sd2[:, None]
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (cols < C)[None, :]
        offs = (rows[:, None] * C + cols[None, :]) * 3
        x0, x1, x2 = _load3(x_ptr, offs, mask, DT)
        if D_SHARED:
            d0, d1, d2 = sd0, sd1, sd2
        else:
            d0, d1, d2 = _load3(d_ptr, offs, mask, DT)
        dot = x0 * d0 + x1 * d1 + x2 * d2
        s = d0 * d0 + d1 * d1 + d2 * d2 + eps
        # dot >= 0 keeps x; a NaN dot takes the projected branch, like the reference's torch.where.
        f = tl.where(dot >= 0, 0.0, b * (dot / s))
        _store3(out_ptr, offs, x0 - f * d0, x1 - f * d1, x2 - f * d2, mask)


@triton.jit
def _vn_leaky_relu_bwd_kernel(
    g_ptr, x_ptr, d_ptr, gx_ptr, gd_ptr, scal_ptr, b_arg, eps_arg, N, C,
    D_SHARED: tl.constexpr, SCALARS_IN_PTR: tl.constexpr, NEED_GX: tl.constexpr, NEED_GD: tl.constexpr,
    DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b, eps = _scalars_of(scal_ptr, b_arg, eps_arg, SCALARS_IN_PTR)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = rows < N
    if D_SHARED:
        sd0, sd1, sd2 = _load3(d_ptr, rows * 3, r_mask, DT)
        sd0, sd1, sd2 = sd0[:, None], sd1[:, None], sd2[:, None]
        acc0 = tl.zeros((BLOCK_N,), dtype=DT)
        acc1 = tl.zeros((BLOCK_N,), dtype=DT)
        acc2 = tl.zeros((BLOCK_N,), dtype=DT)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        mask = r_mask[:, None] & (cols < C)[None, :]
        offs = (rows[:, None] * C + cols[None, :]) * 3
        g0, g1, g2 = _load3(g_ptr, offs, mask, DT)
        x0, x1, x2 = _load3(x_ptr, offs, mask, DT)
        if D_SHARED:
            d0, d1, d2 = sd0, sd1, sd2
        else:
            d0, d1, d2 = _load3(d_ptr, offs, mask, DT)
        dot = x0 * d0 + x1 * d1 + x2 * d2
        s = d0 * d0 + d1 * d1 + d2 * d2 + eps
        keep = dot >= 0
        t = tl.where(keep, 0.0, b / s)  # 0 on the identity branch zeroes both corrections
        gd = g0 * d0 + g1 * d1 + g2 * d2
        if NEED_GX:
            fx = t * gd
            _store3(gx_ptr, offs, g0 - fx * d0, g1 - fx * d1, g2 - fx * d2, mask)
        if NEED_GD:
            fd = 2.0 * gd * (dot / s)
            r0 = -t * (gd * x0 + dot * g0 - fd * d0)
            r1 = -t * (gd * x1 + dot * g1 - fd * d1)
            r2 = -t * (gd * x2 + dot * g2 - fd * d2)
            if D_SHARED:
                # Masked lanes loaded zeros (x = g = 0): their r is 0, so they add nothing.
                acc0 += tl.sum(tl.where(mask, r0, 0.0), axis=1)
                acc1 += tl.sum(tl.where(mask, r1, 0.0), axis=1)
                acc2 += tl.sum(tl.where(mask, r2, 0.0), axis=1)
            else:
                _store3(gd_ptr, offs, r0, r1, r2, mask)
    if NEED_GD:
        if D_SHARED:
            _store3(gd_ptr, rows * 3, acc0, acc1, acc2, r_mask)




def _blocks(c: int, device: torch.device):
    """(BLOCK_N, BLOCK_C, num_warps): ~1K vectors per program on a GPU, fewer rows when C is wide."""
    block_c = min(64, triton.next_power_of_2(max(c, 1)))
    if device.type != "cuda":
        return max(1, 64 // block_c), block_c, 4  # interpreter: small blocks, little padding
    return max(1, 1024 // block_c), block_c, 4


def _compute_dtype(x: torch.Tensor):
    """Arithmetic in float32 (half types included), float64 for float64."""
    return tl.float64 if x.dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=64)
def _float64_scalars(b: float, eps: float, device: torch.device) -> torch.Tensor:
    # Made once per (b, eps, device): a host-to-device copy per call would sync the stream and could not
    # be captured in a CUDA graph. Read-only.
    return torch.tensor([b, eps], dtype=torch.float64, device=device)


def _scalar_args(x: torch.Tensor, negative_slope: float, eps: float):
    """(scal_ptr, b_arg, eps_arg, SCALARS_IN_PTR): float64 scalars through a tensor, else plain floats."""
    b = 1.0 - negative_slope
    if x.dtype == torch.float64:
        return _float64_scalars(b, eps, x.device), b, eps, True
    return x, b, eps, False  # x only fills the pointer slot; it is not read


@launches_on_input_device
def vn_leaky_relu_triton(x: torch.Tensor, d: torch.Tensor, negative_slope: float, eps: float) -> torch.Tensor:
    """Kernel body of ``relaxeq::vn_leaky_relu_triton``: x [N, C, 3], d [N, C, 3] or [N, 1, 3] → [N, C, 3]."""
    opname = "vn_leaky_relu (triton)"
    _ops.check_vn_leaky_relu_args(x, d, negative_slope, eps, op=opname)
    check_device(x, opname, _vn_leaky_relu_fwd_kernel, "relaxeq_fast.triton_kernels.vn_leaky_relu")
    x, d = x.detach().contiguous(), d.detach().contiguous()
    n, c = x.shape[0], x.shape[1]
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    scal, b, e, in_ptr = _scalar_args(x, negative_slope, eps)
    block_n, block_c, num_warps = _blocks(c, x.device)
    _vn_leaky_relu_fwd_kernel[(triton.cdiv(n, block_n),)](
        x, d, out, scal, b, e, n, c,
        D_SHARED=d.shape[1] == 1 and c != 1, SCALARS_IN_PTR=in_ptr, DT=_compute_dtype(x),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return out


@launches_on_input_device
def vn_leaky_relu_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, d: torch.Tensor, negative_slope: float,
                                  eps: float, output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::vn_leaky_relu_backward_triton``: grad_x like x, grad_d like d (summed
    over channels for a shared d), each an empty [0] tensor where ``output_mask`` is False."""
    opname = "vn_leaky_relu_backward (triton)"
    _ops.check_vn_leaky_relu_backward_args(grad_out, x, d, negative_slope, eps, op=opname)
    if len(output_mask) != 2:
        raise ValueError(f"{opname}: output_mask must have 2 entries, got {len(output_mask)}")
    check_device(x, opname, _vn_leaky_relu_fwd_kernel, "relaxeq_fast.triton_kernels.vn_leaky_relu")
    g, x, d = grad_out.detach().contiguous(), x.detach().contiguous(), d.detach().contiguous()
    need_gx, need_gd = (bool(m) for m in output_mask)
    n, c = x.shape[0], x.shape[1]
    gx = torch.empty_like(x) if need_gx else x.new_empty((0,))
    gd = torch.empty_like(d) if need_gd else x.new_empty((0,))
    if n == 0 or not (need_gx or need_gd):
        return gx, gd
    if c == 0:  # no channels: a shared d gets an empty sum
        if need_gd:
            gd.zero_()
        return gx, gd
    scal, b, e, in_ptr = _scalar_args(x, negative_slope, eps)
    block_n, block_c, num_warps = _blocks(c, x.device)
    # Unused pointer slots get a live tensor; they are never dereferenced.
    _vn_leaky_relu_bwd_kernel[(triton.cdiv(n, block_n),)](
        g, x, d, gx if need_gx else x, gd if need_gd else d, scal, b, e, n, c,
        D_SHARED=d.shape[1] == 1 and c != 1, SCALARS_IN_PTR=in_ptr, NEED_GX=need_gx, NEED_GD=need_gd,
        DT=_compute_dtype(x), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return gx, gd


_registration = OpsRegistration(
    [(FORWARD_NAME, vn_leaky_relu_triton, _FORWARD_SCHEMA),
     (BACKWARD_NAME, vn_leaky_relu_backward_triton, _BACKWARD_SCHEMA)],
    _ops.register_vn_leaky_relu_op)
op = _registration.getter(FORWARD_NAME)
backward_op = _registration.getter(BACKWARD_NAME)
