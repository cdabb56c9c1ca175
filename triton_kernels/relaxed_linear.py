"""Triton implementation of ``relaxed_linear`` and its backward, as the custom ops
``relaxeq::relaxed_linear_triton`` / ``relaxeq::relaxed_linear_backward_triton``.

One kernel serves both directions. Its grid is (row block, tile): tiles below ``n_y_tiles``
compute a block of ``out1 = A Wᵀ (+ c)``; the rest accumulate this row block's share of
``out2 += Aᵀ B`` and ``out3 += Σ_n A_n`` with atomics, so one launch produces the output and
the statistics (or dx, dM and dc) instead of one pass over A for each.

    forward:  A = x,  W = M,  B = x   →  y,  G = xᵀx,  s = Σ x
    backward: A = dy, W = Mᵀ, B = x   →  dx, dM = dyᵀx, dc = Σ dy

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

__all__ = ["op", "backward_op", "relaxed_linear_triton", "relaxed_linear_backward_triton"]

FORWARD_NAME = "relaxeq::relaxed_linear_triton"
BACKWARD_NAME = "relaxeq::relaxed_linear_backward_triton"
# The native schemas (csrc/registration.cpp), minus the op name, so both backends are
# interchangeable for the functional layer, the fake kernels and the autograd formula.
_FORWARD_SCHEMA = "(Tensor x, Tensor M, Tensor? c, bool stats) -> (Tensor y, Tensor G, Tensor s)"
_BACKWARD_SCHEMA = "(Tensor dy, Tensor x, Tensor M, bool[3] output_mask) -> (Tensor dx, Tensor dM, Tensor dc)"


# Tests set this to force several row blocks per program (the in-kernel row loop) on shapes
# small enough for the interpreter; None lets the launcher choose.
_SUB_BLOCKS_PER_PROGRAM: Optional[int] = None


@triton.jit
def _relaxed_linear_kernel(
    a_ptr, w_ptr, c_ptr, b_ptr, out1_ptr, out2_ptr, out3_ptr,
    N, KA, O1, KB, rows_per_prog, n_y_tiles, nbi, nbj,
    s_an, s_ak, s_wo, s_wk, s_c, s_bn, s_bk, s_1n, s_1o, s_2i, s_2j,
    HAS_C: tl.constexpr, DO_OUT2: tl.constexpr, DO_OUT3: tl.constexpr, SYMMETRIC: tl.constexpr,
    ACC_DT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_t = tl.program_id(1)
    # int64 row offsets: N * stride can exceed 2^31 for large batches.
    row0 = pid_r.to(tl.int64) * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, N)
    offs_n = tl.arange(0, BLOCK_N)

    if pid_t < n_y_tiles:
        offs_o = (pid_t * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
        o_mask = offs_o < O1
        if HAS_C:
            bias = tl.load(c_ptr + offs_o * s_c, mask=o_mask, other=0.0).to(ACC_DT)
        for r0 in range(row0, row_end, BLOCK_N):
            rows = r0 + offs_n
            n_mask = rows < N
            acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=ACC_DT)
            for k0 in range(0, KA, BLOCK_K):
                offs_k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_mask = offs_k < KA
                a = tl.load(a_ptr + rows[:, None] * s_an + offs_k[None, :] * s_ak,
                            mask=n_mask[:, None] & k_mask[None, :], other=0.0)
                # W is read as its transpose [K, O] through the strides: for the backward
                # W = Mᵀ is then just M's strides swapped, no copy.
                w = tl.load(w_ptr + offs_k[:, None] * s_wk + offs_o[None, :] * s_wo,
                            mask=k_mask[:, None] & o_mask[None, :], other=0.0)
                # out_dtype: compiled Triton requires the accumulator dtype to be named (float64 inputs).
                acc = tl.dot(a, w, acc, input_precision=PREC, out_dtype=ACC_DT)
            if HAS_C:
                acc += bias[None, :]
            tl.store(out1_ptr + rows[:, None] * s_1n + offs_o[None, :] * s_1o,
                     acc.to(out1_ptr.dtype.element_ty), mask=n_mask[:, None] & o_mask[None, :])
    else:
        t = pid_t - n_y_tiles
        if SYMMETRIC:
            # Only blocks j >= i of the Gram matrix, enumerated row by row; row i starts at
            # tile i*nbi - i(i-1)/2. nbi is small (D / BLOCK_S), so a scalar scan is cheap
            # and avoids a float sqrt that could round to the wrong row.
            i = t * 0
            for r in range(1, nbi):
                i += (r * nbi - (r * (r - 1)) // 2 <= t).to(tl.int32)
            j = t - (i * nbi - (i * (i - 1)) // 2) + i
            do_sum = j == i
        elif DO_OUT2:
            i = t // nbj
            j = t % nbj
            do_sum = j == 0
        else:
            # Column sums only (backward without dM): one tile per column block of A.
            i = t
            j = t * 0
            do_sum = j == 0
        offs_i = (i * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        offs_j = (j * BLOCK_S + tl.arange(0, BLOCK_S)).to(tl.int64)
        i_mask = offs_i < KA
        j_mask = offs_j < KB
        acc2 = tl.zeros((BLOCK_S, BLOCK_S), dtype=ACC_DT)
        acc3 = tl.zeros((BLOCK_S,), dtype=ACC_DT)
        for r0 in range(row0, row_end, BLOCK_N):
            rows = r0 + offs_n
            n_mask = rows < N
            a_t = tl.load(a_ptr + offs_i[:, None] * s_ak + rows[None, :] * s_an,
                          mask=i_mask[:, None] & n_mask[None, :], other=0.0)
            if DO_OUT2:
                b = tl.load(b_ptr + rows[:, None] * s_bn + offs_j[None, :] * s_bk,
                            mask=n_mask[:, None] & j_mask[None, :], other=0.0)
                acc2 = tl.dot(a_t, b, acc2, input_precision=PREC, out_dtype=ACC_DT)
            if DO_OUT3:
                # Every tile of column block i has these rows loaded; one of them sums them,
                # so out3 gets each row block exactly once.
                if do_sum:
                    acc3 += tl.sum(a_t.to(ACC_DT), axis=1)
        # Row blocks run concurrently and each owns a partial sum: atomics merge them
        # without a second reduction pass (the order, hence the rounding, is not fixed).
        if DO_OUT2:
            tl.atomic_add(out2_ptr + offs_i[:, None] * s_2i + offs_j[None, :] * s_2j, acc2,
                          mask=i_mask[:, None] & j_mask[None, :])
        if DO_OUT3:
            if do_sum:
                tl.atomic_add(out3_ptr + offs_i, acc3, mask=i_mask)






def _block_sizes(dtype: torch.dtype, device: torch.device):
    """(BLOCK_N, BLOCK_O, BLOCK_K, BLOCK_S, num_warps)."""
    if device.type != "cuda":
        # Interpreter (numpy, one program at a time): tl.dot's minimum width of 16 keeps the
        # padding waste small on the tiny test shapes and gives several column blocks already
        # at D = 33..40, so the tile enumeration is exercised without slow large shapes.
        return 32, 16, 16, 16, 4
    if dtype == torch.float64:
        # fp64 accumulators take twice the registers; smaller tiles to avoid spills
        # (a starting point, not tuned on hardware).
        return 32, 32, 32, 32, 4
    if dtype == torch.float32:
        return 64, 64, 32, 64, 4
    return 64, 64, 64, 64, 4


def _dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    # Follow torch's own switch for float32 matmuls so the Triton and cuBLAS paths agree;
    # the option is ignored for the other dtypes.
    if device.type == "cuda" and dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _launch(A: torch.Tensor, W: Optional[torch.Tensor], c: Optional[torch.Tensor], B: Optional[torch.Tensor],
            out1: Optional[torch.Tensor], out2: Optional[torch.Tensor], out3: Optional[torch.Tensor],
            symmetric: bool):
    """out1 = A Wᵀ (+ c); out2 += Aᵀ B (only j >= i blocks when ``symmetric``); out3 += Σ_n A_n.

    A [N, KA], W [O1, KA] (any strides), B [N, KB]; out2/out3 are zeroed accumulators.
    """
    n, ka = A.shape
    kb = B.shape[1] if B is not None else 0
    o1 = W.shape[0] if out1 is not None else 0
    if n == 0:
        return
    block_n, block_o, block_k, block_s, num_warps = _block_sizes(A.dtype, A.device)
    n_y_tiles = triton.cdiv(o1, block_o) if out1 is not None else 0
    do_out2, do_out3 = out2 is not None, out3 is not None
    nbi = triton.cdiv(ka, block_s) if (do_out2 or do_out3) else 0
    nbj = triton.cdiv(kb, block_s) if do_out2 else 1
    if do_out2:
        n_stat_tiles = nbi * (nbi + 1) // 2 if symmetric else nbi * nbj
    else:
        n_stat_tiles = nbi
    n_tiles = n_y_tiles + n_stat_tiles
    if n_tiles == 0:
        return

    n_sub = triton.cdiv(n, block_n)
    if _SUB_BLOCKS_PER_PROGRAM is not None:
        per_prog = _SUB_BLOCKS_PER_PROGRAM
    else:
        # Longer row ranges per program mean fewer atomic partial sums of out2, but fewer
        # programs for the output tiles; aim for enough programs to fill the device, and cap
        # the range so the output tiles keep their parallelism on very tall inputs.
        target_row_programs = max(1, triton.cdiv(program_slots(A.device), n_tiles))
        per_prog = max(1, min(16, n_sub // target_row_programs))
    rows_per_prog = per_prog * block_n
    grid = (triton.cdiv(n, rows_per_prog), n_tiles)

    acc_dt = tl.float64 if A.dtype == torch.float64 else tl.float32
    # Unused pointer slots get a live tensor of a plausible dtype; they are never dereferenced.
    W_ = W if W is not None else A
    B_ = B if B is not None else A
    out1_ = out1 if out1 is not None else A
    acc_buf = out2 if out2 is not None else (out3 if out3 is not None else A)
    out2_ = out2 if out2 is not None else acc_buf
    out3_ = out3 if out3 is not None else acc_buf
    c_ = c if c is not None else A
    s_1 = out1.stride() if out1 is not None else (0, 0)
    s_2 = out2.stride() if out2 is not None else (0, 0)
    _relaxed_linear_kernel[grid](
        A, W_, c_, B_, out1_, out2_, out3_,
        n, ka, o1, kb, rows_per_prog, n_y_tiles, nbi, nbj,
        A.stride(0), A.stride(1), W_.stride(0), W_.stride(1), c_.stride(-1), B_.stride(0), B_.stride(1),
        s_1[0], s_1[1], s_2[0], s_2[1],
        HAS_C=c is not None, DO_OUT2=do_out2, DO_OUT3=do_out3, SYMMETRIC=symmetric and do_out2,
        ACC_DT=acc_dt, PREC=_dot_precision(A.dtype, A.device),
        BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k, BLOCK_S=block_s,
        num_warps=num_warps,
    )


@launches_on_input_device
def relaxed_linear_triton(x: torch.Tensor, M: torch.Tensor, c: Optional[torch.Tensor],
                          stats: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::relaxed_linear_triton``: y = x Mᵀ + c and, when ``stats``,
    G = xᵀx [D_in, D_in], s = Σ_n x_n [D_in] in ``stats_dtype(x.dtype)``."""
    opname = "relaxed_linear (triton)"
    _ops.check_relaxed_linear_args(x, M, c, op=opname)
    check_device(x, opname, _relaxed_linear_kernel, "relaxeq_fast.triton_kernels.relaxed_linear")
    x, M = x.detach(), M.detach()
    c = c.detach() if c is not None else None
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    sdt = stats_dtype(x.dtype)
    y = torch.empty((n, d_out), dtype=x.dtype, device=x.device)
    if stats:
        G = torch.zeros((d_in, d_in), dtype=sdt, device=x.device)
        s = torch.zeros((d_in,), dtype=sdt, device=x.device)
    else:
        G = torch.empty((0, 0), dtype=sdt, device=x.device)
        s = torch.empty((0,), dtype=sdt, device=x.device)
    if n == 0:
        return y, G, s
    if stats:
        alert_not_deterministic("relaxeq::relaxed_linear_triton with stats (G, s)")
    _launch(x, M, c, x, y, G if stats else None, s if stats else None, symmetric=True)
    if stats and d_in > 1:
        # The kernel filled the blocks on and above the diagonal only.
        G = torch.triu(G) + torch.triu(G, 1).T
    return y, G, s


