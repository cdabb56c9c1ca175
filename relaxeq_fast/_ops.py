"""torch.library glue: load the compiled kernels, register fake and autograd formulas.

The schemas live in csrc/registration.cpp (native ops, ``torch.ops.relaxeq.*``). The Triton
implementations are their own ops, ``relaxeq::relaxed_linear_triton`` and
``relaxeq::vn_leaky_relu_triton``, registered from ``relaxeq_fast.triton_kernels.<op>`` on first
use. Native and Triton ops share the fake and autograd formulas defined here.
"""
from __future__ import annotations

import functools
import warnings

import torch

from .reference import stats_dtype

REINSTALL_HINT = "pip install --no-build-isolation -e ."


def built_for_torch():
    """The torch version the extension was compiled against (setup.py writes it to relaxeq_fast/_build.py),
    or None for a build that did not record it."""
    try:
        from ._build import TORCH_VERSION
    except ImportError:
        return None
    return TORCH_VERSION


def torch_mismatch(built, running: str):
    """Why an extension built against torch ``built`` must not be loaded into torch ``running`` (its C++ ABI
    is torch's), or None when they match or the build did not record its version."""
    if built is None or built == running:
        return None
    return (f"relaxeq_fast._C was built against torch {built}, but this is torch {running}: its C++ ABI is "
            f"torch's, so it is not loaded; rebuild against this torch with: {REINSTALL_HINT}")


def _load_extension():
    mismatch = torch_mismatch(built_for_torch(), torch.__version__)
    if mismatch is not None:
        return False, ImportError(mismatch)
    try:
        from . import _C  # noqa: F401  (loads the library; its registrars define torch.ops.relaxeq.*)
    except ImportError as e:  # pragma: no cover - exercised by the fallback test in a subprocess
        return False, e
    return True, None


EXTENSION_LOADED, EXTENSION_ERROR = _load_extension()

_warned = False


def warn_missing_extension_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"relaxeq_fast: the compiled extension relaxeq_fast._C is not available ({EXTENSION_ERROR}); "
            f"falling back to the pure-PyTorch reference. Reinstall with: {REINSTALL_HINT}",
            RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Autocast (torch.autocast): PyTorch's lists decide, per op, the dtype its inputs are cast to.
# relaxed_linear / relaxed_conv2d are "lower precision" ops like F.linear / F.conv2d: x, M, c, D go to the
# autocast dtype (their statistics G, s, r, S still come out in float32). The VN batch norm and leaky ReLU,
# the regulariser and the parameter algebra are "fp32" ops like the norms: norms, divisions and quadratic
# forms lose too much in bfloat16's 8 mantissa bits, so their inputs go to float32. As in PyTorch, float64
# tensors are never cast, and the op runs with autocast excluded (its own casts are recorded by autograd,
# so gradients reach float32 parameters in float32).
AUTOCAST_LOWER, AUTOCAST_FP32 = "lower", "fp32"
_AUTOCAST_DEVICES = ("cpu", "cuda")
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)
_autocast_libs = {}


def _autocast_cast(value, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.dtype in _AUTOCAST_ELIGIBLE and value.dtype != dtype else value
    if isinstance(value, (list, tuple)):
        return type(value)(_autocast_cast(v, dtype) for v in value)
    return value


def _autocast_dtype(policy: str, device_type: str) -> torch.dtype:
    """The dtype an op of ``policy`` casts its inputs to (the autocast dtype is read at call time)."""
    return torch.get_autocast_dtype(device_type) if policy == AUTOCAST_LOWER else torch.float32


def autocast_inputs(policy: str, device_type: str, *values):
    """``values`` as an op's autocast rule casts them while autocast is on for ``device_type`` (else
    unchanged): the functional layer applies the rule before its own checks and on the reference backend,
    so every backend follows it."""
    if not torch.is_autocast_enabled(device_type):
        return values
    return _autocast_cast(values, _autocast_dtype(policy, device_type))


def register_autocast(qualname: str, policy: str):
    """The autocast rule of one op (native or Triton) on CPU and CUDA: ``policy`` is AUTOCAST_LOWER (inputs
    to ``torch.get_autocast_dtype(device)``, read at call time) or AUTOCAST_FP32 (inputs to float32)."""
    if policy not in (AUTOCAST_LOWER, AUTOCAST_FP32):
        raise ValueError(f"policy must be {AUTOCAST_LOWER!r} or {AUTOCAST_FP32!r}, got {policy!r}")
    op = torch._library.utils.lookup_op(qualname)
    namespace, name = qualname.split("::")
    if namespace not in _autocast_libs:  # one library per namespace, kept alive: it holds the registrations
        _autocast_libs[namespace] = torch.library.Library(namespace, "IMPL")
    lib = _autocast_libs[namespace]
    for device_type in _AUTOCAST_DEVICES:
        key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*_autocast_cast(args, _autocast_dtype(policy, _device_type)))

        # the Python dispatcher (torch.compile, export) reads py_kernels; eager calls reach the library kernel
        if op.has_kernel_for_dispatch_key(key):
            op.py_kernels.pop(key, None)
        op.py_impl(key)(autocast_kernel)
        lib.impl(name, lambda _keyset, *args, _kernel=autocast_kernel: _kernel(*args), key_name, with_keyset=True)


