"""Triton implementation of ``relaxed_conv2d`` as the custom ops ``relaxeq::relaxed_conv2d_triton`` /
``relaxeq::relaxed_conv2d_backward_triton``.

Forward: a direct (implicit-GEMM) convolution. A program owns a block of output pixels (flattened
over B, H', W') and one block of output channels of y and one of the defect responses z; per slice
of the reduction index (C_in, kh, kw) it gathers the x patch tile once (zero padding by masking,
no im2col buffer) and feeds it to two dots, one with M and one with D. In the epilogue y gets the
bias and is stored; z is squared and summed into one partial sum per program, and never stored.
The host adds the partials in a fixed order (deterministic r). Then, with the z tile still in
registers, the program walks the reduction index a second time, reloads each patch tile and
atomically adds zᵀ · patch into S = Σ_positions z ⊗ patch (the weight gradient of z, [C_d, C_in k²]).
With need_S false (no gradient for D wanted) that second walk is compiled out (NEED_S) and S is empty.

Backward: r = ⟨D, S⟩ is quadratic in D, so the autograd formula (relaxeq_fast._ops) forms
dD = 2 dr S from the saved S; nothing recomputes z. This op gives the gradients of y only, with
torch's convolution gradients (aten.convolution_backward), as the CPU kernel does:
dx = conv_transpose(dy, M), dM = weight gradient of dy, dc = Σ dy.

CPU tensors run only under the Triton interpreter, and triton.jit decides that when the
kernel is decorated: TRITON_INTERPRET=1 must be set before this module is imported.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from relaxeq_fast import _ops
from relaxeq_fast.reference import stats_dtype
from relaxeq_fast.triton_kernels._common import (OpsRegistration, alert_not_deterministic, check_device,
                                                 launches_on_input_device)

__all__ = ["op", "backward_op", "relaxed_conv2d_triton", "relaxed_conv2d_backward_triton"]

FORWARD_NAME = "relaxeq::relaxed_conv2d_triton"
BACKWARD_NAME = "relaxeq::relaxed_conv2d_backward_triton"
# The native schemas (csrc/registration.cpp), minus the op name.
_FORWARD_SCHEMA = ("(Tensor x, Tensor M, Tensor? c, Tensor? D, int padding, bool need_S)"
                   " -> (Tensor y, Tensor r, Tensor S)")
_BACKWARD_SCHEMA = "(Tensor dy, Tensor x, Tensor M, int padding, bool[3] output_mask) -> (Tensor dx, Tensor dM, Tensor dc)"


@triton.jit
def _patch_tile(x_ptr, b, oh, ow, p_mask, k0, kk_total, H, W, KSIZE, PAD, s_xb, s_xc, s_xh, s_xw,
                BLOCK_K: tl.constexpr):
    """The patch tile [BLOCK_P, BLOCK_K] of x at reduction indices k0 + [0, BLOCK_K): kk -> (ci, kh, kw),
    the order of M's and D's last three dims; zero outside the image and past kk_total."""
    kk = k0 + tl.arange(0, BLOCK_K)
    ci = kk // (KSIZE * KSIZE)
    ih = oh[:, None] + ((kk // KSIZE) % KSIZE)[None, :] - PAD
    iw = ow[:, None] + (kk % KSIZE)[None, :] - PAD
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptr + b[:, None] * s_xb + ci[None, :] * s_xc + ih * s_xh + iw * s_xw,
                   mask=p_mask[:, None] & (kk < kk_total)[None, :] & inside, other=0.0)


@triton.jit
def _relaxed_conv2d_kernel(
    x_ptr, m_ptr, c_ptr, d_ptr, y_ptr, part_ptr, s_ptr,
    P, C_IN, H, W, HO, WO, C_OUT, C_D, KSIZE, PAD,
    s_xb, s_xc, s_xh, s_xw, s_mo, s_mc, s_mh, s_mw, s_c, s_do, s_dc, s_dh, s_dw,
    s_yb, s_yc, s_yh, s_yw,
    HAS_C: tl.constexpr, HAS_D: tl.constexpr, NEED_S: tl.constexpr, ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CD: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    # Output pixels of this program, flattened over (b, oh, ow); int64 for large batches.
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P
    hw = HO * WO
    b = offs_p // hw
    oh = (offs_p % hw) // WO
    ow = offs_p % WO
    offs_co = pid_c * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_mask = offs_co < C_OUT
    offs_cd = pid_c * BLOCK_CD + tl.arange(0, BLOCK_CD)
    cd_mask = offs_cd < C_D

    kk_total = C_IN * KSIZE * KSIZE
    acc_y = tl.zeros((BLOCK_P, BLOCK_CO), dtype=ACC_DT)
    acc_z = tl.zeros((BLOCK_P, BLOCK_CD), dtype=ACC_DT)
    for k0 in range(0, kk_total, BLOCK_K):
        # Reduction index kk -> (ci, kh, kw), the order of M's and D's last three dims.
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < kk_total
        ci = kk // (KSIZE * KSIZE)
        kh = (kk // KSIZE) % KSIZE
        kw = kk % KSIZE
        # The patch tile [BLOCK_P, BLOCK_K], loaded once for both kernels.
        xp = _patch_tile(x_ptr, b, oh, ow, p_mask, k0, kk_total, H, W, KSIZE, PAD, s_xb, s_xc, s_xh, s_xw, BLOCK_K)
        w_off = ci * s_mc + kh * s_mh + kw * s_mw
        mt = tl.load(m_ptr + w_off[:, None] + offs_co[None, :] * s_mo,
                     mask=k_mask[:, None] & co_mask[None, :], other=0.0)
        acc_y = tl.dot(xp, mt, acc_y, input_precision=PREC, out_dtype=ACC_DT)
        if HAS_D:
            d_off = ci * s_dc + kh * s_dh + kw * s_dw
            dt = tl.load(d_ptr + d_off[:, None] + offs_cd[None, :] * s_do,
                         mask=k_mask[:, None] & cd_mask[None, :], other=0.0)
            acc_z = tl.dot(xp, dt, acc_z, input_precision=PREC, out_dtype=ACC_DT)

    if HAS_C:
        acc_y += tl.load(c_ptr + offs_co * s_c, mask=co_mask, other=0.0).to(ACC_DT)[None, :]
    y_off = b[:, None] * s_yb + offs_co[None, :] * s_yc + oh[:, None] * s_yh + ow[:, None] * s_yw
    tl.store(y_ptr + y_off, acc_y.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & co_mask[None, :])
    if HAS_D:
        # Masked pixels and channels hold exact zeros (their loads were zero): no mask needed here.
        part = tl.sum(tl.sum(acc_z * acc_z, axis=1), axis=0)
        tl.store(part_ptr + pid_p * tl.num_programs(1) + pid_c, part)
        # S[cd, kk] += Σ_p z[p, cd] patch[p, kk] over this program's pixels (S is [C_D, kk_total],
        # zero-filled by the host). Programs without z channels skip it.
        if NEED_S:
            if pid_c * BLOCK_CD < C_D:
                z_t = tl.trans(acc_z)
                for k0 in range(0, kk_total, BLOCK_K):
                    xp = _patch_tile(x_ptr, b, oh, ow, p_mask, k0, kk_total, H, W, KSIZE, PAD,
                                     s_xb, s_xc, s_xh, s_xw, BLOCK_K).to(ACC_DT)
                    s_tile = tl.dot(z_t, xp, input_precision=PREC, out_dtype=ACC_DT)
                    kk = k0 + tl.arange(0, BLOCK_K)
                    tl.atomic_add(s_ptr + offs_cd[:, None] * kk_total + kk[None, :], s_tile,
                                  mask=cd_mask[:, None] & (kk < kk_total)[None, :])


def _block_sizes(dtype: torch.dtype, device: torch.device):
    """(BLOCK_P, BLOCK_K, BLOCK_CO, BLOCK_CD, num_warps)."""
    if device.type != "cuda":
        # Interpreter: tl.dot's minimum width of 16 everywhere keeps the numpy work small.
        return 16, 16, 16, 16, 4
    if dtype == torch.float64:
        return 32, 16, 32, 32, 4  # fp64 accumulators: smaller tiles (a starting point, not tuned)
    return 64, 32, 32, 32, 4


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    # Follow torch's own switch for float32 convolutions so the Triton and cuDNN paths agree.
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


@launches_on_input_device
def relaxed_conv2d_triton(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor], D: Optional[torch.Tensor],
                          padding: int, need_S: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::relaxed_conv2d_triton``: y = conv2d(x, M, c, padding) and, when D
    is given, r = Σ z² and (when need_S) S = Σ_positions z ⊗ patch (z = conv2d(x̂, D, padding)), both
    in ``stats_dtype(x.dtype)`` (else empty [0] tensors)."""
    opname = "relaxed_conv2d (triton)"
    _ops.check_relaxed_conv2d_args(x, M, c, D, padding, op=opname)
    check_device(x, opname, _relaxed_conv2d_kernel, "relaxeq_fast.triton_kernels.relaxed_conv2d")
    x, M = x.detach(), M.detach()
    c = c.detach() if c is not None else None
    D = D.detach() if D is not None else None
    b, c_out, ho, wo = _ops.conv2d_out_shape(x, M, padding)
    c_d = D.shape[0] if D is not None else 0
    sdt = stats_dtype(x.dtype)
    need_S = need_S and D is not None
    empty = lambda: x.new_empty((0,), dtype=sdt)  # noqa: E731
    y = torch.empty((b, c_out, ho, wo), dtype=x.dtype, device=x.device)
    n_pix = b * ho * wo
    if n_pix == 0 or (c_out == 0 and c_d == 0):
        if c is not None:
            y.copy_(c.view(1, -1, 1, 1).expand_as(y))
        if D is None:
            return y, empty(), empty()
        S = torch.zeros(D.shape, dtype=sdt, device=x.device) if need_S else empty()
        return y, torch.zeros((), dtype=sdt, device=x.device), S
    block_p, block_k, block_co, block_cd, num_warps = _block_sizes(x.dtype, x.device)
    n_cblocks = max(triton.cdiv(c_out, block_co), triton.cdiv(c_d, block_cd))
    grid = (triton.cdiv(n_pix, block_p), n_cblocks)
    acc_dt = tl.float64 if x.dtype == torch.float64 else tl.float32
    partials = torch.empty(grid[0] * grid[1] if D is not None else 1, dtype=sdt, device=x.device)
    S = torch.zeros(D.shape if need_S else (1,), dtype=sdt, device=x.device)  # (1,): never used without NEED_S
    D_ = D if D is not None else M  # never dereferenced without HAS_D
    c_ = c if c is not None else M
    if need_S:
        alert_not_deterministic("relaxeq::relaxed_conv2d_triton with need_S (S)")
    _relaxed_conv2d_kernel[grid](
        x, M, c_, D_, y, partials, S,
        n_pix, x.shape[1], x.shape[2], x.shape[3], ho, wo, c_out, c_d, M.shape[2], padding,
        *x.stride(), *M.stride(), c_.stride(0), *D_.stride(), *y.stride(),
        HAS_C=c is not None, HAS_D=D is not None, NEED_S=need_S, ACC_DT=acc_dt,
        PREC=_dot_precision(x.dtype, x.device),
        BLOCK_P=block_p, BLOCK_K=block_k, BLOCK_CO=block_co, BLOCK_CD=block_cd, num_warps=num_warps,
    )
    if D is None:
        return y, empty(), empty()
    return y, partials.sum(), S if need_S else empty()


