"""relaxeq_fast.data.modelnet: the ModelNet40 readers (HDF5 and text layouts, tiny fake copies) and
load_dataset("modelnet40"); load_dataset's errors and the lazy import of the optional dependencies."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from relaxeq_fast.data import DATASETS, load_dataset, load_modelnet40_h5, load_modelnet40_txt
from relaxeq_fast.data import rotmnist

FAKE_CLASSES = ["airplane", "night_stand", "vase"]


@pytest.fixture
def fake_h5(tmp_path):
    h5py = pytest.importorskip("h5py")
    d = tmp_path / "modelnet40_ply_hdf5_2048"
    d.mkdir()
    rng = np.random.default_rng(0)
    parts = {"train": [5, 4], "test": [3]}
    data = {}
    for split, sizes in parts.items():
        clouds, labels = [], []
        for i, n in enumerate(sizes):
            x = rng.standard_normal((n, 64, 3)).astype(np.float32)
            lab = rng.integers(0, 3, (n, 1)).astype(np.uint8)
            with h5py.File(d / f"ply_data_{split}{i}.h5", "w") as f:
                f["data"] = x
                f["label"] = lab
            clouds.append(x)
            labels.append(lab[:, 0].astype(np.int64))
        data[split] = (np.concatenate(clouds), np.concatenate(labels))
        (d / f"{split}_files.txt").write_text("".join(f"data/modelnet40_ply_hdf5_2048/ply_data_{split}{i}.h5\n"
                                                      for i in range(len(sizes))))
    (d / "shape_names.txt").write_text("\n".join(FAKE_CLASSES) + "\n")
    return tmp_path, d, data


def test_modelnet_h5_reader(fake_h5):
    parent, d, data = fake_h5
    for root in (parent, d, str(d)):
        for split in ("train", "test"):
            x, y, names = load_modelnet40_h5(root, split)
            assert names == FAKE_CLASSES
            assert x.dtype == np.float32 and y.dtype == np.int64
            np.testing.assert_array_equal(x, data[split][0])  # files concatenated in order
            np.testing.assert_array_equal(y, data[split][1])
    with pytest.raises(ValueError, match="split must be one of"):
        load_modelnet40_h5(d, "valid")


def test_modelnet_h5_natural_file_order(fake_h5):
    h5py = pytest.importorskip("h5py")
    _, d, data = fake_h5
    for i in range(2, 11):                                 # ply_data_train10.h5 sorts after …train9
        with h5py.File(d / f"ply_data_train{i}.h5", "w") as f:
            f["data"] = np.full((1, 64, 3), i, np.float32)
            f["label"] = np.zeros((1, 1), np.uint8)
    x, _, _ = load_modelnet40_h5(d, "train")
    assert x.shape[0] == 9 + 9
    assert x[9:, 0, 0].tolist() == list(range(2, 11))


def test_load_dataset_modelnet_h5(fake_h5):
    parent, d, data = fake_h5
    train, test = load_dataset("modelnet40", root=str(parent), num_points=32)
    assert train.x.shape == (9, 32, 3) and test.x.shape == (3, 32, 3)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert torch.equal(train.x, torch.from_numpy(data["train"][0][:, :32]))
    assert train.class_names == FAKE_CLASSES
    sub, sub_test = load_dataset("modelnet40", root=str(d), num_points=64, n_train=4, n_test=2, seed=3)
    sub2, _ = load_dataset("modelnet40", root=str(d), num_points=64, n_train=4, n_test=2, seed=3)
    assert sub.x.shape == (4, 64, 3) and sub_test.x.shape == (2, 64, 3)
    assert torch.equal(sub.x, sub2.x)
    full = torch.from_numpy(data["train"][0])
    for cloud, label in zip(sub.x, sub.y):
        match = (full == cloud).all(-1).all(-1).nonzero()
        assert len(match) == 1 and data["train"][1][match[0, 0]] == label
    with pytest.raises(ValueError, match=r"num_points=100 is larger than the 64 points"):
        load_dataset("modelnet40", root=str(parent), num_points=100)
    with pytest.raises(ValueError, match="n_train=50"):
        load_dataset("modelnet40", root=str(parent), n_train=50, num_points=8)


@pytest.fixture
def fake_txt(tmp_path):
    d = tmp_path / "modelnet40_normal_resampled"
    d.mkdir()
    (d / "modelnet40_shape_names.txt").write_text("\n".join(FAKE_CLASSES) + "\n")
    rng = np.random.default_rng(1)
    splits = {"train": ["airplane_0001", "night_stand_0001", "vase_0001", "night_stand_0002"],
              "test": ["vase_0002", "airplane_0002"]}
    rows = {}
    for split, ids in splits.items():
        (d / f"modelnet40_{split}.txt").write_text("\n".join(ids) + "\n")
        for shape_id in ids:
            cls = shape_id.rsplit("_", 1)[0]
            (d / cls).mkdir(exist_ok=True)
            xyz = rng.standard_normal((64, 3)) * [2.0, 1.0, 0.5] + [3.0, -1.0, 0.2]
            normals = rng.standard_normal((64, 3))
            r = np.concatenate([xyz, normals], 1)
            np.savetxt(d / cls / f"{shape_id}.txt", r, delimiter=",", fmt="%.6f")
            rows[shape_id] = np.loadtxt(d / cls / f"{shape_id}.txt", delimiter=",")
    return tmp_path, d, splits, rows


def test_modelnet_txt_reader(fake_txt):
    parent, d, splits, rows = fake_txt
    for root in (parent, d):
        x, y, names = load_modelnet40_txt(root, "train", 32)
        assert names == FAKE_CLASSES
        assert x.shape == (4, 32, 3) and x.dtype == np.float32 and y.dtype == np.int64
        assert y.tolist() == [0, 1, 2, 1]
        norms = np.linalg.norm(x, axis=2)
        assert np.abs(x.mean(1)).max() < 1e-5
        np.testing.assert_allclose(norms.max(1), 1.0, atol=1e-5)
        first = rows["airplane_0001"][:32, :3]
        expected = first - first.mean(0)
        expected /= np.linalg.norm(expected, axis=1).max()
        np.testing.assert_allclose(x[0], expected, atol=1e-5)   # xyz of the first 32 rows, normalised
    with pytest.raises(ValueError, match=r"num_points=100 is larger than the 64 points"):
        load_modelnet40_txt(d, "train", 100)


def test_load_dataset_modelnet_txt(fake_txt):
    parent, d, splits, _ = fake_txt
    train, test = load_dataset("modelnet40", root=str(parent), num_points=16)
    assert train.x.shape == (4, 16, 3) and test.x.shape == (2, 16, 3)
    assert test.y.tolist() == [2, 0] and test.class_names == FAKE_CLASSES
    sub, _ = load_dataset("modelnet40", root=str(d), num_points=16, n_train=2, n_test=1, seed=0)
    assert sub.x.shape == (2, 16, 3)
    assert all(any(torch.equal(c, t) for t in train.x) for c in sub.x)
    os.remove(d / "vase" / "vase_0002.txt")
    with pytest.raises(FileNotFoundError, match="vase_0002.txt"):
        load_dataset("modelnet40", root=str(parent), num_points=16)


def test_modelnet_h5_preferred_when_both_layouts(fake_h5):
    parent, _, data = fake_h5
    (parent / "modelnet40_normal_resampled").mkdir()
    (parent / "modelnet40_normal_resampled" / "modelnet40_shape_names.txt").write_text("a\nb\n")
    train, _ = load_dataset("modelnet40", root=str(parent), num_points=64)
    assert torch.equal(train.x, torch.from_numpy(data["train"][0]))


def test_load_dataset_errors(tmp_path):
    assert DATASETS == ("shapes", "modelnet40", "rotmnist")
    messages = []
    with pytest.raises(ValueError) as info:
        load_dataset("foo")
    assert str(info.value) == "dataset must be one of ['shapes', 'modelnet40', 'rotmnist'], got 'foo'"
    messages.append(str(info.value))
    with pytest.raises(ValueError) as info:
        load_dataset("modelnet40")
    assert str(info.value) == ("modelnet40 needs root=<dir containing modelnet40_ply_hdf5_2048 or "
                               "modelnet40_normal_resampled>")
    messages.append(str(info.value))
    missing = tmp_path / "no_such_dir"
    with pytest.raises(FileNotFoundError, match="no_such_dir") as info:
        load_dataset("modelnet40", root=str(missing))
    messages.append(str(info.value))
    with pytest.raises(FileNotFoundError, match="modelnet40_ply_hdf5_2048") as info:
        load_dataset("modelnet40", root=str(tmp_path))     # exists, but holds neither layout
    messages.append(str(info.value))
    with pytest.raises(FileNotFoundError, match=rotmnist.AMAT_TRAIN) as info:
        load_dataset("rotmnist", root=str(tmp_path))       # exists, but holds no .amat files
    messages.append(str(info.value))
    assert all("\n" not in m for m in messages), "error messages are one line"


def test_optional_dependencies_imported_lazily():
    code = ("import sys, relaxeq_fast.data; "
            "print(int('h5py' in sys.modules), int('mlxtend' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0"], out.stdout + out.stderr