def _check_matches_x(t, name, x, op):
    if t.dtype != x.dtype:
        raise TypeError(f"{op}: {name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")


def check_relaxed_linear_args(x, M, c, op="relaxed_linear"):
    """Argument checks shared by the functional layer, the Triton op and the fake kernels
    (mirrors csrc/relaxed_linear.h, which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("M", M)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D [N, D_in], got {x.dim()}-D with shape {list(x.shape)}")
    if M.dim() != 2:
        raise ValueError(f"{op}: M must be 2-D [D_out, D_in], got {M.dim()}-D with shape {list(M.shape)}")
    if x.shape[1] != M.shape[1]:
        raise ValueError(f"{op}: x must have shape [N, D_in] with D_in = M.shape[1] = {M.shape[1]}, "
                         f"got {list(x.shape)}")
    _check_matches_x(M, "M", x, op)
    if c is not None:
        if c.dim() != 1 or c.shape[0] != M.shape[0]:
            raise ValueError(f"{op}: c must have shape [D_out] with D_out = M.shape[0] = {M.shape[0]}, "
                             f"got {list(c.shape)}")
        _check_matches_x(c, "c", x, op)


def check_relaxed_linear_backward_args(dy, x, M, op="relaxed_linear_backward"):
    check_relaxed_linear_args(x, M, None, op=op)
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{op}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if dy.dim() != 2 or dy.shape[0] != x.shape[0] or dy.shape[1] != M.shape[0]:
        raise ValueError(f"{op}: dy must have shape [N, D_out] = [{x.shape[0]}, {M.shape[0]}], "
                         f"got {list(dy.shape)}")
    _check_matches_x(dy, "dy", x, op)


def _relaxed_linear_fake(x, M, c, stats):
    check_relaxed_linear_args(x, M, c)
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    sdt = stats_dtype(x.dtype)
    y = x.new_empty((n, d_out))
    G = x.new_empty((d_in, d_in) if stats else (0, 0), dtype=sdt)
    s = x.new_empty((d_in,) if stats else (0,), dtype=sdt)
    return y, G, s


def _relaxed_linear_backward_fake(dy, x, M, output_mask):
    check_relaxed_linear_backward_args(dy, x, M)
    n, d_in, d_out = x.shape[0], x.shape[1], M.shape[0]
    dx = x.new_empty((n, d_in) if output_mask[0] else (0,))
    dM = x.new_empty((d_out, d_in) if output_mask[1] else (0,))
    dc = x.new_empty((d_out,) if output_mask[2] else (0,))
    return dx, dM, dc


def _setup_context(ctx, inputs, output):
    x, M, c, _stats = inputs
    _y, G, s = output
    ctx.mark_non_differentiable(G, s)  # statistics of the detached input x̂
    ctx.save_for_backward(x, M)
    ctx.has_c = c is not None


def make_backward(backward_op):
    """Autograd formula of y = x Mᵀ + c in terms of a fused backward op; G and s carry no gradient."""
    def backward(ctx, dy, _dG, _ds):
        x, M = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_c and ctx.needs_input_grad[2]]
        if not any(mask):
            return None, None, None, None
        dx, dM, dc = backward_op(dy.contiguous(), x, M, mask)
        return (dx if mask[0] else None, dM if mask[1] else None, dc if mask[2] else None, None)
    return backward


def register_relaxed_linear_op(qualname: str, backward_qualname: str, backward_op):
    torch.library.register_fake(qualname)(_relaxed_linear_fake)
    torch.library.register_fake(backward_qualname)(_relaxed_linear_backward_fake)
    torch.library.register_autograd(qualname, make_backward(backward_op), setup_context=_setup_context)
    register_autocast(qualname, AUTOCAST_LOWER)


# ---------------------------------------------------------------------------------------------
# relaxed_conv2d: x [B, C_in, H, W], M [C_out, C_in, k, k], c [C_out] or None,
# D [C_d, C_in, k, k] or None (the defect kernel), zero padding on every side

def check_relaxed_conv2d_args(x, M, c, D, padding, op="relaxed_conv2d"):
    """Argument checks shared by the functional layer, the Triton op and the fake kernels
    (mirrors csrc/relaxed_conv2d.h, which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("M", M)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be 4-D [B, C_in, H, W], got {x.dim()}-D with shape {list(x.shape)}")
    if M.dim() != 4:
        raise ValueError(f"{op}: M must be 4-D [C_out, C_in, k, k], got {M.dim()}-D with shape {list(M.shape)}")
    if M.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: M must have shape [C_out, C_in, k, k] with C_in = x.shape[1] = {x.shape[1]}, "
                         f"got {list(M.shape)}")
    if M.shape[2] != M.shape[3]:
        raise ValueError(f"{op}: M must have a square k x k kernel, got {list(M.shape)}")
    _check_matches_x(M, "M", x, op)
    if c is not None:
        if not isinstance(c, torch.Tensor) or c.dim() != 1 or c.shape[0] != M.shape[0]:
            raise ValueError(f"{op}: c must have shape [C_out] with C_out = M.shape[0] = {M.shape[0]}, got "
                             f"{list(c.shape) if isinstance(c, torch.Tensor) else type(c).__name__}")
        _check_matches_x(c, "c", x, op)
    if D is not None:
        if not isinstance(D, torch.Tensor) or D.dim() != 4 or D.shape[1:] != M.shape[1:]:
            raise ValueError(f"{op}: D must have shape [C_d, C_in, k, k] = [C_d, {M.shape[1]}, {M.shape[2]}, "
                             f"{M.shape[3]}] (the C_in and k of M), got "
                             f"{list(D.shape) if isinstance(D, torch.Tensor) else type(D).__name__}")
        _check_matches_x(D, "D", x, op)
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"{op}: padding must be an int >= 0, got {padding!r}")
    k = M.shape[2]
    if x.shape[2] + 2 * padding < k or x.shape[3] + 2 * padding < k:
        raise ValueError(f"{op}: the {k}x{k} kernel does not fit x {list(x.shape)} with padding {padding}")


