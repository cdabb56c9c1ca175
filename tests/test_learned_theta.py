"""Issue 28's fused path: θ as a differentiable input. A relaxed layer whose θ requires grad (a learned per-layer
θ) gets dθ through every route its forward takes — relaxed_params (VN / scalar layers), the dense irreps path,
relaxed_conv2d (steerable and RSteer kernels), the complement parametrisation — on the native and the reference
backends: against central differences (float64; the output is affine in θ for the full parametrisation and
quadratic-free in the complement's, so the quotient is exact up to rounding) and by gradcheck."""
import pytest
import torch
from torch.func import functional_call

from relaxeq_fast import _ops
from relaxeq_fast.nn import RelaxedLinear
from relaxeq_fast.reps import VN, Irreps
from relaxeq_fast.steerable import FieldType, RelaxedR2Conv, RelaxedRSteerConv

F64 = torch.float64
BACKENDS = ["reference", pytest.param("native", marks=pytest.mark.skipif(not _ops.EXTENSION_LOADED,
                                                                          reason="the native extension is not built"))]


def linear(irreps_in, irreps_out, relax_space, backend):
    torch.manual_seed(0)
    layer = RelaxedLinear(irreps_in, irreps_out, bias=True, relax_init="default", relax_space=relax_space,
                          backend=backend, dtype=F64)
    with torch.no_grad():
        if layer.bias_relax is not None:
            layer.bias_relax.normal_()
    return layer.eval(), torch.randn(5, *irreps_in.feature_shape, dtype=F64)


def conv(cls, relax_space, backend):
    torch.manual_seed(1)
    t_in, t_out = FieldType.irreps(4, [1], 2), FieldType.regular(4, 2)
    layer = cls(t_in, t_out, 3, relax_init="default", relax_space=relax_space, backend=backend, dtype=F64)
    return layer.eval(), torch.randn(2, t_in.dim, 6, 6, dtype=F64)


CASES = {
    "vn_relaxed_params": lambda space, backend: linear(VN(3), VN(2), space, backend),
    "scalars_relaxed_params": lambda space, backend: linear(Irreps("3x0"), Irreps("2x0"), space, backend),
    "mixed_irreps_dense": lambda space, backend: linear(Irreps("1x0+1x1"), Irreps("2x1+1x0"), space, backend),
    "steerable_conv": lambda space, backend: conv(RelaxedR2Conv, space, backend),
    "rsteer_conv": lambda space, backend: conv(RelaxedRSteerConv, space, backend),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("relax_space", ["full", "complement"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_theta_gradient_against_finite_differences_and_gradcheck(case, relax_space, backend):
    layer, x = CASES[case](relax_space, backend)
    g = torch.randn_like(layer(x))

    def loss(theta):
        return (functional_call(layer, {"theta": theta}, (x,)) * g).sum()

    theta = torch.tensor(0.37, dtype=F64, requires_grad=True)
    (dtheta,) = torch.autograd.grad(loss(theta), (theta,))
    h = 1e-3
    with torch.no_grad():
        fd = (loss(torch.tensor(0.37 + h, dtype=F64)) - loss(torch.tensor(0.37 - h, dtype=F64))) / (2 * h)
    print(f"{case} {relax_space} {backend}: dθ {dtheta.item():.12g}, finite differences {fd.item():.12g}")
    if case.startswith("scalars") and relax_space == "complement":
        # every map between scalars is equivariant: the complement is empty and θ scales nothing
        assert dtheta.item() == 0.0 and abs(fd.item()) < 1e-12
    else:
        assert abs(dtheta.item()) > 1e-3  # the branch really depends on θ
        assert dtheta.item() == pytest.approx(fd.item(), rel=1e-8)
    assert torch.autograd.gradcheck(lambda t: functional_call(layer, {"theta": t}, (x,)),
                                    (theta.detach().clone().requires_grad_(),))


def test_theta_gradient_is_zero_where_the_branch_is():
    """At B = 0 (zero relaxation) θ has nothing to scale: dθ = 0 exactly, on both backends' linear routes."""
    layer, x = linear(VN(3), VN(2), "full", "native" if _ops.EXTENSION_LOADED else "reference")
    with torch.no_grad():
        layer.weight_relax.zero_()
        layer.bias_relax.zero_()
    theta = torch.tensor(0.5, dtype=F64, requires_grad=True)
    (dtheta,) = torch.autograd.grad(functional_call(layer, {"theta": theta}, (x,)).sum(), (theta,))
    assert dtheta.item() == 0.0
