"""relaxeq_fast: fused kernels for training equivariant networks by constraint relaxation.

    layer = relaxeq_fast.nn.RelaxedLinear(VN(16), VN(32))      # W_eq x + θ (W_r x + b_r)
    y = layer(x)                                              # one fused pass; stats for the regulariser
    r = layer.regularizers()                                  # closed-form R_LD, R_N
    plain = layer.project()                                   # exactly equivariant layer
"""
from . import _ops
from .backend import BACKENDS, get_backend, resolve_backend, triton_available, triton_interpreter, use_backend
from .functional import InputStats, relaxed_linear
from .reference import relaxed_linear_backward_ref, relaxed_linear_ref
from .regularizer import combine_regularizers, lie_derivative_matrices, relaxation_regularizers
from .reps import VN, Irreps, random_rotation
from . import nn  # noqa: E402  (after functional: nn builds on it)
from . import vn, models, relaxation  # noqa: E402
from .vn import equivariance_error, project, relax, swap  # noqa: E402

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation can run: compiled CPU/CUDA kernels (+ CUDA archs), Triton, interpreter mode."""
    import torch
    info = dict(_ops.native_build_info())
    info.update(extension_loaded=_ops.EXTENSION_LOADED, triton=triton_available(),
                triton_interpreter=triton_interpreter(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    return info


__all__ = ["BACKENDS", "InputStats", "equivariance_error", "project", "relax", "swap", "Irreps", "VN", "build_info", "combine_regularizers", "get_backend",
           "lie_derivative_matrices", "models", "nn", "relaxation", "vn", "random_rotation", "relaxation_regularizers", "relaxed_linear",
           "relaxed_linear_backward_ref", "relaxed_linear_ref", "resolve_backend", "use_backend"]