def conv2d_out_shape(x, M, padding):
    k = M.shape[2]
    return (x.shape[0], M.shape[0], x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1)


def check_relaxed_conv2d_backward_args(dy, x, M, padding, op="relaxed_conv2d_backward"):
    check_relaxed_conv2d_args(x, M, None, None, padding, op=op)
    if not isinstance(dy, torch.Tensor):
        raise TypeError(f"{op}: dy must be a torch.Tensor, got {type(dy).__name__}")
    if tuple(dy.shape) != conv2d_out_shape(x, M, padding):
        raise ValueError(f"{op}: dy must have shape [B, C_out, H', W'] = {list(conv2d_out_shape(x, M, padding))}, "
                         f"got {list(dy.shape)}")
    _check_matches_x(dy, "dy", x, op)


def _relaxed_conv2d_fake(x, M, c, D, padding, need_S):
    check_relaxed_conv2d_args(x, M, c, D, padding)
    sdt = stats_dtype(x.dtype)
    y = x.new_empty(conv2d_out_shape(x, M, padding))
    r = x.new_empty(() if D is not None else (0,), dtype=sdt)
    S = x.new_empty(D.shape if D is not None and need_S else (0,), dtype=sdt)
    return y, r, S


def _relaxed_conv2d_backward_fake(dy, x, M, padding, output_mask):
    check_relaxed_conv2d_backward_args(dy, x, M, padding)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty(M.shape if output_mask[1] else (0,)),
            x.new_empty((M.shape[0],) if output_mask[2] else (0,)))


def _relaxed_conv2d_setup_context(ctx, inputs, output):
    x, M, c, D, padding, need_S = inputs
    _y, r, S = output
    # S is internal to autograd (the weight gradient of z): no gradient flows into it.
    ctx.mark_non_differentiable(S)
    if D is None:
        ctx.mark_non_differentiable(r)  # the empty placeholder
    # r = <D, S> is quadratic in D, so dr/dD = 2 S exactly: S is saved instead of recomputing z.
    has_S = D is not None and need_S
    ctx.save_for_backward(x, M, S if has_S else None)
    ctx.has_c, ctx.has_D, ctx.has_S, ctx.padding = c is not None, D is not None, has_S, padding
    ctx.D_dtype = D.dtype if D is not None else None


def make_relaxed_conv2d_backward(backward_op):
    """Autograd formula: dy reaches x, M, c (through ``backward_op``); dr reaches D only, as
    dD = 2 dr S (r is a function of x̂ and D, quadratic in D)."""
    def backward(ctx, dy, dr, _dS):
        x, M, S = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], ctx.has_c and needs[2]]
        need_dD = ctx.has_D and needs[3]
        grads = [None, None, None]
        if any(mask):
            if dy is None:
                dy = x.new_zeros(conv2d_out_shape(x, M, ctx.padding))
            out = backward_op(dy.contiguous(), x, M, ctx.padding, mask)
            grads = [g if m else None for g, m in zip(out, mask)]
        dD = None
        if need_dD:
            if not ctx.has_S:
                raise RuntimeError("relaxed_conv2d: a gradient for D was requested, but the forward ran with "
                                   "need_S=False and did not compute S (dD = 2 dr S); call it with need_S=True "
                                   "when D requires grad")
            dD = (S * (2 * dr) if dr is not None else torch.zeros_like(S)).to(ctx.D_dtype)
        return (*grads, dD, None, None)
    return backward


def register_relaxed_conv2d_op(qualname: str, backward_qualname: str, backward_op):
    torch.library.register_fake(qualname)(_relaxed_conv2d_fake)
    torch.library.register_fake(backward_qualname)(_relaxed_conv2d_backward_fake)
    torch.library.register_autograd(qualname, make_relaxed_conv2d_backward(backward_op),
                                    setup_context=_relaxed_conv2d_setup_context)
    register_autocast(qualname, AUTOCAST_LOWER)


# ---------------------------------------------------------------------------------------------
# vn_leaky_relu: x [N, C, 3], d [N, C, 3] or [N, 1, 3] (one direction shared by the channels)

