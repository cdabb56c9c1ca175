"""Triton implementation of ``relaxation_regularizer`` and its backward, as the custom ops
``relaxeq::relaxation_regularizer_triton`` / ``relaxeq::relaxation_regularizer_backward_triton``.

The algebra is the native op's (csrc/relaxation_regularizer.cpp, DESIGN §1), for L same-shape layers:

    C_k  = W A_k,in − A_k,out W
    R_LD = Σ_k ⟨C_k G, C_k⟩ − 2 (A_k b)·(C_k s) + n ‖A_k b‖²     R_N = ⟨W G, W⟩ + 2 b·(W s) + n ‖b‖²

evaluated in the native op's form without the C_k G products: with H = Σ_k A_k G A_kᵀ, V = Σ_k A_k,out W A_k,inᵀ
and Cas = l(l+1) per irrep block, Σ_k ⟨C_k G, C_k⟩ = ⟨U, W⟩ with U = W H − Σ_k A_k,out (W G) A_k,inᵀ − V G + Cas W G
(= ½ its gradient); or over the rows X: Σ_k ‖C_k Xᵀ − A_k b 1ᵀ‖², ‖W Xᵀ + b 1ᵀ‖². Three kernels do the work:

* ``_lie_kernel``: Y_k = X B_k,in − B_k,out X by structure (B = A, or Aᵀ for the backward's adjoint),
  from per-index tables of the irreps (start of each index's (2l+1)-block, its place in it, its l) and the
  generators padded to 7 × 7: each entry reads at most 2 × 7 entries of X, never a dense [D, D] generator.
  With SUM_K the three k are summed in the program (the backward's Σ_k). The rows path's C_k.
* ``_sandwich_kernel``: Σ_k A_k,left X A_k,rightᵀ by the same tables (at most 7 × 7 entries of X per entry):
  V, H and the cross term of U.
* ``_bmm_kernel``: batched X_j @ Y_j with tl.dot, optionally stored, optionally reduced in the
  same program against a third matrix (Σ_i (X G)_oi Q_oi: the quadratic forms ⟨W G, W⟩, ⟨W H, W⟩, ⟨V G, W⟩ of
  the three products W·G, W·H, V·G, one launch) or as a sum of squares after subtracting a per-row vector (the
  rows path). Per-row partial sums are written out and summed by the host: no atomics, so the op is
  deterministic.

The forward also returns the per-layer gradients for unit upstream gradients (they are the products the
values need anyway), so the backward only scales them. Vectors (C s, A b and the bias terms) are a few small
torch ops on the host. Arithmetic is in G's dtype
(float32 or float64); float32 tl.dot runs in IEEE precision (no TF32) so the regulariser keeps float32
accuracy. CPU tensors run only under the Triton interpreter (TRITON_INTERPRET=1 before import).
"""
from __future__ import annotations

import functools
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from relaxeq_fast import _ops
from relaxeq_fast.triton_kernels._common import OpsRegistration, check_device, launches_on_input_device

__all__ = ["op", "backward_op", "relaxation_regularizer_triton", "relaxation_regularizer_backward_triton"]

FORWARD_NAME = "relaxeq::relaxation_regularizer_triton"
BACKWARD_NAME = "relaxeq::relaxation_regularizer_backward_triton"
# The native schemas (csrc/registration.cpp), minus the op name.
_FORWARD_SCHEMA = ("(Tensor W_r, Tensor? b_r, Tensor G, Tensor s, Tensor? rows, int n, int[] irreps_in,"
                   " int[] irreps_out, Tensor[] generators) -> (Tensor r_ld, Tensor r_n, Tensor grad_W_ld,"
                   " Tensor grad_W_n, Tensor grad_b_ld, Tensor grad_b_n)")
_BACKWARD_SCHEMA = ("(Tensor grad_ld, Tensor grad_n, Tensor W_r, Tensor grad_W_ld, Tensor grad_W_n, Tensor grad_b_ld,"
                    " Tensor grad_b_n, bool[2] output_mask) -> (Tensor dW_r, Tensor db_r)")
GEN = 7  # generators padded to 7 × 7: l ≤ 3


