#!/usr/bin/env bash
# Install escnn 1.0.11 into the active venv (needs torch + numpy 2 already there).
# Idempotent. Usage: source <venv>/bin/activate && bash scripts/install_escnn.sh
# ESCNN_FULL=1 also installs pymanopt and autograd, which escnn needs only for ConcatenatedNonLinearity and the
# generic decomposition of finite-group representations (not for R2Conv, batch norms, pointwise nonlinearities).
set -euo pipefail

PY="${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}"; PY="${PY:-python}"
step() { echo "[install_escnn] $*"; }
die()  { echo "[install_escnn] FAILED: $*" >&2; exit 1; }
pipi() {  # pip install; hide expected resolver noise (escnn wants py3nj, lie_learn wants numpy<2)
  local out rc=0; out=$("$PY" -m pip install -q --disable-pip-version-check "$@" 2>&1) || rc=$?
  printf '%s\n' "$out" | grep -v -e "dependency resolver does not" -e "which is not installed" \
    -e "but you have" -e "^WARNING: Location" -e '^$' || true
  return $rc; }

step "1/6 check python/torch/numpy"
"$PY" -c "import torch, numpy, scipy, sys; assert int(numpy.__version__.split('.')[0]) >= 2; \
print('  python', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'scipy', scipy.__version__)" \
  || die "need torch, numpy>=2 and scipy importable by $PY"

# escnn's declared deps include py3nj (needs Fortran; escnn falls back to numerics) -> --no-deps.
step "2/6 escnn==1.0.11 (--no-deps)"
pipi --no-deps escnn==1.0.11 || die "pip install escnn"

# Real runtime imports: joblib (kernel-basis cache), requests (imported at load time by
# lie_learn's pinchon_hoggan download helper; never used offline).
step "3/6 joblib, requests${ESCNN_FULL:+, pymanopt, autograd}"
EXTRA=""; [ -n "${ESCNN_FULL:-}" ] && EXTRA="pymanopt autograd"
pipi joblib requests $EXTRA || die "pip install joblib requests $EXTRA"

# lie_learn 0.0.2 exists only as a wheel built for numpy 1; it pins numpy<2 -> --no-deps.
step "4/6 lie_learn==0.0.2 wheel (--no-deps)"
pipi --no-deps --only-binary=lie_learn lie_learn==0.0.2 || die "pip install lie_learn wheel"

# escnn imports lie_learn...wigner_d -> compiled irrep_bases, whose numpy-1 .so fails under
# numpy 2. The wheel ships irrep_bases.pyx: re-cythonize it against the installed numpy.
if "$PY" -c "import lie_learn.representations.SO3.irrep_bases" 2>/dev/null; then
  step "5/6 lie_learn irrep_bases already works with this numpy (skip rebuild)"
else
  step "5/6 rebuild lie_learn irrep_bases.pyx with Cython against numpy $("$PY" -c 'import numpy;print(numpy.__version__)')"
  pipi cython setuptools || die "pip install cython setuptools"
  command -v "${CC:-gcc}" >/dev/null || command -v cc >/dev/null || die "no C compiler (gcc/cc) on PATH"
  TMPB="$(mktemp -d)"; trap 'rm -rf "$TMPB"' EXIT
  cat > "$TMPB/setup.py" <<'EOF'
import os, importlib.util, numpy
from setuptools import setup, Extension
from Cython.Build import cythonize
pkg = importlib.util.find_spec("lie_learn").submodule_search_locations[0]
mod = "lie_learn.representations.SO3.irrep_bases"
ext = Extension(mod, [os.path.join(pkg, "representations", "SO3", "irrep_bases.pyx")],
                include_dirs=[numpy.get_include()])
setup(name="lie_learn_rebuild", script_args=["build_ext", "--build-lib", os.path.dirname(pkg),
      "--build-temp", os.environ["TMPB"]],
      ext_modules=cythonize([ext], compiler_directives={"language_level": 2}, quiet=True))  # py2-era source
EOF
  (cd "$TMPB" && TMPB="$TMPB" "$PY" setup.py > "$TMPB/build.log" 2>&1) \
    || { tail -30 "$TMPB/build.log" >&2; die "Cython rebuild of irrep_bases"; }
  "$PY" -c "import lie_learn.representations.SO3.irrep_bases" || die "rebuilt irrep_bases does not import"
fi

step "6/6 smoke test: C_8 R2Conv forward"
"$PY" -W ignore::UserWarning - <<'EOF' || die "escnn smoke test"
import torch, escnn
from escnn import gspaces, nn
gs = gspaces.rot2dOnR2(8)
fi, fo = nn.FieldType(gs, [gs.regular_repr]), nn.FieldType(gs, [gs.regular_repr] * 2)
conv = nn.R2Conv(fi, fo, kernel_size=5)
y = conv(fi(torch.randn(1, fi.size, 9, 9)))
assert tuple(y.shape) == (1, 16, 5, 5), y.shape
from importlib.metadata import version
print("  escnn", version("escnn"), "lie_learn", version("lie_learn"), "OK: R2Conv C8 ->", tuple(y.shape))
EOF
step "done"