def check_vn_leaky_relu_args(x, d, negative_slope, eps, op="vn_leaky_relu"):
    """Argument checks shared by the Triton op and the fake kernels (mirrors csrc/vn_leaky_relu.h,
    which guards direct calls of the native ops)."""
    for name, t in (("x", x), ("d", d)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 3 or x.shape[2] != 3:
        raise ValueError(f"{op}: x must have shape [N, C, 3] (VN features), got {list(x.shape)}")
    n, c = x.shape[0], x.shape[1]
    if d.dim() != 3 or d.shape[2] != 3 or d.shape[0] != n or d.shape[1] not in (1, c):
        raise ValueError(f"{op}: d must have shape [N, C, 3] or [N, 1, 3] with N = x.shape[0] = {n} and "
                         f"C = x.shape[1] = {c}, got {list(d.shape)}")
    _check_matches_x(d, "d", x, op)
    if not 0.0 <= negative_slope < 1.0:
        raise ValueError(f"{op}: negative_slope must be in [0, 1), got {negative_slope}")
    if not eps > 0.0:
        raise ValueError(f"{op}: eps must be positive (it keeps d = 0 finite), got {eps}")


def check_vn_leaky_relu_backward_args(grad_out, x, d, negative_slope, eps, op="vn_leaky_relu_backward"):
    check_vn_leaky_relu_args(x, d, negative_slope, eps, op=op)
    if not isinstance(grad_out, torch.Tensor):
        raise TypeError(f"{op}: grad_out must be a torch.Tensor, got {type(grad_out).__name__}")
    if grad_out.shape != x.shape:
        raise ValueError(f"{op}: grad_out must have the shape of x {list(x.shape)}, got {list(grad_out.shape)}")
    _check_matches_x(grad_out, "grad_out", x, op)


def _vn_leaky_relu_fake(x, d, negative_slope, eps):
    check_vn_leaky_relu_args(x, d, negative_slope, eps)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _vn_leaky_relu_backward_fake(grad_out, x, d, negative_slope, eps, output_mask):
    check_vn_leaky_relu_backward_args(grad_out, x, d, negative_slope, eps)
    grad_x = x.new_empty(x.shape if output_mask[0] else (0,))
    grad_d = x.new_empty(d.shape if output_mask[1] else (0,))
    return grad_x, grad_d


def _vn_leaky_relu_setup_context(ctx, inputs, output):
    # Only x and d are saved: the backward recomputes <x, d> and |d|^2 (the point of fusing).
    x, d, negative_slope, eps = inputs
    ctx.save_for_backward(x, d)
    ctx.negative_slope = negative_slope
    ctx.eps = eps


def make_vn_leaky_relu_backward(backward_op):
    """Autograd formula of vn_leaky_relu in terms of a fused backward op (no double backward)."""
    def backward(ctx, grad_out):
        x, d = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1]]
        if not any(mask):
            return None, None, None, None
        grad_x, grad_d = backward_op(grad_out.contiguous(), x, d, ctx.negative_slope, ctx.eps, mask)
        return (grad_x if mask[0] else None, grad_d if mask[1] else None, None, None)
    return backward


def register_vn_leaky_relu_op(qualname: str, backward_qualname: str, backward_op):
    torch.library.register_fake(qualname)(_vn_leaky_relu_fake)
    torch.library.register_fake(backward_qualname)(_vn_leaky_relu_backward_fake)
    torch.library.register_autograd(qualname, make_vn_leaky_relu_backward(backward_op),
                                    setup_context=_vn_leaky_relu_setup_context)
    register_autocast(qualname, AUTOCAST_FP32)


# ---------------------------------------------------------------------------------------------
# Vector-Neuron batch norm: vn_norm_stats, vn_batch_norm_apply (+ backward). Mirrors
# csrc/vn_batch_norm.h; shared by the functional layer, the Triton ops and the fake kernels.

def check_vn_features(x, op):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[2] != 3:
        raise ValueError(f"{op}: x must have shape [N, C, 3] (VN features), got {x.dim()}-D with shape "
                         f"{list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")


def _check_vn_channel_arg(t, name, x, dtype, op):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != x.shape[1]:
        raise ValueError(f"{op}: {name} must have shape [C] with C = x.shape[1] = {x.shape[1]}, got {list(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{op}: {name} must have dtype {dtype}, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} must be on the device of x ({x.device}), got {t.device}")


def check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op="vn_batch_norm_apply"):
    """mean/invstd: [C] in ``stats_dtype(x.dtype)``; weight/bias: [C] in x's dtype or None."""
    check_vn_features(x, op)
    sdt = stats_dtype(x.dtype)
    _check_vn_channel_arg(mean, "mean", x, sdt, op)
    _check_vn_channel_arg(invstd, "invstd", x, sdt, op)
    if weight is not None:
        _check_vn_channel_arg(weight, "weight", x, x.dtype, op)
    if bias is not None:
        _check_vn_channel_arg(bias, "bias", x, x.dtype, op)


def check_vn_batch_norm_apply_backward_args(grad_y, x, mean, invstd, weight, bias,
                                            op="vn_batch_norm_apply_backward"):
    check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias, op=op)
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"{op}: grad_y must be a torch.Tensor, got {type(grad_y).__name__}")
    if grad_y.shape != x.shape:
        raise ValueError(f"{op}: grad_y must have the shape of x {list(x.shape)}, got {list(grad_y.shape)}")
    _check_matches_x(grad_y, "grad_y", x, op)


def _vn_norm_stats_fake(x, norm_eps):
    check_vn_features(x, "vn_norm_stats")
    sdt = stats_dtype(x.dtype)
    return x.new_empty((x.shape[1],), dtype=sdt), x.new_empty((x.shape[1],), dtype=sdt)