@triton.jit
def _layout(base, place, degree, idx, ok):
    """(start of the block, place in it, l) of the irreps indices idx, from _layout_tables."""
    return (tl.load(base + idx, mask=ok, other=0), tl.load(place + idx, mask=ok, other=0),
            tl.load(degree + idx, mask=ok, other=0))


@triton.jit
def _lie_kernel(X, Y, GENS, base_in, m_in, l_in, base_out, m_out, l_out, O, I, L,
                sx_k, sx_l, sx_o, sx_i,
                NL: tl.constexpr, DMAX: tl.constexpr, SUM_K: tl.constexpr, DT: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    # rows r = l · O + o run over every layer at once: few, full programs (the interpreter's cost is per op)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    r_ok, i_ok = r < L * O, i < I
    lay, o = r // O, r % O
    b_i, p_i, g_i = _layout(base_in, m_in, l_in, i, i_ok)
    d_i = 2 * g_i + 1
    b_o, p_o, g_o = _layout(base_out, m_out, l_out, o, r_ok)
    d_o = 2 * g_o + 1
    ok = r_ok[:, None] & i_ok[None, :]
    total = tl.zeros((BLOCK_R, BLOCK_I), dtype=DT)
    for k in tl.static_range(3):
        xk = X + k * sx_k + lay[:, None] * sx_l
        acc = tl.zeros((BLOCK_R, BLOCK_I), dtype=DT)
        for a in tl.static_range(DMAX):
            # (X B_in)[o, i] = Σ_a X[o, block(i) + a] · gen_l(i)[a, place(i)]
            ok_i = i_ok & (a < d_i)
            g_in = tl.load(GENS + ((k * NL + g_i) * GEN + a) * GEN + p_i, mask=ok_i, other=0.0).to(DT)
            x_in = tl.load(xk + o[:, None] * sx_o + (b_i + a)[None, :] * sx_i,
                           mask=r_ok[:, None] & ok_i[None, :], other=0.0).to(DT)
            acc += x_in * g_in[None, :]
            # (B_out X)[o, i] = Σ_a gen_l(o)[place(o), a] · X[block(o) + a, i]
            ok_o = r_ok & (a < d_o)
            g_out = tl.load(GENS + ((k * NL + g_o) * GEN + p_o) * GEN + a, mask=ok_o, other=0.0).to(DT)
            x_out = tl.load(xk + (b_o + a)[:, None] * sx_o + i[None, :] * sx_i,
                            mask=ok_o[:, None] & i_ok[None, :], other=0.0).to(DT)
            acc -= g_out[:, None] * x_out
        if SUM_K:
            total += acc
        else:
            tl.store(Y + (k * L * O + r[:, None]) * I + i[None, :], acc, mask=ok)
    if SUM_K:
        tl.store(Y + r[:, None] * I + i[None, :], total, mask=ok)


@triton.jit
def _sandwich_kernel(X, Y, GENS, base_p, m_p, l_p, base_q, m_q, l_q, P, Q, L, sx_l, sx_p, sx_q,
                     NL: tl.constexpr, DMAX: tl.constexpr, DT: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_Q: tl.constexpr):
    # Y[l, p, q] = Σ_k Σ_a Σ_c gen_k,l(p)[place(p), a] · X[l, block(p) + a, block(q) + c] · gen_k,l(q)[place(q), c]
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    r_ok, q_ok = r < L * P, q < Q
    lay, p = r // P, r % P
    b_p, w_p, g_p = _layout(base_p, m_p, l_p, p, r_ok)
    b_q, w_q, g_q = _layout(base_q, m_q, l_q, q, q_ok)
    acc = tl.zeros((BLOCK_R, BLOCK_Q), dtype=DT)
    for a in tl.static_range(DMAX):
        ok_a = r_ok & (a < 2 * g_p + 1)
        for c in tl.static_range(DMAX):
            ok_c = q_ok & (c < 2 * g_q + 1)
            x = tl.load(X + lay[:, None] * sx_l + (b_p + a)[:, None] * sx_p + (b_q + c)[None, :] * sx_q,
                        mask=ok_a[:, None] & ok_c[None, :], other=0.0).to(DT)
            coef = tl.zeros((BLOCK_R, BLOCK_Q), dtype=DT)
            for k in tl.static_range(3):
                left = tl.load(GENS + ((k * NL + g_p) * GEN + w_p) * GEN + a, mask=ok_a, other=0.0).to(DT)
                right = tl.load(GENS + ((k * NL + g_q) * GEN + w_q) * GEN + c, mask=ok_c, other=0.0).to(DT)
                coef += left[:, None] * right[None, :]
            acc += coef * x
    tl.store(Y + r[:, None] * Q + q[None, :], acc, mask=r_ok[:, None] & q_ok[None, :])


@triton.jit
def _bmm_kernel(A, B, OUT, RED, Q, VEC, M, N, K, L,
                sa_j, sa_m, sa_k, sb_l, sb_k, sb_n, sq_j, sq_m, sq_n, sv_j,
                STORE: tl.constexpr, REDUCE: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # OUT_j = A_j @ B_(j mod L); REDUCE 1: Σ_n OUT ⊙ Q per row; REDUCE 2: Σ_n (OUT − VEC[:, None])² per row
    j = tl.program_id(0)
    l = j % L
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    red = tl.zeros((BLOCK_M,), dtype=DT)
    if REDUCE == 2:
        v = tl.load(VEC + j * sv_j + m, mask=m_ok, other=0.0).to(DT)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=DT)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(A + j * sa_j + m[:, None] * sa_m + kk[None, :] * sa_k,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(DT)
            b = tl.load(B + l * sb_l + kk[:, None] * sb_k + n[None, :] * sb_n,
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(DT)
            if IEEE:
                acc += tl.dot(a, b, input_precision="ieee")
            else:
                acc += tl.dot(a, b)
        ok = m_ok[:, None] & n_ok[None, :]
        if STORE:
            tl.store(OUT + (j * M + m[:, None]) * N + n[None, :], acc, mask=ok)
        if REDUCE == 1:
            q = tl.load(Q + j * sq_j + m[:, None] * sq_m + n[None, :] * sq_n, mask=ok, other=0.0).to(DT)
            red += tl.sum(acc * q, axis=1)
        if REDUCE == 2:
            diff = tl.where(ok, acc - v[:, None], 0.0)
            red += tl.sum(diff * diff, axis=1)
    if REDUCE != 0:
        tl.store(RED + j * M + m, red, mask=m_ok)


@functools.lru_cache(maxsize=64)
def _layout_tables(irreps: Tuple[int, ...], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per index of an irreps vector: start of its (2l+1)-block, its place in the block, its l (int32)."""
    base, place, degree = [], [], []
    start = 0
    for mul, l in zip(irreps[::2], irreps[1::2]):
        d = 2 * l + 1
        for _ in range(mul):
            base += [start] * d
            place += list(range(d))
            degree += [l] * d
            start += d
    return tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (base, place, degree))


def _gen_table(generators: Sequence[torch.Tensor], transpose: bool) -> torch.Tensor:
    """[3, NL, 7, 7]: generators[l] (or their transposes) zero-padded."""
    pads = []
    for g in generators:
        g = g.transpose(1, 2) if transpose else g
        d = g.shape[-1]
        pads.append(torch.nn.functional.pad(g, (0, GEN - d, 0, GEN - d)))
    return torch.stack(pads, 1).contiguous()


def _dot_dtype(t: torch.Tensor):
    return tl.float64 if t.dtype == torch.float64 else tl.float32


def _lie(X: torch.Tensor, irreps_in, irreps_out, gens: torch.Tensor, per_k: bool, sum_k: bool) -> torch.Tensor:
    """X [L, O, I] (or [3, L, O, I] with per_k: entry k uses X[k]) → X B_in − B_out X: [3, L, O, I], or
    [L, O, I] summed over k with sum_k."""
    L, O, I = X.shape[-3:]
    out = X.new_empty((L, O, I) if sum_k else (3, L, O, I))
    if X.numel() == 0:
        return out.zero_()
    t_in, t_out = _layout_tables(tuple(irreps_in), X.device), _layout_tables(tuple(irreps_out), X.device)
    s = X.stride()
    sx_k = s[0] if per_k else 0
    d_max = 2 * max(list(irreps_in[1::2]) + list(irreps_out[1::2])) + 1
    cap_r, cap_i = (32, 32) if X.device.type == "cuda" else (256, 64)  # interpreter: few, large programs
    block_r = min(cap_r, triton.next_power_of_2(L * O))
    block_i = min(cap_i, triton.next_power_of_2(I))
    _lie_kernel[(triton.cdiv(L * O, block_r), triton.cdiv(I, block_i))](
        X, out, gens, *t_in, *t_out, O, I, L, sx_k, s[-3], s[-2], s[-1],
        NL=gens.shape[1], DMAX=d_max, SUM_K=sum_k, DT=_dot_dtype(X), BLOCK_R=block_r, BLOCK_I=block_i)
    return out


def _sandwich(X: torch.Tensor, irreps_p, irreps_q, gens: torch.Tensor) -> torch.Tensor:
    """X [L, P, Q] → Σ_k A_k,p X A_k,qᵀ [L, P, Q]: A_p acts on the P index (irreps_p), A_q on the Q index."""
    L, P, Q = X.shape
    out = X.new_empty((L, P, Q))
    if X.numel() == 0:
        return out.zero_()
    t_p, t_q = _layout_tables(tuple(irreps_p), X.device), _layout_tables(tuple(irreps_q), X.device)
    d_max = 2 * max(list(irreps_p[1::2]) + list(irreps_q[1::2])) + 1
    cap_r, cap_q = (32, 32) if X.device.type == "cuda" else (256, 64)  # interpreter: few, large programs
    block_r = min(cap_r, triton.next_power_of_2(L * P))
    block_q = min(cap_q, triton.next_power_of_2(Q))
    _sandwich_kernel[(triton.cdiv(L * P, block_r), triton.cdiv(Q, block_q))](
        X, out, gens, *t_p, *t_q, P, Q, L, *X.stride(),
        NL=gens.shape[1], DMAX=d_max, DT=_dot_dtype(X), BLOCK_R=block_r, BLOCK_Q=block_q)
    return out


@functools.lru_cache(maxsize=64)
def _casimir(irreps: Tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[D]: l(l+1) at every index of a degree-l block, Σ_k A_kᵀ A_k of the standard generators (cached, so
    the host-to-device copy happens once per irreps)."""
    values = [float(l * (l + 1)) for mul, l in zip(irreps[::2], irreps[1::2]) for _ in range(mul * (2 * l + 1))]
    return torch.tensor(values, dtype=dtype, device=device)


def _bmm(A: torch.Tensor, B: torch.Tensor, store: bool = True, reduce: int = 0, Q: Optional[torch.Tensor] = None,
         vec: Optional[torch.Tensor] = None):
    """A [J, M, K] (any strides), B [L, K, N] with J a multiple of L → (A_j @ B_(j mod L) [J, M, N] or None,
    per-row partial sums [J, M] or None; see _bmm_kernel)."""
    J, M, K = A.shape
    L, _, N = B.shape
    out = A.new_empty((J, M, N)) if store else None
    red = A.new_empty((J, M)) if reduce else None
    if J == 0 or M == 0:
        return out, red
    if N == 0 or K == 0:  # empty products: zeros (the sum of squares still sees −vec)
        if store:
            out.zero_()
        if reduce:
            red.copy_(vec.square() * N if reduce == 2 else torch.zeros_like(red))
        return out, red
    qs = Q.stride() if Q is not None else (0, 0, 0)
    bm = 16 if M <= 16 else 32
    bn = 16 if N <= 16 else 32
    bk = 16 if K <= 16 else 32
    _bmm_kernel[(J, triton.cdiv(M, bm))](
        A, B, out if store else A, red if reduce else A, Q if Q is not None else A, vec if vec is not None else A,
        M, N, K, L, *A.stride(), *B.stride(), *qs, vec.stride(0) if vec is not None else 0,
        STORE=store, REDUCE=reduce, DT=_dot_dtype(A), IEEE=A.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return out, red


_SCALAR = (1, 0)  # a single scalar column: X B_in = 0, so _lie gives −B_out X (generators on a vector)


def _apply_to_vectors(v: torch.Tensor, irreps, gens: torch.Tensor, per_k: bool = False, sum_k: bool = False):
    """B_k v for v [L, O] (or [3, L, O] per k): [3, L, O] (or [L, O] summed over k)."""
    return -_lie(v.unsqueeze(-1), _SCALAR, irreps, gens, per_k, sum_k).squeeze(-1)


@launches_on_input_device
def relaxation_regularizer_triton(W_r: torch.Tensor, b_r: Optional[torch.Tensor], G: torch.Tensor, s: torch.Tensor,
                                  rows: Optional[torch.Tensor], n: int, irreps_in: List[int], irreps_out: List[int],
                                  generators: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """Kernel body of ``relaxeq::relaxation_regularizer_triton``: (R_LD, R_N) [L] in G's dtype, and the per-layer
    unit gradients the backward scales (see the native op): dR_LD/dW, dR_N/dW [L, D_out, D_in], dR_LD/db,
    dR_N/db [L, D_out] ([0] without b_r).

    dR_LD/dW = 2 (U − Σ_k (A_k b)(A_k s)ᵀ + (Cas b) sᵀ), dR_N/dW = 2 (W G + b sᵀ), dR_LD/db = 2 (Cas W s + n Cas b
    − V s), dR_N/db = 2 (W s + n b); over the rows: dR_LD/dW = Σ_k (P_k A_inᵀ − A_outᵀ P_k) with P_k = 2 Z_k X,
    dR_N/dW = 2 Z_n X, and the row sums of Z_k, Z_n for the bias."""
    opname = "relaxation_regularizer (triton)"
    _ops.check_relaxation_regularizer_args(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators, op=opname)
    check_device(G, opname, _bmm_kernel, "relaxeq_fast.triton_kernels.relaxation_regularizer")
    dt = G.dtype
    W = W_r.detach().to(dt)
    L = W.shape[0]
    gens = _gen_table(generators, transpose=False)
    b = None if b_r is None else b_r.detach().to(dt)
    Ab = None if b is None else _apply_to_vectors(b, irreps_out, gens)  # [3, L, O]
    lie_sum = out_sum = None
    if rows is not None:
        gens_t = _gen_table(generators, transpose=True)
        Cj = _lie(W, irreps_in, irreps_out, gens, per_k=False, sum_k=False).view(3 * L, *W.shape[1:])  # C_k
        X = rows.detach().to(dt)
        Z, _ = _bmm(Cj, X.transpose(-1, -2))  # [3L, O, n]
        Zn, _ = _bmm(W, X.transpose(-1, -2))  # [L, O, n]
        if b is not None:
            Z = Z - Ab.reshape(3 * L, -1, 1)
            Zn = Zn + b.unsqueeze(-1)
            lie_sum, out_sum = Z.sum(-1).view(3, L, -1), Zn.sum(-1)
        r_ld, r_n = Z.square().view(3, L, -1).sum((0, 2)), Zn.square().sum((1, 2))
        P, _ = _bmm(Z, X)
        Pn, _ = _bmm(Zn, X)
        P = P.view(3, L, *W.shape[1:])
        grad_W_ld = 2 * _lie(P, irreps_in, irreps_out, gens_t, per_k=True, sum_k=True)  # Σ_k P_k A_inᵀ − A_outᵀ P_k
        grad_W_n = 2 * Pn
        if b is not None:
            # −2 Σ_k A_kᵀ lie_sum_k: the per-k adjoint action on vectors, summed
            grad_b_ld = -2 * _apply_to_vectors(lie_sum, irreps_out, gens_t, per_k=True, sum_k=True)
            grad_b_n = 2 * out_sum
    else:
        V = _sandwich(W, irreps_out, irreps_in, gens)  # [L, O, I]
        H = _sandwich(G, irreps_in, irreps_in, gens)  # [L, I, I]
        # W·G, W·H, V·G in one launch, each reduced against W in the same programs: ⟨W G, W⟩ = R_N without the
        # bias, ⟨W H, W⟩ and ⟨V G, W⟩ (= ⟨W G, V⟩, G symmetric)
        prods, red = _bmm(torch.cat([W, W, V]), torch.cat([G, H, G]), store=True, reduce=1, Q=torch.cat([W, W, W]))
        WG, WH, VG = prods.split(L)
        r_n, wh_w, vg_w = red.view(3, L, -1).sum(-1)
        cas_out = _casimir(tuple(irreps_out), W.device, dt)
        T = cas_out[:, None] * WG - _sandwich(WG, irreps_out, irreps_in, gens)
        U = WH - VG + T  # ½ dR_LD/dW without the bias; R_LD = ⟨U, W⟩
        r_ld = wh_w - vg_w + (T * W).sum((1, 2))
        Un = WG
        if b is not None:
            Ws, Vs = (W @ s.unsqueeze(-1)).squeeze(-1), (V @ s.unsqueeze(-1)).squeeze(-1)  # [L, O]
            cas_b = cas_out * b
            As = _apply_to_vectors(s, irreps_in, gens)  # [3, L, I]
            # −2 Σ_k (A_k b)ᵀ C_k s = −2 bᵀ V s + 2 (Cas b)ᵀ W s;  n Σ_k ‖A_k b‖² = n bᵀ Cas b
            r_ld = r_ld + (b * (n * cas_b - 2 * Vs)).sum(-1) + 2 * (cas_b * Ws).sum(-1)
            r_n = r_n + 2 * (b * Ws).sum(-1) + n * b.square().sum(-1)
            U = U - torch.einsum("klo,kli->loi", Ab, As) + cas_b.unsqueeze(-1) * s.unsqueeze(-2)
            Un = Un + b.unsqueeze(-1) * s.unsqueeze(-2)
            grad_b_ld = 2 * (cas_out * Ws + n * cas_b - Vs)
            grad_b_n = 2 * (Ws + n * b)
        grad_W_ld, grad_W_n = 2 * U, 2 * Un
    if b is None:
        grad_b_ld, grad_b_n = W.new_empty((0,)), W.new_empty((0,))
    return r_ld, r_n, grad_W_ld, grad_W_n, grad_b_ld, grad_b_n


@launches_on_input_device
def relaxation_regularizer_backward_triton(grad_ld: torch.Tensor, grad_n: torch.Tensor, W_r: torch.Tensor,
                                           grad_W_ld: torch.Tensor, grad_W_n: torch.Tensor, grad_b_ld: torch.Tensor,
                                           grad_b_n: torch.Tensor, output_mask: List[bool]
                                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Kernel body of ``relaxeq::relaxation_regularizer_backward_triton``: the forward's unit gradients scaled by
    the upstream [L] gradients (elementwise: no kernel of its own); [0] where ``output_mask`` is False."""
    opname = "relaxation_regularizer_backward (triton)"
    if len(output_mask) != 2:
        raise ValueError(f"{opname}: output_mask must have 2 entries, got {len(output_mask)}")
    L = W_r.shape[0]
    for name, g in (("grad_ld", grad_ld), ("grad_n", grad_n)):
        if g.dim() != 1 or g.shape[0] != L:
            raise ValueError(f"{opname}: {name} must be [L] = [{L}], got {list(g.shape)}")
    for name, g in (("grad_W_ld", grad_W_ld), ("grad_W_n", grad_W_n)):
        if g.shape != W_r.shape:
            raise ValueError(f"{opname}: {name} must have W_r's shape {list(W_r.shape)}, got {list(g.shape)}")
    dt = grad_W_ld.dtype
    gl, gn = grad_ld.to(dt), grad_n.to(dt)
    dW = ((grad_W_ld * gl.view(L, 1, 1) + grad_W_n * gn.view(L, 1, 1)).to(W_r.dtype) if output_mask[0]
          else W_r.new_empty((0,)))
    db = ((grad_b_ld * gl.view(L, 1) + grad_b_n * gn.view(L, 1)).to(W_r.dtype)
          if output_mask[1] and grad_b_ld.numel() else W_r.new_empty((0,)))
    return dW, db


_registration = OpsRegistration(
    [(FORWARD_NAME, relaxation_regularizer_triton, _FORWARD_SCHEMA),
     (BACKWARD_NAME, relaxation_regularizer_backward_triton, _BACKWARD_SCHEMA)],
    _ops.register_relaxation_regularizer_op)
op = _registration.getter(FORWARD_NAME)
backward_op = _registration.getter(BACKWARD_NAME)