@launches_on_input_device
def relaxed_conv2d_backward_triton(dy: torch.Tensor, x: torch.Tensor, M: torch.Tensor, padding: int,
                                   output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::relaxed_conv2d_backward_triton``: the gradients of y (torch
    convolution gradients, see the module docstring); an output not asked for is an empty [0] tensor."""
    opname = "relaxed_conv2d_backward (triton)"
    _ops.check_relaxed_conv2d_backward_args(dy, x, M, padding, op=opname)
    if len(output_mask) != 3:
        raise ValueError(f"{opname}: output_mask must have 3 entries, got {len(output_mask)}")
    dy, x, M = dy.detach(), x.detach(), M.detach()
    need_dx, need_dM, need_dc = output_mask
    conv_args = ([1, 1], [padding, padding], [1, 1], False, [0, 0], 1)
    outs = [x.new_empty((0,)) for _ in range(3)]
    if need_dx or need_dM:
        dx, dM, _ = torch.ops.aten.convolution_backward(dy, x, M, None, *conv_args, [need_dx, need_dM, False])
        outs[0] = dx if need_dx else outs[0]
        outs[1] = dM if need_dM else outs[1]
    if need_dc:
        outs[2] = dy.sum((0, 2, 3))
    return tuple(outs)


_registration = OpsRegistration(
    [(FORWARD_NAME, relaxed_conv2d_triton, _FORWARD_SCHEMA),
     (BACKWARD_NAME, relaxed_conv2d_backward_triton, _BACKWARD_SCHEMA)],
    _ops.register_relaxed_conv2d_op)
op = _registration.getter(FORWARD_NAME)
backward_op = _registration.getter(BACKWARD_NAME)