def _vn_batch_norm_apply_fake(x, mean, invstd, weight, bias, norm_eps):
    check_vn_batch_norm_apply_args(x, mean, invstd, weight, bias)
    return x.new_empty(x.shape)


def _vn_batch_norm_apply_backward_fake(grad_y, x, mean, invstd, weight, bias, norm_eps, output_mask):
    check_vn_batch_norm_apply_backward_args(grad_y, x, mean, invstd, weight, bias)
    c = x.shape[1]
    sdt = stats_dtype(x.dtype)
    return (x.new_empty(x.shape if output_mask[0] else (0,)),
            x.new_empty((c,) if output_mask[1] else (0,), dtype=sdt if output_mask[1] else x.dtype),
            x.new_empty((c,) if output_mask[2] else (0,), dtype=sdt if output_mask[2] else x.dtype),
            x.new_empty((c,) if output_mask[3] else (0,)),
            x.new_empty((c,) if output_mask[4] else (0,)))


def vn_norm_stats_backward_formula(x, mean, norm_eps, grad_mean, grad_var):
    """Gradient of (mean, biased var) of the norms ‖x_n‖ + norm_eps w.r.t. x [N, C, 3].

    d mean / d norm_n = 1/N, d var / d norm_n = 2 (norm_n − mean) / N, d norm / d x = x / ‖x‖
    (0 at x = 0, as torch's vector_norm). Plain torch ops: differentiable again and traceable,
    and the [N, C] temporaries only exist in training's backward.
    """
    n = x.shape[0]
    sdt = mean.dtype
    xs = x.to(sdt)
    # g_norm = a + b·r per channel (r = ‖x‖; norm = r + norm_eps), folded into per-channel a, b so
    # the [N, C] work is one addcmul, one division and one mask.
    a = torch.zeros_like(mean)
    bcoef = torch.zeros_like(mean)
    if grad_mean is not None:
        a = a + grad_mean / n
    if grad_var is not None:
        bcoef = grad_var * (2.0 / n)
        a = a + bcoef * (norm_eps - mean)
    r = torch.linalg.vector_norm(xs, dim=-1)
    coef = torch.addcmul(a, bcoef, r).div_(r).masked_fill_(r == 0, 0)
    return (xs * coef.unsqueeze(-1)).to(x.dtype)


def _vn_norm_stats_setup_context(ctx, inputs, output):
    x, norm_eps = inputs
    mean, _var = output
    ctx.save_for_backward(x, mean)
    ctx.norm_eps = norm_eps


def _vn_norm_stats_backward(ctx, grad_mean, grad_var):
    x, mean = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    return vn_norm_stats_backward_formula(x, mean, ctx.norm_eps, grad_mean, grad_var), None


def _vn_apply_setup_context(ctx, inputs, output):
    x, mean, invstd, weight, bias, norm_eps = inputs
    ctx.save_for_backward(x, mean, invstd, weight, bias)
    ctx.norm_eps = norm_eps


def make_vn_batch_norm_apply_backward(backward_op):
    """Autograd formula of vn_batch_norm_apply in terms of its fused backward op (one pass over x)."""
    def backward(ctx, grad_y):
        x, mean, invstd, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        mask = [needs[0], needs[1], needs[2], weight is not None and needs[3], bias is not None and needs[4]]
        if not any(mask):
            return None, None, None, None, None, None
        grads = backward_op(grad_y.contiguous(), x, mean, invstd, weight, bias, ctx.norm_eps, mask)
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None,)
    return backward


def register_vn_batch_norm_ops(stats_qualname: str, apply_qualname: str, backward_qualname: str, backward_op):
    """Fake kernels and autograd for one backend's three vn_batch_norm ops (native or Triton)."""
    torch.library.register_fake(stats_qualname)(_vn_norm_stats_fake)
    torch.library.register_fake(apply_qualname)(_vn_batch_norm_apply_fake)
    torch.library.register_fake(backward_qualname)(_vn_batch_norm_apply_backward_fake)
    torch.library.register_autograd(stats_qualname, _vn_norm_stats_backward,
                                    setup_context=_vn_norm_stats_setup_context)
    torch.library.register_autograd(apply_qualname, make_vn_batch_norm_apply_backward(backward_op),
                                    setup_context=_vn_apply_setup_context)
    register_autocast(stats_qualname, AUTOCAST_FP32)
    register_autocast(apply_qualname, AUTOCAST_FP32)


# ---------------------------------------------------------------------------------------------
# relaxation_regularizer: W_r [L, D_out, D_in], b_r [L, D_out] or None, G [L, D_in, D_in], s [L, D_in],
# rows [L, n, D_in] or None; irreps as flat (mul, l) pairs; generators[l]: [3, 2l+1, 2l+1]

