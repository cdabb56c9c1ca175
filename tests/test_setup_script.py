"""scripts/setup.sh skips the install and the build when nothing changed, and only then.

Runs the script's --check / --record modes and its skip path in a copy of the files the stamp covers
(csrc/, setup.py, pyproject.toml, the script) with a virtual environment that links to this Python, so
nothing of the real checkout or venv is touched and nothing is installed or built.
"""
import os
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the build settings the stamp covers: start from none of them set
BUILD_ENV = ("RELAXEQ_SKIP_CUDA", "RELAXEQ_FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "CUDA_HOME")


@pytest.fixture
def repo(tmp_path):
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "csrc"), tmp_path / "csrc")
    (tmp_path / "scripts").mkdir()
    for script in ("setup.sh", "install_escnn.sh"):
        shutil.copy(os.path.join(ROOT, "scripts", script), tmp_path / "scripts" / script)
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    # a wrapper, not a symlink: a symlinked venv python finds no pyvenv.cfg and loses the venv's packages
    wrapper = tmp_path / "venv" / "bin" / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
    return tmp_path


def _setup(repo, *args, **env):
    full_env = {k: v for k, v in os.environ.items() if k not in BUILD_ENV}
    full_env.update(VENV=str(repo / "venv"), **env)
    return subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env=full_env, cwd=repo, timeout=120)


def test_up_to_date_only_while_nothing_changed(repo):
    first = _setup(repo, "--check")
    assert first.returncode == 1 and "no record of a finished set-up" in first.stdout
    assert _setup(repo, "--record").returncode == 0
    ok = _setup(repo, "--check")
    assert ok.returncode == 0 and "up to date" in ok.stdout, ok.stdout + ok.stderr

    src = repo / "csrc" / "cpu" / "relaxed_linear.cpp"
    original = src.read_bytes()
    src.write_bytes(original + b"\n// changed\n")
    changed = _setup(repo, "--check")
    assert changed.returncode == 1 and "sources or build settings changed" in changed.stdout
    src.write_bytes(original)
    assert _setup(repo, "--check").returncode == 0

    for key, value in (("RELAXEQ_SKIP_CUDA", "1"), ("TORCH_CUDA_ARCH_LIST", "9.0"), ("TORCH_SPEC", "torch==2.0")):
        other = _setup(repo, "--check", **{key: value})
        assert other.returncode == 1 and "changed" in other.stdout, key
    (repo / "setup.py").write_text((repo / "setup.py").read_text() + "\n# changed\n")
    assert _setup(repo, "--check").returncode == 1


def test_a_rerun_with_nothing_changed_skips_install_and_build(repo):
    assert _setup(repo, "--record").returncode == 0
    t0 = time.perf_counter()
    rerun = _setup(repo)
    seconds = time.perf_counter() - t0
    assert rerun.returncode == 0 and "skipping install and build" in rerun.stdout, rerun.stdout + rerun.stderr
    assert "installing" not in rerun.stdout and seconds < 20, seconds


def test_a_missing_venv_is_a_build(repo):
    shutil.rmtree(repo / "venv")
    out = _setup(repo, "--check")
    assert out.returncode == 1 and "no virtual environment" in out.stdout
