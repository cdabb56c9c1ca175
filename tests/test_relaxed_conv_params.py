"""relaxeq::relaxed_conv_params (M = K_eq + θB and the defect D(B) of a relaxed steerable conv in one op) against
independent float64 references: the kernel rotated directly (C_2 / C_4: a pixel permutation with torch.rot90), the
pure-PyTorch reference (itself checked against direct rotations in test_steerable_relaxed.py), D = 0 on the
steerable basis; gradients (B's through the adjoint Dᵀ, and a learned θ's) by autograd of the reference and by
finite differences (gradcheck); opcheck, torch.compile, bad input, and the steerable layers and CNN that use it."""
import math
import re

import pytest
import torch

from relaxeq_fast import _ops, functional as F, use_backend
from relaxeq_fast.models import SteerableCNN
from relaxeq_fast.reference import relaxed_conv_params_ref
from relaxeq_fast.steerable import FieldType, RelaxedR2Conv, defect_matrices

from testing import DEVICES, RecordOps, assert_close_scaled

pytestmark = pytest.mark.skipif(not _ops.EXTENSION_LOADED, reason="the native extension is not built")

# float64: the op and the reference sum the same products in another order; float32: a few roundings of
# k²-, O- and I-long sums
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5}


def field_types(G):
    """Mixed field types: trivial, irreps and (C_N) regular fields; SO(2) (G None): trivial and irreps."""
    t = FieldType.trivial(G, 2) + FieldType.irreps(G, [1])
    tin = t + (FieldType.irreps(G, [2]) if G is None else FieldType.regular(G, 1))
    return tin, tin + FieldType.trivial(G, 1)


def make_inputs(G, k, dtype, device, theta=0.37, seed=0):
    tin, tout = field_types(G)
    g = torch.Generator().manual_seed(seed)
    t = lambda: torch.randn(tout.dim, tin.dim, k, k, dtype=dtype, generator=g).to(device).requires_grad_()  # noqa: E731
    K, B = t(), t()
    mats = [m.to(device=device, dtype=dtype) for m in defect_matrices(tin, tout, k)]
    return K, B, torch.tensor(theta, dtype=dtype, device=device), mats, G is not None


def call(K, B, theta, mats, rotation_step, need_defect=True):
    return torch.ops.relaxeq.relaxed_conv_params(K, B, theta, *mats, rotation_step, need_defect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("G,k", [(4, 3), (8, 5), (None, 5), (2, 1)], ids=["C4_k3", "C8_k5", "SO2_k5", "C2_k1"])
def test_values_and_gradients_match_reference(G, k, dtype, device):
    K, B, theta, mats, rot = make_inputs(G, k, dtype, device)
    theta.requires_grad_()  # a learned θ
    M, D = call(K, B, theta, mats, rot)
    K64, B64, th64 = (t.detach().cpu().double().requires_grad_() for t in (K, B, theta))
    eM, eD = relaxed_conv_params_ref(K64, B64, th64, *(m.cpu().double() for m in mats), rot)
    tol = RTOL[dtype]
    assert M.dtype == D.dtype == dtype and M.shape == D.shape == B.shape
    assert_close_scaled(M.cpu(), eM, tol, "M")
    assert_close_scaled(D.cpu(), eD, tol, "D")
    # distinct upstream gradients for M and D, so a swapped or dropped term shows
    g = torch.Generator().manual_seed(5)
    gM, gD = torch.randn(M.shape, dtype=torch.float64, generator=g), torch.randn(D.shape, dtype=torch.float64, generator=g)
    ((M.cpu().double() * gM).sum() + (D.cpu().double() * gD).sum()).backward()
    ((eM * gM).sum() + (eD * gD).sum()).backward()
    for name, got, want in (("dK", K.grad, K64.grad), ("dB", B.grad, B64.grad), ("dθ", theta.grad, th64.grad)):
        assert_close_scaled(got.cpu(), want, tol, name)


@pytest.mark.parametrize("G", [2, 4])
def test_defect_is_the_directly_rotated_kernel_minus_itself(G):
    # independent of every relaxeq formula: ρ_out(g) B(R_g^{-1} ·) ρ_in(g)^{-1} − B with the rotation by 2π/G
    # an exact pixel permutation (rot90) and ρ orthogonal
    K, B, theta, mats, rot = make_inputs(G, 5, torch.float64, "cpu")
    tin, tout = field_types(G)
    g = 2 * math.pi / G
    direct = torch.einsum("op,pqhw,iq->oihw", tout.representation(g), torch.rot90(B.detach(), 4 // G, dims=(-2, -1)),
                          tin.representation(g)) - B.detach()
    assert_close_scaled(call(K, B, theta, mats, rot)[1].detach(), direct, 1e-14, "D vs rotation")


@pytest.mark.parametrize("G", [4, 8, None], ids=["C4", "C8", "SO2"])
def test_defect_vanishes_on_equivariant_kernels(G):
    tin, tout = field_types(G)
    conv = RelaxedR2Conv(tin, tout, 5, dtype=torch.float64)
    torch.nn.init.normal_(conv.weight)
    K_eq = conv.expand()[0].detach()
    mats = defect_matrices(tin, tout, 5)
    _, D = call(K_eq, K_eq, torch.tensor(1.0, dtype=torch.float64), mats, G is not None)
    assert D.abs().max().item() < 1e-10 * K_eq.abs().max().item()
    _, D_free = call(K_eq, torch.randn_like(K_eq), torch.tensor(1.0, dtype=torch.float64), mats, G is not None)
    assert D_free.abs().max().item() > 1e-2, "test must see a non-zero defect off the basis"


@pytest.mark.parametrize("G", [4, None], ids=["C4", "SO2"])
def test_gradcheck_and_opcheck(G):
    K, B, theta, mats, rot = make_inputs(G, 3, torch.float64, "cpu")
    theta.requires_grad_()
    assert torch.autograd.gradcheck(lambda K, B, th: call(K, B, th, mats, rot), (K, B, theta))
    for need in (True, False):
        torch.library.opcheck(torch.ops.relaxeq.relaxed_conv_params, (K, B, theta, *mats, rot, need))


def test_only_one_output_used_and_no_defect():
    K, B, theta, mats, rot = make_inputs(4, 3, torch.float64, "cpu")
    M, D = call(K, B, theta, mats, rot, need_defect=False)
    assert D.numel() == 0
    M.sum().backward()  # only M
    assert_close_scaled(B.grad, torch.full_like(B, 0.37), 1e-15, "dB = θ dM")
    K.grad = B.grad = None
    _, D = call(K, B, theta, mats, rot)
    (D * D).sum().backward()  # only D: dK = 0, dB = 2 Dᵀ(D)
    assert K.grad is None or K.grad.abs().max() == 0
    B64 = B.detach().clone().requires_grad_()
    (relaxed_conv_params_ref(K.detach(), B64, theta, *mats, rot)[1].square().sum()).backward()
    assert_close_scaled(B.grad, B64.grad, 1e-12, "dB from D alone")


def test_torch_compile_fullgraph_matches_eager():
    K, B, theta, mats, rot = make_inputs(8, 5, torch.float32, "cpu")
    f = lambda K, B: F.relaxed_conv_params(K, B, theta, *mats, rot)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(K, B), f(K, B)):
        assert_close_scaled(got, want, 1e-6, "compiled")


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "B": a["B"][:, :, :2]}, "weight_relax must be [O, I, k, k]"),
    (lambda a: {**a, "K": a["K"][:-1]}, "kernel must have weight_relax's shape"),
    (lambda a: {**a, "theta": a["theta"].reshape(1)}, "theta must be a 0-d tensor"),
    (lambda a: {**a, "mats": [a["mats"][0][:-1], *a["mats"][1:]]}, "defect_out must be"),
    (lambda a: {**a, "mats": [a["mats"][0], a["mats"][1].float(), a["mats"][2]]}, "defect_in must be"),
    (lambda a: {**a, "mats": [*a["mats"][:2], a["mats"][2][:4, :4]]}, "defect_spatial must be"),
], ids=["B_rank", "K_shape", "theta_rank", "A_out_shape", "A_in_dtype", "S_shape"])
@pytest.mark.parametrize("entry", ["op", "functional"])
def test_bad_input_names_the_argument(change, message, entry):
    K, B, theta, mats, rot = make_inputs(4, 3, torch.float64, "cpu")
    a = change(dict(K=K.detach(), B=B.detach(), theta=theta, mats=mats))
    if entry == "op":
        with pytest.raises(RuntimeError, match=re.escape(message)):
            torch.ops.relaxeq.relaxed_conv_params(a["K"], a["B"], a["theta"], *a["mats"], rot, True)
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            F.relaxed_conv_params(a["K"], a["B"], a["theta"], *a["mats"], rot)