def check_relaxation_regularizer_args(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators,
                                      op="relaxation_regularizer"):
    """Argument checks of the fake kernels (mirrors csrc/relaxation_regularizer.cpp)."""
    for name, t in (("W_r", W_r), ("G", G), ("s", s)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if len(irreps_in) % 2 or len(irreps_out) % 2:
        raise ValueError(f"{op}: irreps_in and irreps_out must be flat (mul, l) pairs")
    d_in = sum(m * (2 * l + 1) for m, l in zip(irreps_in[::2], irreps_in[1::2]))
    d_out = sum(m * (2 * l + 1) for m, l in zip(irreps_out[::2], irreps_out[1::2]))
    max_l = max(list(irreps_in[1::2]) + list(irreps_out[1::2]))
    if len(generators) <= max_l:
        raise ValueError(f"{op}: generators must hold the generators of every degree up to {max_l}, "
                         f"got {len(generators)}")
    if W_r.dim() != 3 or tuple(W_r.shape[1:]) != (d_out, d_in):
        raise ValueError(f"{op}: W_r must be [L, D_out, D_in] = [L, {d_out}, {d_in}], got {list(W_r.shape)}")
    L = W_r.shape[0]
    if G.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: G must be float32 or float64, got {G.dtype}")
    if tuple(G.shape) != (L, d_in, d_in):
        raise ValueError(f"{op}: G must be [L, D_in, D_in] = [{L}, {d_in}, {d_in}], got {list(G.shape)}")
    if tuple(s.shape) != (L, d_in) or s.dtype != G.dtype:
        raise ValueError(f"{op}: s must be [L, D_in] = [{L}, {d_in}] in G's dtype, got {list(s.shape)} {s.dtype}")
    if b_r is not None and (tuple(b_r.shape) != (L, d_out) or b_r.dtype != W_r.dtype):
        raise ValueError(f"{op}: b_r must be [L, D_out] = [{L}, {d_out}] in W_r's dtype, got {list(b_r.shape)}")
    if rows is not None and tuple(rows.shape) != (L, n, d_in):
        raise ValueError(f"{op}: rows must be [L, n, D_in] = [{L}, {n}, {d_in}], got {list(rows.shape)}")


def _relaxation_regularizer_fake(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators):
    check_relaxation_regularizer_args(W_r, b_r, G, s, rows, n, irreps_in, irreps_out, generators)
    L = W_r.shape[0]
    grad_b = (L, W_r.shape[1]) if b_r is not None else (0,)
    return (G.new_empty((L,)), G.new_empty((L,)), G.new_empty(W_r.shape), G.new_empty(W_r.shape),
            G.new_empty(grad_b), G.new_empty(grad_b))


def _relaxation_regularizer_backward_fake(grad_ld, grad_n, W_r, grad_W_ld, grad_W_n, grad_b_ld, grad_b_n,
                                          output_mask):
    return (W_r.new_empty(W_r.shape if output_mask[0] else (0,)),
            W_r.new_empty(grad_b_ld.shape if output_mask[1] and grad_b_ld.numel() else (0,)))


def _relaxation_regularizer_setup_context(ctx, inputs, output):
    W_r, b_r = inputs[0], inputs[1]
    _r_ld, _r_n, *unit_grads = output
    ctx.mark_non_differentiable(*unit_grads)
    ctx.set_materialize_grads(False)  # no zero tensors for the unit gradients' (unused) gradients
    ctx.save_for_backward(W_r, *unit_grads)
    ctx.has_bias = b_r is not None
    ctx.n_generators = len(inputs[8])


def make_relaxation_regularizer_backward(backward_op):
    """Gradients reach W_r and b_r only (G, s and the rows are statistics of the detached input): the
    forward's unit gradients scaled by the upstream ones."""
    def backward(ctx, grad_ld, grad_n, *_unit_grad_grads):
        W_r, *unit_grads = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.has_bias and ctx.needs_input_grad[1]]
        none_for_the_rest = (None,) * 6 + ([None] * ctx.n_generators,)  # the structure of the inputs
        if not any(mask):
            return (None, None) + none_for_the_rest
        L = W_r.shape[0]
        grad_ld = unit_grads[0].new_zeros(L) if grad_ld is None else grad_ld
        grad_n = unit_grads[0].new_zeros(L) if grad_n is None else grad_n
        dW, db = backward_op(grad_ld, grad_n, W_r, *unit_grads, mask)
        return (dW if mask[0] else None, db if mask[1] else None) + none_for_the_rest
    return backward


def register_relaxation_regularizer_op(qualname: str, backward_qualname: str, backward_op):
    """Fake kernels and autograd for one backend's relaxation_regularizer (native or Triton)."""
    torch.library.register_fake(qualname)(_relaxation_regularizer_fake)
    torch.library.register_fake(backward_qualname)(_relaxation_regularizer_backward_fake)
    torch.library.register_autograd(qualname, make_relaxation_regularizer_backward(backward_op),
                                    setup_context=_relaxation_regularizer_setup_context)
    register_autocast(qualname, AUTOCAST_FP32)


# ---------------------------------------------------------------------------------------------
# relaxed_params: weight [C_out, C_in], weight_relax [C_out d, C_in d], bias / bias_relax [C_out d] or None,
# theta 0-d -> M [C_out d, C_in d], c [C_out d] ([0] without biases)

