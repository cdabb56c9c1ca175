#!/usr/bin/env bash
# Packaging as a pip user meets it (issue 15), run by .ci/run after the set-up, in the set-up's venv:
#   - the sdist carries every source a build needs (csrc, CMakeLists.txt, triton_kernels);
#   - `pip wheel --no-build-isolation .` builds a wheel with the extension, the Triton kernels, the build record
#     and the console scripts;
#   - that wheel, installed into a fresh venv that sees only torch, numpy and tqdm (and what they require), runs
#     relaxeq-doctor healthy from outside the checkout, and relaxeq-train names the missing [train] extra;
#   - the installed extension refuses to load into another torch than it was built against, naming both;
#   - `pip install --no-build-isolation .` (not editable) installs and imports.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "--- sdist"
python setup.py -q sdist -d "$tmp/sdist" >/dev/null 2>"$tmp/sdist.log" || { cat "$tmp/sdist.log"; exit 1; }
sdist="$(ls "$tmp"/sdist/*.tar.gz)"
python - "$sdist" <<'PY'
import os, subprocess, sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
tracked = subprocess.run(["git", "ls-files", "csrc", "triton_kernels", "CMakeLists.txt"], capture_output=True,
                         text=True, check=True).stdout.split()
missing = [f for f in tracked if f not in names]
assert not missing, f"the sdist lacks {missing}"
assert "relaxeq_fast/_build.py" not in names, "the sdist carries a build record of the machine that made it"
print(f"sdist {os.path.basename(sys.argv[1])}: {len(names)} entries, every tracked csrc / triton / CMake file")
PY

echo "--- wheel"
pip wheel -q --no-build-isolation --no-deps -w "$tmp/wheel" . >"$tmp/wheel.log" 2>&1 || { tail -50 "$tmp/wheel.log"; exit 1; }
wheel="$(ls "$tmp"/wheel/*.whl)"
python - "$wheel" <<'PY'
import os, sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for want in ("relaxeq_fast/_build.py", "relaxeq_fast/doctor/self_check.py", "relaxeq_fast/triton_kernels/relaxed_linear.py",
             "relaxeq_fast/train/task.py", "relaxeq_fast/_ops/relaxed_linear.py", "relaxeq_fast/study/report.py"):
    assert want in names, f"the wheel lacks {want}"
assert any(n.startswith("relaxeq_fast/_C") and n.endswith(".so") for n in names), "the wheel lacks the extension"
entry = next(n for n in names if n.endswith("entry_points.txt"))
scripts = zipfile.ZipFile(sys.argv[1]).read(entry).decode()
for s in ("relaxeq-train", "relaxeq-study", "relaxeq-bench", "relaxeq-doctor"):
    assert s in scripts, f"no console script {s}"
print(f"wheel {os.path.basename(sys.argv[1])}: {len(names)} files, extension and console scripts present")
PY

echo "--- the wheel in a fresh venv that sees only torch and the wheel's install_requires (numpy, tqdm)"
# no package index here: the fresh venv gets torch, numpy and tqdm (and what they require) from the set-up venv,
# linked one distribution at a time, so a missing install_requires entry shows as an import error
python - "$tmp/only_torch" <<'PY'
import importlib.metadata as md, os, re, sys
from packaging.markers import Marker
out, seen, todo = sys.argv[1], {}, ["torch", "numpy", "tqdm"]
while todo:
    name = todo.pop()
    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        continue
    try:
        dist = seen[key] = md.distribution(name)
    except md.PackageNotFoundError:
        continue
    for req in dist.requires or []:
        spec, _, marker = req.partition(";")
        if marker and not Marker(marker).evaluate({"extra": ""}):
            continue
        todo.append(re.split(r"[ <>=!~\[(]", spec.strip())[0])
os.makedirs(out)
for dist in seen.values():
    for top in {str(f).split("/")[0] for f in dist.files or []}:
        src = os.path.join(str(dist.locate_file("")), top)
        if top not in ("..", "") and os.path.exists(src) and not os.path.exists(os.path.join(out, top)):
            os.symlink(src, os.path.join(out, top))
print("fresh venv sees", ", ".join(sorted(seen)))
PY
python -m venv "$tmp/venv"
site="$("$tmp/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$tmp/only_torch" > "$site/only_torch.pth"
"$tmp/venv/bin/python" -c "import importlib.util as u, sys; sys.exit(1 if u.find_spec('matplotlib') or u.find_spec('e3nn') else 0)" \
  || { echo "the fresh venv sees more than torch's closure"; exit 1; }
"$tmp/venv/bin/python" -m pip install -q --no-deps --no-index "$wheel"
cd "$tmp"  # away from the checkout: the installed package, not the source tree, is imported
"$tmp/venv/bin/python" -c "import relaxeq_fast, sys; assert relaxeq_fast.__file__.startswith('$site'), relaxeq_fast.__file__"
"$tmp/venv/bin/relaxeq-doctor"
"$tmp/venv/bin/relaxeq-train" --help >/dev/null
# without the [train] extra a run stops at once with one line naming it
if "$tmp/venv/bin/relaxeq-train" --epochs 1 --no-progress --run-dir "$tmp/run" 2> "$tmp/train.err"; then
  echo "relaxeq-train ran without matplotlib"; exit 1
fi
[ "$(wc -l < "$tmp/train.err")" -eq 1 ] && grep -q "pip install 'relaxeq_fast\[train\]'" "$tmp/train.err" \
  || { echo "relaxeq-train without matplotlib did not name the [train] extra in one line:"; cat "$tmp/train.err"; exit 1; }
cat "$tmp/train.err"

echo "--- built for another torch: refused, both versions named"
echo "TORCH_VERSION = '0.0.0+other'" > "$site/relaxeq_fast/_build.py"
"$tmp/venv/bin/python" - <<'PY'
import torch, relaxeq_fast
from relaxeq_fast import _ops
assert not relaxeq_fast.build_info()["extension_loaded"]
msg = str(_ops.EXTENSION_ERROR)
assert "torch 0.0.0+other" in msg and f"this is torch {torch.__version__}" in msg, msg
print("refused:", msg)
PY
if "$tmp/venv/bin/relaxeq-doctor" > "$tmp/doctor.log" 2>&1; then
  echo "relaxeq-doctor called a mismatched build healthy"; exit 1
fi
tail -1 "$tmp/doctor.log"
cd - >/dev/null

echo "--- pip install --no-build-isolation . (not editable)"
pip install -q --no-build-isolation --no-deps --target "$tmp/target" . >"$tmp/install.log" 2>&1 || { tail -50 "$tmp/install.log"; exit 1; }
(cd "$tmp" && PYTHONPATH="$tmp/target" python -c "
import relaxeq_fast
assert relaxeq_fast.__file__.startswith('$tmp/target'), relaxeq_fast.__file__
assert relaxeq_fast.build_info()['extension_loaded']
print('installed from the source tree into', '$tmp/target', ': extension loaded')")
echo "--- packaging checks passed"