@launches_on_input_device
def relaxed_linear_backward_triton(dy: torch.Tensor, x: torch.Tensor, M: torch.Tensor,
                                   output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::relaxed_linear_backward_triton``: dx = dy M, dM = dyᵀ x,
    dc = Σ_n dy_n, each an empty [0] tensor where ``output_mask`` is False; all in x's dtype."""
    opname = "relaxed_linear_backward (triton)"
    _ops.check_relaxed_linear_backward_args(dy, x, M, op=opname)
    if len(output_mask) != 3:
        raise ValueError(f"{opname}: output_mask must have 3 entries, got {len(output_mask)}")
    check_device(x, opname, _relaxed_linear_kernel, "relaxeq_fast.triton_kernels.relaxed_linear")
    dy, x, M = dy.detach(), x.detach(), M.detach()
    need_dx, need_dM, need_dc = (bool(m) for m in output_mask)
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    adt = stats_dtype(x.dtype)  # accumulate dM and dc like the statistics, then round once
    dx = torch.empty((n, d_in) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dM_acc = torch.zeros((d_out, d_in) if need_dM else (0,), dtype=adt, device=x.device)
    dc_acc = torch.zeros((d_out,) if need_dc else (0,), dtype=adt, device=x.device)
    if n > 0 and (need_dx or need_dM or need_dc):
        if need_dM or need_dc:
            alert_not_deterministic("relaxeq::relaxed_linear_backward_triton (dM, dc)")
        _launch(dy, M.T if need_dx else None, None, x if need_dM else None,
                dx if need_dx else None, dM_acc if need_dM else None, dc_acc if need_dc else None,
                symmetric=False)
    dM = dM_acc.to(x.dtype) if adt != x.dtype else dM_acc
    dc = dc_acc.to(x.dtype) if adt != x.dtype else dc_acc
    return dx, dM, dc


_registration = OpsRegistration(
    [(FORWARD_NAME, relaxed_linear_triton, _FORWARD_SCHEMA),
     (BACKWARD_NAME, relaxed_linear_backward_triton, _BACKWARD_SCHEMA)],
    _ops.register_relaxed_linear_op)
op = _registration.getter(FORWARD_NAME)
backward_op = _registration.getter(BACKWARD_NAME)