def check_relaxed_params_args(weight, weight_relax, bias, bias_relax, theta, op="relaxed_params") -> int:
    """Argument checks of the fake kernel and the functional wrapper (mirror csrc/relaxed_params.cpp);
    returns d."""
    for name, t in (("weight", weight), ("weight_relax", weight_relax), ("theta", theta)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight.dim() != 2 or 0 in weight.shape:
        raise ValueError(f"{op}: weight must be [C_out, C_in] with C_out, C_in > 0, got {list(weight.shape)}")
    c_out, c_in = weight.shape
    d = weight_relax.shape[1] // c_in if weight_relax.dim() == 2 else 0
    if weight_relax.dim() != 2 or d < 1 or tuple(weight_relax.shape) != (c_out * d, c_in * d):
        raise ValueError(f"{op}: weight_relax must be [C_out d, C_in d] = [{c_out} d, {c_in} d] for weight "
                         f"{list(weight.shape)}, got {list(weight_relax.shape)}")
    if weight_relax.dtype != weight.dtype or weight_relax.device != weight.device:
        raise ValueError(f"{op}: weight_relax must have weight's dtype and device ({weight.dtype}, {weight.device}), "
                         f"got {weight_relax.dtype}, {weight_relax.device}")
    if theta.dim() != 0 or theta.dtype != weight.dtype or theta.device != weight.device:
        raise ValueError(f"{op}: theta must be a 0-d tensor in weight's dtype and device, got shape "
                         f"{list(theta.shape)} {theta.dtype} on {theta.device}")
    for name, b in (("bias", bias), ("bias_relax", bias_relax)):
        if b is not None and (b.dim() != 1 or b.shape[0] != c_out * d or b.dtype != weight.dtype
                              or b.device != weight.device):
            raise ValueError(f"{op}: {name} must be [C_out d] = [{c_out * d}] in weight's dtype and device, got "
                             f"{list(b.shape)} {b.dtype} on {b.device}")
    return d


def _relaxed_params_fake(weight, weight_relax, bias, bias_relax, theta):
    check_relaxed_params_args(weight, weight_relax, bias, bias_relax, theta)
    c_len = weight_relax.shape[0] if bias is not None or bias_relax is not None else 0
    return torch.empty_like(weight_relax, memory_format=torch.contiguous_format), weight.new_empty((c_len,))


def _relaxed_params_backward_fake(grad_M, grad_c, weight, weight_relax, bias_relax, theta, output_mask):
    n = grad_M.shape[0]
    return (weight.new_empty(weight.shape if output_mask[0] else (0,)),
            weight.new_empty(grad_M.shape if output_mask[1] else (0,)),
            weight.new_empty((n,) if output_mask[2] else (0,)),
            weight.new_empty((n,) if output_mask[3] else (0,)),
            weight.new_empty(() if output_mask[4] else (0,)))


def _relaxed_params_setup_context(ctx, inputs, output):
    weight, weight_relax, bias, bias_relax, theta = inputs
    ctx.save_for_backward(weight, weight_relax, bias_relax, theta)
    ctx.has_bias = (bias is not None, bias_relax is not None)


def make_relaxed_params_backward(backward_op):
    """Gradients of weight, weight_relax, the biases and θ (dθ = ⟨dM, W_r⟩ + ⟨dc, b_r⟩: a learned θ; a scheduled θ
    is a buffer and asks for none)."""
    def backward(ctx, grad_M, grad_c):
        weight, weight_relax, bias_relax, theta = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias[0] and ctx.needs_input_grad[2],
                ctx.has_bias[1] and ctx.needs_input_grad[3], ctx.needs_input_grad[4]]
        if not any(mask):
            return None, None, None, None, None
        if grad_M is None:  # only c was used
            grad_M = torch.zeros_like(weight_relax, memory_format=torch.contiguous_format)
        grad_c = weight.new_empty((0,)) if grad_c is None else grad_c
        grads = backward_op(grad_M, grad_c, weight, weight_relax, bias_relax, theta, mask)
        return tuple(g if m else None for g, m in zip(grads, mask))
    return backward


# ---------------------------------------------------------------------------------------------
# relaxed_conv_params: kernel, weight_relax [O, I, k, k], theta 0-d, defect_out [O, O], defect_in [I, I],
# defect_spatial [k², k²] -> M [O, I, k, k], D [O, I, k, k] ([0] unless need_defect)

