"""Triton implementation of the Vector-Neuron batch norm ops, as the custom ops
``relaxeq::vn_norm_stats_triton``, ``relaxeq::vn_batch_norm_apply_triton`` and
``relaxeq::vn_batch_norm_apply_backward_triton`` (same schemas as the native ops).

x is [N, C, 3]; norm_nc = ‖x_nc‖ + norm_eps. Every kernel works on [BLOCK_N, BLOCK_C] tiles of
vectors (the three components loaded as three tiles), so no [N, C] temporary is written:

    stats     grid (row program, channel block): each program merges its row chunks' (mean, M2)
              of the norms (Chan et al.) and writes one partial per channel; the launcher combines
              the few partials in the stats dtype (exact counts, no cancellation).
    apply     grid (row block, channel block): y = x · ((norm − μ)·invstd·w + b) / norm.
    backward  grid (row program, channel block): grad_x, and the per-channel sums
              S0 = Σ g/norm, S1 = Σ g/norm·(norm − μ) (g = ⟨grad_y, x⟩) added with atomics.

CPU tensors run only under the Triton interpreter, and triton.jit decides that when the
kernel is decorated: TRITON_INTERPRET=1 must be set before this module is imported.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from relaxeq_fast import _ops
from relaxeq_fast.triton_kernels._common import (OpsRegistration, alert_not_deterministic, check_device,
                                                 launches_on_input_device, program_slots)
from relaxeq_fast.reference import stats_dtype

__all__ = ["stats_op", "apply_op", "backward_op", "vn_norm_stats_triton", "vn_batch_norm_apply_triton",
           "vn_batch_norm_apply_backward_triton"]

STATS_NAME = "relaxeq::vn_norm_stats_triton"
APPLY_NAME = "relaxeq::vn_batch_norm_apply_triton"
BACKWARD_NAME = "relaxeq::vn_batch_norm_apply_backward_triton"
# The native schemas (csrc/registration.cpp), minus the op name: both backends share the
# functional layer, the fake kernels and the autograd formulas.
_STATS_SCHEMA = "(Tensor x, float norm_eps) -> (Tensor mean, Tensor var)"
_APPLY_SCHEMA = ("(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, float norm_eps)"
                 " -> Tensor y")
_BACKWARD_SCHEMA = ("(Tensor grad_y, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias,"
                    " float norm_eps, bool[5] output_mask) -> (Tensor grad_x, Tensor grad_mean,"
                    " Tensor grad_invstd, Tensor grad_weight, Tensor grad_bias)")


# Tests set this to force several row programs (partials / atomics across programs) and several
# row chunks per program on shapes small enough for the interpreter; None lets the launcher choose.
_ROWS_PER_PROGRAM: Optional[int] = None


@triton.jit
def _load_tile(ptr, rows, cols, s_n, s_c, s_d, mask, ACC_DT: tl.constexpr):
    base = ptr + rows[:, None] * s_n + cols[None, :] * s_c
    a0 = tl.load(base, mask=mask, other=0.0).to(ACC_DT)
    a1 = tl.load(base + s_d, mask=mask, other=0.0).to(ACC_DT)
    a2 = tl.load(base + 2 * s_d, mask=mask, other=0.0).to(ACC_DT)
    return a0, a1, a2


@triton.jit
def _vn_norm_stats_kernel(
    x_ptr, pmean_ptr, pm2_ptr, N, C, rows_per_prog, s_n, s_c, s_d, norm_eps,
    ACC_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    row0 = pid_r.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, N)
    cols = (pid_c * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cols < C
    count = (row0 * 0).to(ACC_DT)
    mean = tl.zeros((BLOCK_C,), dtype=ACC_DT)
    m2 = tl.zeros((BLOCK_C,), dtype=ACC_DT)
    for r0 in range(row0, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        n_mask = rows < row_end
        mask = n_mask[:, None] & c_mask[None, :]
        a0, a1, a2 = _load_tile(x_ptr, rows, cols, s_n, s_c, s_d, mask, ACC_DT)
        norm = tl.sqrt(a0 * a0 + a1 * a1 + a2 * a2) + norm_eps
        valid = tl.where(mask, 1.0, 0.0).to(ACC_DT)
        cnt = tl.minimum(row_end - r0, BLOCK_N).to(ACC_DT)
        # This chunk's mean and M2 about it (two passes over registers), then Chan's merge.
        c_mean = tl.sum(norm * valid, axis=0) / cnt
        dev = (norm - c_mean[None, :]) * valid
        c_m2 = tl.sum(dev * dev, axis=0)
        total = count + cnt
        delta = c_mean - mean
        mean += delta * (cnt / total)
        m2 += c_m2 + delta * delta * (count * cnt / total)
        count = total
    tl.store(pmean_ptr + pid_r * C + cols, mean, mask=c_mask)
    tl.store(pm2_ptr + pid_r * C + cols, m2, mask=c_mask)


@triton.jit
def _load_channel(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, c_mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  ACC_DT: tl.constexpr, BLOCK_C: tl.constexpr):
    mu = tl.load(mean_ptr + cols, mask=c_mask, other=0.0).to(ACC_DT)
    inv = tl.load(invstd_ptr + cols, mask=c_mask, other=0.0).to(ACC_DT)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=c_mask, other=0.0).to(ACC_DT)
    else:
        w = tl.full((BLOCK_C,), 1.0, ACC_DT)
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=c_mask, other=0.0).to(ACC_DT)
    else:
        b = tl.zeros((BLOCK_C,), dtype=ACC_DT)
    return mu, inv, w, b


@triton.jit
def _vn_apply_kernel(
    x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, y_ptr, N, C, s_n, s_c, s_d, norm_eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cols < C
    mask = (rows < N)[:, None] & c_mask[None, :]
    mu, inv, w, b = _load_channel(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, c_mask, HAS_W, HAS_B, ACC_DT, BLOCK_C)
    a0, a1, a2 = _load_tile(x_ptr, rows, cols, s_n, s_c, s_d, mask, ACC_DT)
    norm = tl.sqrt(a0 * a0 + a1 * a1 + a2 * a2) + norm_eps
    scale = ((norm - mu[None, :]) * (inv * w)[None, :] + b[None, :]) / norm
    # y is a fresh contiguous [N, C, 3] tensor.
    out = y_ptr + (rows[:, None] * C + cols[None, :]) * 3
    dt = y_ptr.dtype.element_ty
    tl.store(out, (a0 * scale).to(dt), mask=mask)
    tl.store(out + 1, (a1 * scale).to(dt), mask=mask)
    tl.store(out + 2, (a2 * scale).to(dt), mask=mask)


@triton.jit
def _vn_backward_kernel(
    gy_ptr, x_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, gx_ptr, s0_ptr, s1_ptr,
    N, C, rows_per_prog, s_n, s_c, s_d, g_n, g_c, g_d, norm_eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, DO_GX: tl.constexpr, DO_SUMS: tl.constexpr,
    ACC_DT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_r = tl.program_id(0)
    row0 = pid_r.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, N)
    cols = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_mask = cols < C
    mu, inv, w, b = _load_channel(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, c_mask, HAS_W, HAS_B, ACC_DT, BLOCK_C)
    acc0 = tl.zeros((BLOCK_C,), dtype=ACC_DT)
    acc1 = tl.zeros((BLOCK_C,), dtype=ACC_DT)
    for r0 in range(row0, row_end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        mask = (rows < row_end)[:, None] & c_mask[None, :]
        a0, a1, a2 = _load_tile(x_ptr, rows, cols, s_n, s_c, s_d, mask, ACC_DT)
        g0, g1, g2 = _load_tile(gy_ptr, rows, cols, g_n, g_c, g_d, mask, ACC_DT)
        length = tl.sqrt(a0 * a0 + a1 * a1 + a2 * a2)
        norm = length + norm_eps
        centred = norm - mu[None, :]
        scale = (centred * (inv * w)[None, :] + b[None, :]) / norm
        # dL/dnb per vector. Masked lanes (and zero vectors when norm_eps = 0) have norm 0 and g·a = 0:
        # 0, not 0/0, so they add nothing to the sums.
        g_nb = tl.where(norm > 0, (g0 * a0 + g1 * a1 + g2 * a2) / tl.where(norm > 0, norm, 1.0), 0.0)
        if DO_GX:
            nz = length > 0
            coef = tl.where(nz, g_nb * ((inv * w)[None, :] - scale) / tl.where(nz, length, 1.0), 0.0)
            out = gx_ptr + (rows[:, None] * C + cols[None, :]) * 3  # fresh contiguous [N, C, 3]
            dt = gx_ptr.dtype.element_ty
            tl.store(out, (g0 * scale + a0 * coef).to(dt), mask=mask)
            tl.store(out + 1, (g1 * scale + a1 * coef).to(dt), mask=mask)
            tl.store(out + 2, (g2 * scale + a2 * coef).to(dt), mask=mask)
        if DO_SUMS:
            acc0 += tl.sum(g_nb, axis=0)
            acc1 += tl.sum(g_nb * centred, axis=0)
    if DO_SUMS:
        # Row programs own partial sums; atomics merge them (order, hence rounding, not fixed).
        tl.atomic_add(s0_ptr + cols, acc0, mask=c_mask)
        tl.atomic_add(s1_ptr + cols, acc1, mask=c_mask)






def _block_sizes(device: torch.device):
    """(BLOCK_N, BLOCK_C, num_warps): small tiles in the interpreter so tiny test shapes still
    span several channel blocks; 64 x 32 vectors per program on a GPU (a starting point, not tuned)."""
    if device.type != "cuda":
        return 8, 4, 1
    return 64, 32, 4


def _rows_per_program(n: int, c_blocks: int, block_n: int, device: torch.device) -> int:
    if _ROWS_PER_PROGRAM is not None:
        return _ROWS_PER_PROGRAM
    # Enough row programs to fill the device; longer row ranges mean fewer partials / atomics.
    row_programs = max(1, triton.cdiv(program_slots(device), c_blocks))
    return max(block_n, triton.cdiv(triton.cdiv(n, row_programs), block_n) * block_n)


def _acc_dt(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@launches_on_input_device
def vn_norm_stats_triton(x: torch.Tensor, norm_eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::vn_norm_stats_triton``: per-channel mean and biased variance of
    ‖x_nc‖ + norm_eps over n, [C] each in ``stats_dtype(x.dtype)`` (NaN for N = 0)."""
    opname = "vn_norm_stats (triton)"
    _ops.check_vn_features(x, opname)
    check_device(x, opname, _vn_apply_kernel, "relaxeq_fast.triton_kernels.vn_batch_norm")
    x = x.detach()
    n, c = x.shape[0], x.shape[1]
    sdt = stats_dtype(x.dtype)
    if n == 0 or c == 0:
        fill = float("nan") if n == 0 else 0.0
        return (torch.full((c,), fill, dtype=sdt, device=x.device), torch.full((c,), fill, dtype=sdt, device=x.device))
    block_n, block_c, num_warps = _block_sizes(x.device)
    c_blocks = triton.cdiv(c, block_c)
    rows_per_prog = _rows_per_program(n, c_blocks, block_n, x.device)
    r = triton.cdiv(n, rows_per_prog)
    part_mean = torch.empty((r, c), dtype=sdt, device=x.device)
    part_m2 = torch.empty((r, c), dtype=sdt, device=x.device)
    _vn_norm_stats_kernel[(r, c_blocks)](
        x, part_mean, part_m2, n, c, rows_per_prog, x.stride(0), x.stride(1), x.stride(2), float(norm_eps),
        ACC_DT=_acc_dt(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    # Combine the row programs exactly: M2 = Σ M2_b + Σ n_b (μ_b − μ)² (counts from the row ranges).
    starts = torch.arange(r, device=x.device, dtype=torch.int64) * rows_per_prog
    counts = (torch.clamp(n - starts, max=rows_per_prog)).to(sdt).unsqueeze(1)
    mean = (counts * part_mean).sum(0) / n
    m2 = part_m2.sum(0) + (counts * (part_mean - mean) ** 2).sum(0)
    return mean, m2 / n


@launches_on_input_device
def vn_batch_norm_apply_triton(x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                               norm_eps: float) -> torch.Tensor:
    """Kernel body of ``relaxeq::vn_batch_norm_apply_triton``: y [N, C, 3] (contiguous)."""
    opname = "vn_batch_norm_apply (triton)"
    _ops.check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op=opname)
    check_device(x, opname, _vn_apply_kernel, "relaxeq_fast.triton_kernels.vn_batch_norm")
    x, mean, invstd = x.detach(), mean.detach().contiguous(), invstd.detach().contiguous()
    weight = weight.detach().contiguous() if weight is not None else None
    bias = bias.detach().contiguous() if bias is not None else None
    n, c = x.shape[0], x.shape[1]
    y = torch.empty((n, c, 3), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    block_n, block_c, num_warps = _block_sizes(x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(c, block_c))
    _vn_apply_kernel[grid](
        x, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean, y,
        n, c, x.stride(0), x.stride(1), x.stride(2), float(norm_eps),
        HAS_W=weight is not None, HAS_B=bias is not None, ACC_DT=_acc_dt(x.dtype),
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    return y


@launches_on_input_device
def vn_batch_norm_apply_backward_triton(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor,
                                        invstd: torch.Tensor, weight: Optional[torch.Tensor],
                                        bias: Optional[torch.Tensor], norm_eps: float, output_mask: List[bool]):
    """Kernel body of ``relaxeq::vn_batch_norm_apply_backward_triton``: (grad_x [N, C, 3],
    grad_mean [C], grad_invstd [C] in the stats dtype, grad_weight [C], grad_bias [C] in x's
    dtype), each an empty [0] tensor where ``output_mask`` is False."""
    opname = "vn_batch_norm_apply_backward (triton)"
    _ops.check_vn_batch_norm_apply_backward_args(grad_y, x, mean, invstd, weight, bias, op=opname)
    if len(output_mask) != 5:
        raise ValueError(f"{opname}: output_mask must have 5 entries, got {len(output_mask)}")
    check_device(x, opname, _vn_apply_kernel, "relaxeq_fast.triton_kernels.vn_batch_norm")
    grad_y, x, mean, invstd = grad_y.detach(), x.detach(), mean.detach().contiguous(), invstd.detach().contiguous()
    weight = weight.detach().contiguous() if weight is not None else None
    bias = bias.detach().contiguous() if bias is not None else None
    need_gx = bool(output_mask[0])
    need_sums = any(bool(m) for m in output_mask[1:])
    n, c = x.shape[0], x.shape[1]
    sdt = stats_dtype(x.dtype)
    gx = torch.empty((n, c, 3) if need_gx else (0,), dtype=x.dtype, device=x.device)
    s0 = torch.zeros((c,) if need_sums else (0,), dtype=sdt, device=x.device)
    s1 = torch.zeros((c,) if need_sums else (0,), dtype=sdt, device=x.device)
    if n * c > 0 and (need_gx or need_sums):
        block_n, block_c, num_warps = _block_sizes(x.device)
        c_blocks = triton.cdiv(c, block_c)
        rows_per_prog = _rows_per_program(n, c_blocks, block_n, x.device)
        grid = (triton.cdiv(n, rows_per_prog), c_blocks)
        if need_sums:
            alert_not_deterministic("relaxeq::vn_batch_norm_apply_backward_triton (per-channel sums)")
        _vn_backward_kernel[grid](
            grad_y, x, mean, invstd, weight if weight is not None else mean, bias if bias is not None else mean,
            gx if need_gx else s0, s0 if need_sums else mean, s1 if need_sums else mean,
            n, c, rows_per_prog, x.stride(0), x.stride(1), x.stride(2),
            grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), float(norm_eps),
            HAS_W=weight is not None, HAS_B=bias is not None, DO_GX=need_gx, DO_SUMS=need_sums,
            ACC_DT=_acc_dt(x.dtype), BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps)
    # Per-channel gradients from the two sums (see csrc/cpu/vn_batch_norm.cpp for the algebra).
    w = weight.to(sdt) if weight is not None else torch.ones((c,), dtype=sdt, device=x.device)
    empty = lambda: torch.empty((0,), dtype=x.dtype, device=x.device)  # noqa: E731  (outputs must not alias)
    grad_mean = -invstd * w * s0 if output_mask[1] else empty()
    grad_invstd = w * s1 if output_mask[2] else empty()
    grad_weight = (invstd * s1).to(x.dtype) if output_mask[3] else empty()
    grad_bias = s0.to(x.dtype, copy=True) if output_mask[4] else empty()
    return gx, grad_mean, grad_invstd, grad_weight, grad_bias


_registration = OpsRegistration(
    [(STATS_NAME, vn_norm_stats_triton, _STATS_SCHEMA),
     (APPLY_NAME, vn_batch_norm_apply_triton, _APPLY_SCHEMA),
     (BACKWARD_NAME, vn_batch_norm_apply_backward_triton, _BACKWARD_SCHEMA)],
    _ops.register_vn_batch_norm_ops)
stats_op = _registration.getter(STATS_NAME)
apply_op = _registration.getter(APPLY_NAME)
backward_op = _registration.getter(BACKWARD_NAME)
