"""Packaging for pip users: console scripts name the extra to install when an optional dependency is missing
(tested by hiding the module), the extension refuses to load into another torch than it was built against
(naming both versions), the CUDA arch default of setup.py, and the extras' consistency with _deps."""
import ast
import os
import subprocess
import sys
import types

import pytest

from relaxeq_fast import _deps, _ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, cwd=None):
    """Run ``code`` in a fresh interpreter (hidden modules must not leak into this process)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=cwd or ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _hide(*modules: str) -> str:
    """Code that makes ``import <module>`` raise ImportError, as when the package is not installed."""
    return "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)


TINY_TRAIN = ["--dataset", "shapes", "--n-train", "32", "--n-test", "16", "--num-points", "16", "--k", "4",
              "--width", "0.2", "--batch-size", "16", "--epochs", "1", "--no-progress", "--threads", "1"]


@pytest.mark.parametrize("hidden, argv, extra", [
    ("matplotlib", TINY_TRAIN, "train"),
    ("e3nn", ["--model", "segnn", "--dataset", "nbody", "--epochs", "1", "--no-progress"], "e3nn"),
])
def test_relaxeq_train_names_the_missing_extra_in_one_line(hidden, argv, extra, tmp_path):
    code = _hide(hidden) + ("from relaxeq_fast.train import main\n"
                            f"sys.exit(main({argv + ['--run-dir', str(tmp_path / 'run')]!r}))")
    proc = _python(code)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("relaxeq-train: error:"), lines
    assert f"pip install 'relaxeq_fast[{extra}]'" in lines[0] and hidden in lines[0]
    assert not os.path.exists(tmp_path / "run")  # refused before anything was built or written


def test_relaxeq_study_and_bench_name_the_missing_extra(tmp_path):
    study = _python(_hide("matplotlib") + "from relaxeq_fast.study import main\n"
                    f"sys.exit(main(['--out', {str(tmp_path / 's')!r}, '--seeds', '0', '--', *{TINY_TRAIN[:-2]!r}]))")
    assert study.returncode == 2 and study.stderr.strip().count("\n") == 0, study.stderr[-2000:]
    assert "pip install 'relaxeq_fast[train]'" in study.stderr
    bench = _python(_hide("matplotlib") + "from relaxeq_fast.bench import main\n"
                    f"sys.exit(main(['--quick', '--out-dir', {str(tmp_path / 'b')!r}]))")
    assert bench.returncode == 2 and bench.stderr.strip().count("\n") == 0, bench.stderr[-2000:]
    assert "pip install 'relaxeq_fast[train]'" in bench.stderr


def test_modelnet_h5_reader_names_the_data_extra(tmp_path):
    for name in ("ply_data_train0.h5", "shape_names.txt"):
        (tmp_path / name).write_text("")
    proc = _python(_hide("h5py") + "from relaxeq_fast.data import modelnet\n"
                   f"modelnet.load_modelnet40_h5({str(tmp_path)!r}, 'train')")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "reading ModelNet40 .h5 files needs h5py, which is not installed: pip install 'relaxeq_fast[data]'")


def test_every_optional_module_has_its_extra_in_setup_py():
    """_deps.OPTIONAL's extras exist in setup.py and hold the package that provides the module."""
    extras = _setup_py_value("_EXTRAS")
    for module, (extra, _purpose) in _deps.OPTIONAL.items():
        dist = _deps.DISTRIBUTIONS.get(module, module)
        assert any(req.split(">")[0].split("=")[0] == dist for req in extras[extra]), (module, extra)


def test_setup_py_lists_every_package_directory():
    """A non-editable install ships only setup.py's ``packages``: every directory with an __init__.py under
    relaxeq_fast/ (and triton_kernels/, installed as relaxeq_fast.triton_kernels) must be listed."""
    setup_call = next(node for node in ast.walk(ast.parse(open(os.path.join(ROOT, "setup.py")).read()))
                      if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    listed = next(ast.literal_eval(k.value) for k in setup_call.keywords if k.arg == "packages")
    on_disk = {"relaxeq_fast.triton_kernels"}
    for dirpath, _dirs, files in os.walk(os.path.join(ROOT, "relaxeq_fast")):
        if "__init__.py" in files and "__pycache__" not in dirpath:
            on_disk.add(os.path.relpath(dirpath, ROOT).replace(os.sep, "."))
    assert "relaxeq_fast._ops" in on_disk  # the walk sees subpackages
    assert sorted(listed) == sorted(on_disk)


def test_torch_mismatch_names_both_versions():
    assert _ops.torch_mismatch(None, "2.14.1") is None  # a build that did not record its torch
    assert _ops.torch_mismatch("2.14.1", "2.14.1") is None
    msg = _ops.torch_mismatch("2.13.0+cu121", "2.14.1")
    assert "torch 2.13.0+cu121" in msg and "torch 2.14.1" in msg and _ops.REINSTALL_HINT in msg


def test_extension_built_for_another_torch_is_not_loaded():
    """A recorded build version that differs from the running torch: the package imports, the extension is
    not loaded (build_info says so), and the first op warns once with both versions, then runs the reference."""
    code = ("import sys, types, warnings, torch\n"
            "sys.modules['relaxeq_fast._build'] = types.SimpleNamespace(TORCH_VERSION='1.0.0-other')\n"
            "import relaxeq_fast\n"
            "from relaxeq_fast import functional as F\n"
            "assert not relaxeq_fast.build_info()['extension_loaded']\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    y = F.relaxed_linear(torch.ones(2, 3), torch.eye(3), None)\n"
            "assert torch.equal(y, torch.ones(2, 3))\n"
            "print([str(x.message) for x in w])\n")
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "torch 1.0.0-other" in proc.stdout and f"this is torch {__import__('torch').__version__}" in proc.stdout


def _setup_py_functions(names, namespace):
    """Execute the named top-level functions of setup.py (not setup() itself) in ``namespace``."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    keep = [node for node in tree.body if (isinstance(node, ast.FunctionDef) and node.name in names)
            or (isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "DEFAULT_CUDA_ARCHS" for t in node.targets))]
    exec(compile(ast.Module(body=keep, type_ignores=[]), "setup.py", "exec"), namespace)
    return namespace


def _setup_py_value(name):
    with open(os.path.join(ROOT, "setup.py")) as f:
        tree = ast.parse(f.read())
    ns = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == name for t in node.targets):
            exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), ns)
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript)
                and getattr(node.targets[0].value, "id", "") == name):
            exec(compile(ast.Module(body=[node], type_ignores=[]), "setup.py", "exec"), ns)
    return ns[name]


@pytest.mark.parametrize("caps, env, want", [
    ([(9, 0)], None, "9.0"),                   # one H200 visible: its capability only
    ([(8, 6), (8, 0), (8, 6)], None, "8.0;8.6"),
    ([], None, "8.0;9.0"),                     # none visible: the documented default
    ([(9, 0)], "7.5", "7.5"),                  # an explicit list wins
])
def test_cuda_arch_list_defaults_to_the_visible_gpus(caps, env, want, monkeypatch):
    fake_cuda = types.SimpleNamespace(is_available=lambda: bool(caps), device_count=lambda: len(caps),
                                      get_device_capability=lambda i: caps[i])
    ns = _setup_py_functions({"_visible_gpu_archs", "_arch_list"},
                             {"os": os, "torch": types.SimpleNamespace(cuda=fake_cuda), "_say": lambda msg: None})
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    if env is not None:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", env)
    assert ns["_arch_list"]() == want
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == want
