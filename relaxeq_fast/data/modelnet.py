"""ModelNet40 from a user's own copy, in either of the two usual layouts.

- h5 (PointNet / VN-PointNet): ``modelnet40_ply_hdf5_2048/`` with ``ply_data_train{0..4}.h5``,
  ``ply_data_test{0,1}.h5`` (datasets "data" float32 [n, 2048, 3] and "label" [n, 1]) and
  ``shape_names.txt``. Clouds are already centred and inside the unit sphere; they are returned as stored.
- txt (PointNet++): ``modelnet40_normal_resampled/`` with ``modelnet40_shape_names.txt``,
  ``modelnet40_{train,test}.txt`` (ids such as ``night_stand_0001``) and ``<class>/<id>.txt`` files of
  comma-separated ``x,y,z,nx,ny,nz`` rows (10000 per file). Only xyz of the first num_points rows is
  read, and each cloud is centred on its centroid and scaled so its largest norm is 1.

Every loader accepts either the layout directory itself or its parent as root. No package ships
ModelNet40, so nothing is downloaded here.
"""
from __future__ import annotations

import os
import re

import numpy as np

__all__ = ["H5_DIRNAME", "TXT_DIRNAME", "find_modelnet40", "load_modelnet40_h5", "load_modelnet40_txt"]

H5_DIRNAME = "modelnet40_ply_hdf5_2048"
TXT_DIRNAME = "modelnet40_normal_resampled"
SPLITS = ("train", "test")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _check_root(root) -> str:
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"ModelNet40 root {root!r} does not exist or is not a directory")
    return root


def _h5_files(directory: str, split: str) -> list[str]:
    """ply_data_<split>*.h5 in natural order (…9 before …10)."""
    pattern = re.compile(rf"^ply_data_{split}(\d*)\.h5$")
    found = [(m.group(1), name) for name in os.listdir(directory) if (m := pattern.match(name))]
    found.sort(key=lambda t: (int(t[0]) if t[0] else -1, t[1]))
    return [os.path.join(directory, name) for _, name in found]


def _h5_dir(root: str) -> str | None:
    for d in (root, os.path.join(root, H5_DIRNAME)):
        if os.path.isdir(d) and _h5_files(d, "train") + _h5_files(d, "test"):
            return d
    return None


def _txt_dir(root: str) -> str | None:
    for d in (root, os.path.join(root, TXT_DIRNAME)):
        if os.path.isfile(os.path.join(d, "modelnet40_shape_names.txt")):
            return d
    return None


def find_modelnet40(root) -> tuple[str, str]:
    """("h5" | "txt", directory of that layout) for root = the layout directory or its parent.

    The h5 layout wins when both are present (it is the one the PointNet and VN code use).
    """
    root = _check_root(root)
    if (d := _h5_dir(root)) is not None:
        return "h5", d
    if (d := _txt_dir(root)) is not None:
        return "txt", d
    raise FileNotFoundError(
        f"no ModelNet40 found under {root!r}: expected ply_data_train*.h5 (in it or in {H5_DIRNAME}/) "
        f"or modelnet40_shape_names.txt (in it or in {TXT_DIRNAME}/)")


def _read_lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ModelNet40 file {path!r} does not exist")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def load_modelnet40_h5(root, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(points float32 [N, 2048, 3], labels int64 [N], class_names) of the h5 layout.

    Reads every ply_data_<split>*.h5 in natural order and concatenates them.
    """
    _check_split(split)
    root = _check_root(root)
    directory = _h5_dir(root)
    if directory is None:
        raise FileNotFoundError(f"no ply_data_train*.h5 / ply_data_test*.h5 in {root!r} or in "
                                f"{os.path.join(root, H5_DIRNAME)!r}")
    files = _h5_files(directory, split)
    if not files:
        raise FileNotFoundError(f"no ply_data_{split}*.h5 in {directory!r}")
    from .._deps import require
    require("h5py")  # lazily: only this reader needs it
    import h5py
    class_names = _read_lines(os.path.join(directory, "shape_names.txt"))
    points, labels = [], []
    for path in files:
        with h5py.File(path, "r") as f:
            points.append(np.asarray(f["data"], dtype=np.float32))
            labels.append(np.asarray(f["label"]).reshape(-1).astype(np.int64))
        if points[-1].ndim != 3 or points[-1].shape[-1] != 3 or len(points[-1]) != len(labels[-1]):
            raise ValueError(f"{path!r}: expected data [n, P, 3] and label [n, 1], got data "
                             f"{list(points[-1].shape)} and label of {len(labels[-1])} entries")
    y = np.concatenate(labels)
    _check_labels(y, class_names, directory)
    return np.concatenate(points), y, class_names


def _check_labels(y: np.ndarray, class_names: list[str], where: str) -> None:
    if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
        raise ValueError(f"labels in {where!r} range over [{y.min()}, {y.max()}] but there are "
                         f"{len(class_names)} class names")


def _normalise(x: np.ndarray) -> np.ndarray:
    """PointNet++'s pc_normalize: centre on the centroid, scale the largest norm to 1 (per cloud)."""
    x = x - x.mean(axis=-2, keepdims=True)
    radius = np.linalg.norm(x, axis=-1).max(axis=-1)
    return x / np.where(radius > 0, radius, 1.0)[..., None, None]


def txt_split_ids(root, split: str) -> tuple[str, list[str], list[str]]:
    """(layout directory, ids of the split in file order, class_names) of the txt layout."""
    _check_split(split)
    root = _check_root(root)
    directory = _txt_dir(root)
    if directory is None:
        raise FileNotFoundError(f"no modelnet40_shape_names.txt in {root!r} or in "
                                f"{os.path.join(root, TXT_DIRNAME)!r}")
    class_names = _read_lines(os.path.join(directory, "modelnet40_shape_names.txt"))
    ids = _read_lines(os.path.join(directory, f"modelnet40_{split}.txt"))
    return directory, ids, class_names


def read_txt_clouds(directory: str, ids: list[str], class_names: list[str], num_points: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Read the clouds `ids` of the txt layout: (normalised xyz float32 [N, num_points, 3], labels)."""
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    index = {name: i for i, name in enumerate(class_names)}
    points = np.empty((len(ids), num_points, 3), dtype=np.float32)
    labels = np.empty(len(ids), dtype=np.int64)
    for k, shape_id in enumerate(ids):
        cls = shape_id.rsplit("_", 1)[0]                   # class names contain "_" (night_stand_0001)
        if cls not in index:
            raise ValueError(f"ModelNet40 id {shape_id!r}: class {cls!r} is not in modelnet40_shape_names.txt")
        path = os.path.join(directory, cls, shape_id + ".txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ModelNet40 file {path!r} does not exist")
        rows = np.loadtxt(path, delimiter=",", usecols=(0, 1, 2), max_rows=num_points, dtype=np.float64, ndmin=2)
        if len(rows) < num_points:
            raise ValueError(f"num_points={num_points} is larger than the {len(rows)} points in {path!r}")
        points[k] = _normalise(rows)
        labels[k] = index[cls]
    return points, labels


def load_modelnet40_txt(root, split: str, num_points: int = 1024) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(points float32 [N, num_points, 3], labels int64 [N], class_names) of the txt layout.

    Keeps xyz of the first num_points rows of each file and normalises each cloud into the unit
    sphere (centroid at 0, largest norm 1), as the PointNet++ loader does.
    """
    directory, ids, class_names = txt_split_ids(root, split)
    points, labels = read_txt_clouds(directory, ids, class_names, num_points)
    return points, labels, class_names
