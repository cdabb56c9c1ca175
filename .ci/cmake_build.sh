#!/usr/bin/env bash
# Build the CPU configuration of relaxeq_fast with CMake against the active venv's
# libtorch (into build-cmake/), then load the library and check relaxed_linear.
# Needs only the venv active; CUDA_HOME may point at the CUDA toolkit (else it is
# found from nvcc on PATH, wrapper scripts followed, or /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python)
BUILD=${BUILD_DIR:-build-cmake}
start=$SECONDS

torch_prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
args=(-S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DRELAXEQ_WITH_CUDA=OFF
      -DCMAKE_PREFIX_PATH="$torch_prefix" -DPython_EXECUTABLE="$PY")
if command -v ninja >/dev/null 2>&1 && [ ! -f "$BUILD/Makefile" ]; then args+=(-G Ninja); fi

# A CUDA torch's TorchConfig looks for the CUDA toolkit even when we build no CUDA code.
cuda_root=${CUDA_HOME:-${CUDA_PATH:-}}
if [ -z "$cuda_root" ] && nvcc_bin=$(command -v nvcc); then
  real=""
  if [ "$(head -c2 "$nvcc_bin")" = '#!' ]; then  # a wrapper script: the nvcc it runs
    real=$(grep -o '/[^ "]*/bin/nvcc' "$nvcc_bin" | head -n1 || true)
  fi
  cuda_root=$(dirname "$(dirname "$(readlink -f "${real:-$nvcc_bin}")")")
fi
[ -z "$cuda_root" ] && [ -x /usr/local/cuda/bin/nvcc ] && cuda_root=/usr/local/cuda
if [ -n "$cuda_root" ]; then
  args+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_root" -DCUDAToolkit_ROOT="$cuda_root")
  # libnvrtc comes with torch's nvidia-* wheels, not necessarily with the toolkit.
  nvrtc=$("$PY" - <<'PYEOF'
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
hits = []
for root in (spec.submodule_search_locations if spec else []):
    hits += sorted(glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*")))
hits = [h for h in hits if "builtins" not in h and ".alt." not in h]
print(hits[0] if hits else "")
PYEOF
)
  [ -n "$nvrtc" ] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
fi

echo "+ cmake ${args[*]}"
cmake "${args[@]}"
cmake --build "$BUILD" -j "${JOBS:-2}"

lib=$(ls "$BUILD"/librelaxeq_fast_C.so)
# A fresh interpreter that imports torch only: importing relaxeq_fast would load the other
# build of the same ops.
"$PY" - "$lib" <<'PYEOF'
import sys, torch
torch.ops.load_library(sys.argv[1])
x, M, c = (torch.randn(*s, dtype=torch.float64) for s in ((37, 19), (11, 19), (11,)))
y, G, s = torch.ops.relaxeq.relaxed_linear(x, M, c, True)
err = max((y - (x @ M.T + c)).abs().max().item(), (G - x.T @ x).abs().max().item(), (s - x.sum(0)).abs().max().item())
print(f"relaxed_linear from {sys.argv[1]}: max abs error {err:.2e}")
sys.exit(0 if err < 1e-10 else 1)
PYEOF
echo "cmake build + check OK in $((SECONDS - start)) s"
