"""relaxeq_fast: fused kernels for training equivariant networks by constraint relaxation.

    layer = relaxeq_fast.nn.RelaxedLinear(VN(16), VN(32))      # W_eq x + θ (W_r x + b_r)
    y = layer(x)                                              # one fused pass; stats for the regulariser
    r = layer.regularizers()                                  # closed-form R_LD, R_N
    plain = layer.project()                                   # exactly equivariant layer

The public API, all importable from ``relaxeq_fast`` (see ``__all__``):

- functional ops (:mod:`relaxeq_fast.functional`): ``relaxed_linear``, ``relaxed_params``, ``vn_leaky_relu``,
  ``vn_batch_norm``, ``relaxed_conv2d``, ``relaxed_conv_params``, ``InputStats``;
- layers (:mod:`relaxeq_fast.nn`): ``EquivariantLinear``, ``RelaxedLinear``, ``RelaxedModule``,
  ``RELAX_SPACES`` (the relaxation's space: "full" or "complement"), ``PROJECTION_MODES`` ("drop", "nearest");
- whole-model helpers (:mod:`relaxeq_fast.vn`): ``relax``, ``project``, ``swap``, ``set_theta``,
  ``model_regularizers``, ``equivariance_error``, ``relaxed_layers``;
- θ schedules (:mod:`relaxeq_fast.relaxation`): ``ThetaScheduler``, ``make_schedule``, ``SCHEDULES`` and the
  schedule classes, ``projection_error``, ``relaxation_report``;
- regularisers (:mod:`relaxeq_fast.regularizer`): ``combine_regularizers``, ``relaxation_regularizers``,
  ``lie_derivative_matrices``, ``RegularizerTerms``, ``REDUCTIONS``;
- representations (:mod:`relaxeq_fast.reps`): ``Irreps``, ``VN``, ``random_rotation``;
- backends (:mod:`relaxeq_fast.backend`): ``use_backend``, ``get_backend``, ``resolve_backend``, ``BACKENDS``,
  ``triton_available``, ``triton_interpreter``; references: ``relaxed_linear_ref``,
  ``relaxed_linear_backward_ref``; ``build_info``;
- submodules ``nn``, ``vn``, ``models``, ``relaxation``, ``functional``, ``regularizer``, ``steerable``.
"""
from . import _ops
from .backend import BACKENDS, get_backend, resolve_backend, triton_available, triton_interpreter, use_backend
from .functional import (InputStats, relaxed_conv2d, relaxed_conv_params, relaxed_linear, relaxed_params, vn_batch_norm,
                         vn_leaky_relu)
from .reference import relaxed_linear_backward_ref, relaxed_linear_ref
from .regularizer import (REDUCTIONS, RegularizerTerms, combine_regularizers, lie_derivative_matrices,
                          relaxation_regularizers)
from .reps import VN, Irreps, random_rotation
from . import functional, regularizer  # noqa: E402
from . import nn  # noqa: E402  (after functional: nn builds on it)
from .nn import PROJECTION_MODES, RELAX_SPACES, EquivariantLinear, RelaxedLinear, RelaxedModule  # noqa: E402
from . import vn, models, relaxation, steerable, interop  # noqa: E402
from .vn import (equivariance_error, model_regularizers, project, relax, relaxed_layers, set_theta,  # noqa: E402
                 swap)
from .relaxation import (SCHEDULES, Constant, Cosine, HoldThenLinearDecay, ThetaSchedule, ThetaScheduler,  # noqa: E402
                         Triangle, make_schedule, projection_error, relaxation_report)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this installation can run: compiled CPU/CUDA kernels (+ CUDA archs), Triton, interpreter mode."""
    import torch
    info = dict(_ops.native_build_info())
    info.update(extension_loaded=_ops.EXTENSION_LOADED, triton=triton_available(),
                triton_interpreter=triton_interpreter(), torch=torch.__version__, torch_cuda=torch.version.cuda)
    return info


__all__ = [
    # functional ops (relaxeq_fast.functional)
    "InputStats", "relaxed_conv2d", "relaxed_conv_params", "relaxed_linear", "relaxed_params", "vn_batch_norm",
    "vn_leaky_relu",
    # layers (relaxeq_fast.nn)
    "EquivariantLinear", "RelaxedLinear", "RelaxedModule", "RELAX_SPACES", "PROJECTION_MODES",
    # whole-model helpers (relaxeq_fast.vn)
    "equivariance_error", "model_regularizers", "project", "relax", "relaxed_layers", "set_theta", "swap",
    # θ schedules (relaxeq_fast.relaxation)
    "SCHEDULES", "Constant", "Cosine", "HoldThenLinearDecay", "ThetaSchedule", "ThetaScheduler", "Triangle",
    "make_schedule", "projection_error", "relaxation_report",
    # regularisers (relaxeq_fast.regularizer)
    "REDUCTIONS", "RegularizerTerms", "combine_regularizers", "lie_derivative_matrices", "relaxation_regularizers",
    # representations (relaxeq_fast.reps)
    "Irreps", "VN", "random_rotation",
    # backends, references, build
    "BACKENDS", "get_backend", "resolve_backend", "triton_available", "triton_interpreter", "use_backend",
    "relaxed_linear_backward_ref", "relaxed_linear_ref", "build_info",
    # submodules
    "functional", "models", "nn", "regularizer", "relaxation", "steerable", "vn",
]