@pytest.mark.parametrize("relax_space", ["full", "complement"])
@pytest.mark.parametrize("G", [4, 8, None], ids=["C4", "C8", "SO2"])
def test_relaxed_layer_same_with_the_op_and_the_reference(G, relax_space):
    tin, tout = field_types(G)
    torch.manual_seed(0)
    conv = RelaxedR2Conv(tin, tout, 5, relax_init="default", theta=0.6, relax_space=relax_space,
                         dtype=torch.float64).train()
    x = torch.randn(2, tin.dim, 9, 9, dtype=torch.float64)
    results = {}
    for backend in ("native", "reference"):
        conv.zero_grad(set_to_none=True)
        with use_backend(backend), RecordOps() as ops:
            y = conv(x)
            r_ld = conv.regularizers().lie_derivative
        (y.square().sum() + r_ld).backward()
        results[backend] = (y.detach(), r_ld.detach(), [p.grad.clone() for p in conv.parameters()])
        if backend == "native":
            assert ops.ops.count("relaxeq.relaxed_conv_params") == 1
    (y_n, r_n, g_n), (y_r, r_r, g_r) = results["native"], results["reference"]
    assert_close_scaled(y_n, y_r, 1e-12, "y")
    assert_close_scaled(r_n, r_r, 1e-12, "R_LD")
    for a, e in zip(g_n, g_r):
        assert_close_scaled(a, e, 1e-12, "grad")


def test_steerable_cnn_relaxed_step_dispatches_at_most_1_5x_plain_ops():
    # issue 29: the relaxed step's extra dispatches (its kernel algebra and defect) bound its cost at this size
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    from relaxeq_fast import combine_regularizers
    from relaxeq_fast.vn import model_regularizers
    counts = {}
    for relaxed in (False, True):
        torch.manual_seed(0)
        model = SteerableCNN(num_classes=10, group=8, relaxed=relaxed, width=0.25).train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))

        def step():
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if relaxed:
                loss = loss + combine_regularizers(model_regularizers(model), 1e-2, 1e-3)
            loss.backward()
            opt.step()
        step()
        with Count() as c:
            step()
        counts[relaxed] = c.n
    print(f"ops per step: plain {counts[False]}, relaxed {counts[True]} ({counts[True] / counts[False]:.3f}x)")
    assert counts[True] <= 1.5 * counts[False]