def check_relaxed_conv_params_args(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                   op="relaxed_conv_params") -> None:
    """Argument checks of the fake kernel and the functional wrapper (mirror csrc/relaxed_conv_params.cpp)."""
    for name, t in (("kernel", kernel), ("weight_relax", weight_relax), ("theta", theta), ("defect_out", defect_out),
                    ("defect_in", defect_in), ("defect_spatial", defect_spatial)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if weight_relax.dim() != 4 or weight_relax.shape[2] != weight_relax.shape[3]:
        raise ValueError(f"{op}: weight_relax must be [O, I, k, k], got {list(weight_relax.shape)}")
    like = (weight_relax.dtype, weight_relax.device)
    if kernel.shape != weight_relax.shape or (kernel.dtype, kernel.device) != like:
        raise ValueError(f"{op}: kernel must have weight_relax's shape, dtype and device ({list(weight_relax.shape)}, "
                         f"{like[0]}, {like[1]}), got {list(kernel.shape)}, {kernel.dtype}, {kernel.device}")
    if theta.dim() != 0 or (theta.dtype, theta.device) != like:
        raise ValueError(f"{op}: theta must be a 0-d tensor in weight_relax's dtype and device, got shape "
                         f"{list(theta.shape)} {theta.dtype} on {theta.device}")
    O, I, k, _ = weight_relax.shape
    for name, t, n in (("defect_out", defect_out, O), ("defect_in", defect_in, I), ("defect_spatial", defect_spatial, k * k)):
        if tuple(t.shape) != (n, n) or (t.dtype, t.device) != like:
            raise ValueError(f"{op}: {name} must be [{n}, {n}] in weight_relax's dtype and device ({like[0]}, "
                             f"{like[1]}), got {list(t.shape)} {t.dtype} on {t.device}")


def _relaxed_conv_params_fake(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial, rotation_step,
                              need_defect):
    check_relaxed_conv_params_args(kernel, weight_relax, theta, defect_out, defect_in, defect_spatial)
    return (torch.empty_like(weight_relax, memory_format=torch.contiguous_format),
            weight_relax.new_empty(weight_relax.shape if need_defect else (0,)))


def _relaxed_conv_params_backward_fake(grad_M, grad_D, weight_relax, theta, defect_out, defect_in, defect_spatial,
                                       rotation_step, output_mask):
    return (weight_relax.new_empty(weight_relax.shape if output_mask[0] else (0,)),
            weight_relax.new_empty(() if output_mask[1] else (0,)))


def _relaxed_conv_params_setup_context(ctx, inputs, output):
    _kernel, weight_relax, theta, defect_out, defect_in, defect_spatial, rotation_step, _need = inputs
    ctx.save_for_backward(weight_relax, theta, defect_out, defect_in, defect_spatial)
    ctx.rotation_step = rotation_step


def make_relaxed_conv_params_backward(backward_op):
    """dkernel = dM; dB = θ dM + Dᵀ(dD) and dθ = ⟨dM, B⟩ from the backward op (dθ for a learned θ only; the
    defect matrices are constants)."""
    def backward(ctx, grad_M, grad_D):
        weight_relax, theta, defect_out, defect_in, defect_spatial = ctx.saved_tensors
        mask = [ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        if grad_M is None:  # only D was used
            grad_M = torch.zeros_like(weight_relax, memory_format=torch.contiguous_format)
        grad_B = grad_theta = None
        if any(mask):
            grad_D = weight_relax.new_empty((0,)) if grad_D is None or grad_D.numel() == 0 else grad_D
            grad_B, grad_theta = backward_op(grad_M, grad_D, weight_relax, theta, defect_out, defect_in,
                                             defect_spatial, ctx.rotation_step, mask)
        return ((grad_M if ctx.needs_input_grad[0] else None), grad_B if mask[0] else None,
                grad_theta if mask[1] else None, None, None, None, None, None)
    return backward

if EXTENSION_LOADED:
    register_relaxed_linear_op("relaxeq::relaxed_linear", "relaxeq::relaxed_linear_backward",
                               lambda *a: torch.ops.relaxeq.relaxed_linear_backward(*a))
    register_vn_leaky_relu_op("relaxeq::vn_leaky_relu", "relaxeq::vn_leaky_relu_backward",
                              lambda *a: torch.ops.relaxeq.vn_leaky_relu_backward(*a))
    register_relaxed_conv2d_op("relaxeq::relaxed_conv2d", "relaxeq::relaxed_conv2d_backward",
                               lambda *a: torch.ops.relaxeq.relaxed_conv2d_backward(*a))
    register_vn_batch_norm_ops("relaxeq::vn_norm_stats", "relaxeq::vn_batch_norm_apply",
                               "relaxeq::vn_batch_norm_apply_backward",
                               lambda *a: torch.ops.relaxeq.vn_batch_norm_apply_backward(*a))
    register_relaxation_regularizer_op("relaxeq::relaxation_regularizer", "relaxeq::relaxation_regularizer_backward",
                                       lambda *a: torch.ops.relaxeq.relaxation_regularizer_backward(*a))
    for _name, _fake, _backward_fake, _make_backward, _setup in (
            ("relaxed_params", _relaxed_params_fake, _relaxed_params_backward_fake, make_relaxed_params_backward,
             _relaxed_params_setup_context),
            ("relaxed_conv_params", _relaxed_conv_params_fake, _relaxed_conv_params_backward_fake,
             make_relaxed_conv_params_backward, _relaxed_conv_params_setup_context)):
        # the parameter-algebra ops (written once in ATen calls, CPU and CUDA): fake, autograd, autocast
        torch.library.register_fake(f"relaxeq::{_name}")(_fake)
        torch.library.register_fake(f"relaxeq::{_name}_backward")(_backward_fake)
        torch.library.register_autograd(
            f"relaxeq::{_name}",
            _make_backward(lambda *a, _op=getattr(torch.ops.relaxeq, f"{_name}_backward"): _op(*a)),
            setup_context=_setup)
        register_autocast(f"relaxeq::{_name}", AUTOCAST_FP32)


@functools.cache  # the loaded build does not change within a process
def native_build_info() -> dict:
    if not EXTENSION_LOADED:
        return {"cpu": False, "cuda": False, "error": str(EXTENSION_ERROR)}
    info = {}
    for line in torch.ops.relaxeq.build_info().splitlines():
        key, _, value = line.partition("=")
        info[key] = value
    return {"cpu": info.get("cpu") == "1", "cuda": info.get("cuda") == "1",
            "cuda_archs": [a for a in info.get("cuda_archs", "").split(";") if a],
            "openmp": info.get("openmp") == "1", "compiler": info.get("compiler", "")}
