"""RelaxedLinear / EquivariantLinear: equivariance, projection, θ, compile, and the no-extension fallback."""
import subprocess
import sys
import textwrap

import os

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


def irreps_linear64(x, rin, rout, weights, bias, W_r, b_r, theta):
    """Float64 relaxed linear map from the math alone: every (output block, input block) pair of equal l
    is W_pair ⊗ I_{2l+1} (one weight per pair, output blocks outer, input blocks inner), the bias sits
    on the l = 0 outputs in order, plus θ (W_r x + b_r). Blocks are counted here from rin/rout.blocks."""
    def offsets(rep):
        out, start = [], 0
        for m, l in rep.blocks:
            out.append((start, m, l))
            start += m * (2 * l + 1)
        return out

    parts, w_iter, b_start = [], iter(weights), 0
    for _os, om, ol in offsets(rout):
        y = x.new_zeros(*x.shape[:-1], om, 2 * ol + 1)
        for is_, im, il in offsets(rin):
            if il == ol:
                xb = x[..., is_:is_ + im * (2 * il + 1)].reshape(*x.shape[:-1], im, 2 * il + 1)
                y = y + torch.einsum("uv,...vm->...um", next(w_iter), xb)
        if ol == 0 and bias is not None:
            y = y + bias[b_start:b_start + om].unsqueeze(-1)
            b_start += om
        parts.append(y.reshape(*x.shape[:-1], -1))
    assert next(w_iter, None) is None, "more weights than equal-l block pairs"
    y = torch.cat(parts, -1)
    return y + theta * (x @ W_r.T + b_r)


# Two scalar output blocks (bias placement across blocks), l = 0..2 with multiplicities.
VALUE_PAIRS = REP_PAIRS + [(Irreps("2x0+1x1+1x2"), Irreps("3x0+2x1+1x0"))]
VALUE_IDS = IDS + ["irreps_two_scalar_blocks"]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rin,rout", VALUE_PAIRS, ids=VALUE_IDS)
def test_forward_and_gradients_match_independent_float64_map(rin, rout, backend, train):
    # θ = 0.35 (not 0 or 1: a layer that dropped θ or applied it to W_eq would fail) and random
    # equivariant weights, bias, W_r and b_r; the training path (fused statistics) and the eval path.
    layer = random_relaxed(rin, rout, theta=0.35).train(train)
    x = torch.randn(2, 3, rin.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_in = x.reshape(2, 3, *rin.feature_shape).requires_grad_()
    params = [*layer.weights, layer.weight_relax, layer.bias_relax] + ([layer.bias] if layer.bias is not None else [])
    with use_backend(backend):
        y = layer(x_in)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(y, [x_in] + params, gy)

    x64 = x.clone().requires_grad_()
    p64 = [p.detach().clone().requires_grad_() for p in params]
    n_w = len(layer.weights)
    bias64 = p64[n_w + 2] if layer.bias is not None else None
    want = irreps_linear64(x64, rin, rout, p64[:n_w], bias64, p64[n_w], p64[n_w + 1], 0.35)
    grads_want = torch.autograd.grad(want, [x64] + p64, gy.reshape(want.shape))
    assert_close_scaled(y.reshape(want.shape), want, 1e-12, "y")
    for i, (got, ref) in enumerate(zip(grads, grads_want)):
        assert_close_scaled(got.reshape(ref.shape), ref, 1e-12, f"grad {i}")


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
    from relaxeq_fast import backend
    monkeypatch.setattr(backend, "_default", None)  # as in a fresh process: the environment not read yet
    monkeypatch.setenv("RELAXEQ_BACKEND", "reference")
    assert resolve_backend("cpu") == "reference"
    monkeypatch.setenv("RELAXEQ_BACKEND", "native")  # read once: a later change is not seen ...
    assert resolve_backend("cpu") == "reference"
    backend.set_default_backend("native")  # ... the setter is the way
    assert resolve_backend("cpu") == "native"
    backend.set_default_backend(None)  # re-read the environment
    monkeypatch.setenv("RELAXEQ_BACKEND", "bogus")
    with pytest.raises(ValueError, match="RELAXEQ_BACKEND must be one of"):
        resolve_backend("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_default_backend("fast")
    backend.set_default_backend(None)
    monkeypatch.delenv("RELAXEQ_BACKEND")


def test_op_calls_do_no_repeated_backend_or_build_work(monkeypatch):
    """After the first call, an op call reads neither the environment nor the build information."""
    from relaxeq_fast import _ops, backend, functional
    x, M = torch.randn(10, 6), torch.randn(4, 6)
    functional.relaxed_linear(x, M)  # the first calls may resolve and cache
    backend.resolve_backend("cuda")  # a CUDA resolution consults the build (no GPU needed to ask)
    calls = {"environ": 0, "build": 0}
    real_get = os.environ.get

    def counting_get(key, default=None):
        if key.startswith(("RELAXEQ", "TRITON")):
            calls["environ"] += 1
        return real_get(key, default)

    real_build = torch.ops.relaxeq.build_info
    monkeypatch.setattr(backend.os.environ, "get", counting_get)

    def counting_build():
        calls["build"] += 1
        return real_build()

    monkeypatch.setattr(torch.ops.relaxeq, "build_info", counting_build)
    for _ in range(5):
        functional.relaxed_linear(x, M)
        with use_backend("reference"):
            functional.relaxed_linear(x, M)
        backend.resolve_backend("cuda")
    assert calls == {"environ": 0, "build": 0}
    # the check can fail: with the caches emptied the same calls do the work again
    monkeypatch.setattr(backend, "_resolved", {})
    monkeypatch.setattr(backend, "_default", None)
    _ops.native_build_info.cache_clear()
    functional.relaxed_linear(x, M)
    backend.resolve_backend("cuda")
    assert calls["environ"] >= 1 and calls["build"] >= 1
