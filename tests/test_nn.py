"""RelaxedLinear / EquivariantLinear: equivariance, projection, θ, compile, and the no-extension fallback."""
import subprocess
import sys
import textwrap

import pytest
import torch

from relaxeq_fast import VN, Irreps, random_rotation, use_backend
from relaxeq_fast.nn import EquivariantLinear, RelaxedLinear

from testing import assert_close_scaled

REP_PAIRS = [(VN(5), VN(7)), (Irreps("2x0+1x1+1x2+1x3"), Irreps("1x0+2x1+2x2+1x3")), (VN(3), Irreps("2x1"))]
IDS = ["vn", "irreps_l0-3", "vn_to_irreps"]
BACKENDS = ["native", "reference"]


def relative_equivariance_error(layer, rin, rout, x, n_rot=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(n_rot):
        R = random_rotation(generator=g)
        lhs = layer(rin.rotate(R, x))
        rhs = rout.rotate(R, layer(x))
        worst = max(worst, ((lhs - rhs).norm() / rhs.norm()).item())
    return worst


def random_relaxed(rin, rout, theta, dtype=torch.float64):
    torch.manual_seed(0)
    layer = RelaxedLinear(rin, rout, relax_init="default", theta=theta, dtype=dtype)
    with torch.no_grad():
        layer.bias_relax.normal_()
        if layer.bias is not None:
            layer.bias.normal_()
    return layer


# float64: round-off only (1e-10 relative, DESIGN §4); float32: 1e-5 relative.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_equivariant_at_theta_zero_and_after_projection(rin, rout, backend, dtype, tol):
    layer = random_relaxed(rin, rout, theta=0.0, dtype=dtype)
    x = torch.randn(3, 11, *rin.feature_shape, dtype=dtype)
    with use_backend(backend):
        err_relaxed = relative_equivariance_error(layer, rin, rout, x)
        plain = layer.project()
        err_plain = relative_equivariance_error(plain, rin, rout, x)
        layer.set_theta(0.5)
        err_on = relative_equivariance_error(layer, rin, rout, x)
    print(f"relaxed θ=0 {err_relaxed:.2e}, projected {err_plain:.2e}, relaxed θ=0.5 {err_on:.2e}")
    assert err_relaxed < tol and err_plain < tol
    assert err_on > 1e-3, "a random relaxation branch must break equivariance (the test must be able to fail)"


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_projection_matches_theta_zero_and_loads_into_plain_class(rin, rout):
    layer = random_relaxed(rin, rout, theta=0.8)
    x = torch.randn(4, *rin.feature_shape, dtype=torch.float64)
    plain = layer.project()
    assert type(plain) is EquivariantLinear
    assert not any("relax" in k or "theta" in k for k in plain.state_dict())
    layer.set_theta(0.0)
    assert_close_scaled(plain(x), layer(x), 1e-13, "projected vs θ=0")
    fresh = EquivariantLinear(rin, rout, bias=layer.bias is not None, dtype=torch.float64)
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert_close_scaled(fresh(x), plain(x), 0.0, "reloaded")


@pytest.mark.parametrize("rin,rout", REP_PAIRS, ids=IDS)
def test_from_plain_keeps_outputs(rin, rout):
    plain = EquivariantLinear(rin, rout, dtype=torch.float64)
    relaxed = RelaxedLinear.from_plain(plain, theta=0.9)  # W_r = b_r = 0 at init
    x = torch.randn(6, *rin.feature_shape, dtype=torch.float64)
    assert_close_scaled(relaxed(x), plain(x), 1e-13, "from_plain")


def test_forward_is_the_effective_matrix():
    rin, rout = VN(4), VN(2)
    layer = random_relaxed(rin, rout, theta=0.3)
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    W_eq = torch.kron(layer.weights[0], torch.eye(3, dtype=torch.float64))
    want = x.reshape(5, 12) @ (W_eq + 0.3 * layer.weight_relax).T + 0.3 * layer.bias_relax
    assert_close_scaled(layer(x).reshape(5, 6), want, 1e-13)


def test_eval_mode_collects_no_statistics():
    layer = RelaxedLinear(VN(2), VN(2)).eval()
    layer(torch.randn(3, 2, 3))
    assert layer.last_stats is None


def test_bad_feature_shape_is_named():
    layer = RelaxedLinear(VN(4), VN(2))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 4, 3\] for VN\(4\), got \[2, 3, 4\]"):
        layer(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="relax_init"):
        RelaxedLinear(VN(2), VN(2), relax_init="ones")
    with pytest.raises(ValueError, match="share no degree"):
        EquivariantLinear(Irreps("2x0"), Irreps("1x1"))


def test_extra_repr_mentions_reps_and_theta():
    text = repr(RelaxedLinear(VN(2), Irreps("1x0+1x1"), theta=0.25))
    assert "VN(2) -> Irreps(\"1x0 + 1x1\")" in text and "theta=0.25" in text


def test_torch_compile_fullgraph_module():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = RelaxedLinear(VN(4), VN(8), relax_init="default", theta=0.5)
            self.b = RelaxedLinear(VN(8), VN(3), relax_init="default", theta=0.5)

        def forward(self, x):
            h = self.a(x)
            y = self.b(h * h.norm(dim=-1, keepdim=True))
            reg = self.a.regularizers().lie_derivative + self.b.regularizers().projection
            return y.square().mean() + 1e-3 * reg

    torch.manual_seed(0)
    net = Net().train()
    x = torch.randn(2, 16, 4, 3)
    eager = net(x)
    (g_eager,) = torch.autograd.grad(eager, net.a.weight_relax)
    compiled = torch.compile(net, fullgraph=True)
    out = compiled(x)
    (g_comp,) = torch.autograd.grad(out, net.a.weight_relax)
    assert_close_scaled(out, eager, 1e-5, "loss")
    assert_close_scaled(g_comp, g_eager, 1e-5, "dW_r")


def test_missing_extension_falls_back_with_one_warning():
    code = textwrap.dedent("""
        import sys, warnings, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "relaxeq_fast._C":
                    raise ImportError("simulated: extension not built")
        sys.meta_path.insert(0, Block())
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import relaxeq_fast
            from relaxeq_fast.nn import RelaxedLinear
            layer = RelaxedLinear(relaxeq_fast.VN(2), relaxeq_fast.VN(3))
            y = layer(torch.randn(4, 2, 3)); y = layer(torch.randn(4, 2, 3))
            layer.regularizers()
        msgs = [str(w.message) for w in caught if "relaxeq_fast._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "pip install" in msgs[0], msgs[0]
        assert relaxeq_fast.build_info()["extension_loaded"] is False
        assert relaxeq_fast.resolve_backend("cpu") == "reference"
        print("FALLBACK-OK", tuple(y.shape))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "FALLBACK-OK (4, 3, 3)" in out.stdout


def test_backend_selection_is_explicit(monkeypatch):
    from relaxeq_fast import get_backend, resolve_backend
    assert resolve_backend("cpu") == "native"
    with use_backend("reference"):
        assert get_backend() == "reference" and resolve_backend("cpu") == "reference"
        assert resolve_backend("cpu", "native") == "native"
    monkeypatch.setenv("RELAXEQ_BACKEND", "reference")
    assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv("RELAXEQ_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RELAXEQ_BACKEND must be one of"):
        resolve_backend("cpu")
