"""What every Triton op file shares: argument checks for the device, launching on the input's device,
determinism alerts, device occupancy, and the one-time registration of its custom ops."""
from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from typing import Callable

import torch

from relaxeq_fast._ops import torch_op

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` was decorated under TRITON_INTERPRET=1 (triton.jit decides at decoration)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(t: torch.Tensor, opname: str, kernel, module: str) -> None:
    """x must be a tensor Triton can run here: CUDA, or CPU under the interpreter; a float dtype."""
    if t.device.type == "cpu" and not is_interpreted(kernel):
        raise RuntimeError(
            f"{opname}: x is a CPU tensor, which Triton runs only in its interpreter: set TRITON_INTERPRET=1 "
            f"before importing {module} (or use a CUDA tensor)")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{opname}: x must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        raise TypeError(f"{opname}: x is bfloat16 on CPU; the Triton interpreter (numpy) has no bfloat16 "
                        "arithmetic: use float32/float64, or a CUDA tensor")


def device_guard(device: torch.device):
    """The context a launch runs in: ``device`` made current on CUDA, so the kernel runs on that GPU and
    on its current stream (Triton launches on the current device's current stream); nothing on CPU."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def launches_on_input_device(kernel_body: Callable) -> Callable:
    """Runs an op's kernel body under :func:`device_guard` of its first tensor argument (x, dy, grad_out:
    the op checks that every other tensor is on the same device)."""
    @functools.wraps(kernel_body)
    def on_device(first: torch.Tensor, *args, **kwargs):
        with device_guard(first.device):
            return kernel_body(first, *args, **kwargs)
    return on_device


def alert_not_deterministic(caller: str) -> None:
    """PyTorch's behaviour for an op without a deterministic implementation: under
    ``torch.use_deterministic_algorithms(True)`` raise (or warn with ``warn_only=True``), else nothing."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    msg = (f"{caller} does not have a deterministic implementation (partial sums are added with atomics), "
           "but you set 'torch.use_deterministic_algorithms(True)'. Use the native backend "
           "(relaxeq_fast.use_backend('native')), turn off determinism for this op, or pass warn_only=True")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, stacklevel=3)
    else:
        raise RuntimeError(msg)


_sm_count_cache: dict = {}


def program_slots(device: torch.device) -> int:
    """Roughly how many programs keep the device busy (queried at call time, never at import)."""
    if device.type != "cuda":
        return 1  # the interpreter runs programs one by one: fewer, fuller programs are faster
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _sm_count_cache:
        _sm_count_cache[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 4 * _sm_count_cache[idx]


class OpsRegistration:
    """A file's custom ops, defined together on first use, once per process.

    ``ops`` are ``(qualname, python body, schema)`` triples, made with ``torch.library.custom_op``;
    ``register_formulas(*qualnames)`` then registers their fake and autograd formulas (shared with the
    native ops in ``relaxeq_fast._ops``). A reloaded module finds its first op already defined — the
    dispatcher outlives the module — and skips the definitions, since defining an op twice raises and
    the existing definition is equivalent.
    """

    def __init__(self, ops, register_formulas: Callable[..., None]):
        self._ops, self._register_formulas = tuple(ops), register_formulas
        self._lock, self._done = threading.Lock(), False

    def ensure(self) -> None:
        with self._lock:
            if self._done:
                return
            ns, name = self._ops[0][0].split("::")
            if not hasattr(getattr(torch.ops, ns), name):
                for qualname, body, schema in self._ops:
                    torch.library.custom_op(qualname, body, mutates_args=(), schema=schema)
                # register_fake / register_autograd go to each new CustomOpDef, which has neither yet;
                # the fused backward is called through the dispatcher, so torch.compile sees the op
                self._register_formulas(*(qualname for qualname, _, _ in self._ops))
            self._done = True

    def getter(self, qualname: str) -> Callable[[], object]:
        """A function returning ``torch.ops.<qualname>``, after defining this file's ops if not yet done."""
        ns, name = qualname.split("::")

        def get():
            self.ensure()
            return torch_op(qualname)
        get.__name__ = get.__qualname__ = name
        get.__doc__ = f"``torch.ops.{ns}.{name}`` (registered on first call)."
        return get
