#!/usr/bin/env bash
# The GPU check in one go, on a machine with a CUDA GPU and torch + triton installed (no venv is made):
# build the extension for the visible GPU, run the CUDA and Triton tests natively (no interpreter), then the
# benchmarks on the GPU. Everything lands in $OUT (default gpu_out/): log.txt and results.tar.gz (JSON,
# markdown, PNG), the tarball refreshed after every stage so a stage cut short still leaves the earlier ones.
#   OUT=gpu_out  PYTHON=python3  BUILD_TIMEOUT=240  TILE_TIMEOUT=120  TEST_TIMEOUT=150  TRAIN_TIMEOUT=90
#   BENCH_SCALE=1 (0 = quick benchmarks)
#   PROFILE=1 (0 skips the torch.profiler stage)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d)"
mkdir -p "$OUT" "$WORK/results"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHINDUCTOR_COMPILE_THREADS="$(nproc)"
exec > >(tee -a "$OUT/log.txt") 2>&1

pack() { tar -czf "$OUT/results.tar.gz" -C "$WORK" . 2>/dev/null; }
stage() { echo; echo "=== $1 ($(date -u +%H:%M:%S), ${SECONDS}s)"; }

stage "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name(), 'cpus', __import__('os').cpu_count())"

stage "build (CUDA kernels for this GPU's arch)"
ARCH="$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
# editable install: the package maps triton_kernels/ to relaxeq_fast.triton_kernels (setup.py package_dir)
TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" RELAXEQ_FORCE_CUDA=1 timeout "${BUILD_TIMEOUT:-240}" \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$WORK/build.log" 2>&1
echo "build exit $? (log: build.log in results.tar.gz)"; tail -3 "$WORK/build.log"
"$PY" -c "import relaxeq_fast, json; print(json.dumps(relaxeq_fast.build_info()))" || { pack; exit 1; }
pack

stage "Triton GPU tile configurations (every _block_sizes config, several row programs) and the default TF32 conv path"
timeout "${TILE_TIMEOUT:-120}" "$PY" -m pytest tests/test_relaxed_linear_triton.py tests/test_relaxed_conv2d_triton.py \
  -q -p no:cacheprovider -k "gpu_tile_config or several_row_programs or tf32" -rfEs > "$WORK/tests_tiles.log" 2>&1
echo "pytest exit $?"; grep -E "FAILED|ERROR|SKIPPED" "$WORK/tests_tiles.log" | head -20; tail -1 "$WORK/tests_tiles.log"
pack

stage "tests on the GPU: CUDA kernels and Triton kernels (compiled, not interpreted)"
XDIST=""; "$PY" -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout "${TEST_TIMEOUT:-150}" "$PY" -m pytest tests -v -p no:cacheprovider $XDIST -k "cuda or triton" \
  --ignore tests/test_train.py --ignore tests/test_train_checkpoint.py --ignore tests/test_train_config.py \
  --ignore tests/test_train_distributed.py -rfE > "$WORK/tests_gpu.log" 2>&1
echo "pytest exit $?"
grep -E "FAILED|ERROR" "$WORK/tests_gpu.log" | head -40
tail -15 "$WORK/tests_gpu.log"
pack

stage "trainer on the GPU (issue 29): complement, learnt θ, fp16 autocast with the grad scaler, CUDA graphs"
TRAIN="--dataset shapes --model vn_pointnet --num-points 64 --k 8 --width 0.25 --n-train 96 --n-test 32 --epochs 2"
for run in "complement|--relax-space complement" "dual|--theta-schedule dual" "amp_fp16|--amp fp16" \
           "compiled|--compile"; do
  name="${run%%|*}"; flags="${run#*|}"
  timeout "${TRAIN_TIMEOUT:-90}" "$PY" -m relaxeq_fast.train $TRAIN $flags --device cuda --no-progress \
    --run-dir "$WORK/runs/$name" > "$WORK/train_$name.log" 2>&1
  echo "$name: exit $? $(tail -1 "$WORK/train_$name.log")"
done
pack

Q=""; [ "${BENCH_SCALE:-1}" = 0 ] && Q="--quick"
R="$WORK/results"
stage "relaxed_linear op alone: tiled kernel vs cuBLAS vs Triton"
timeout 60 "$PY" benchmarks/bench_relaxed_linear.py --device cuda --op-routes --out-dir "$R" | tail -14
pack
stage "train step at the paper's sizes on the GPU"
timeout 100 "$PY" benchmarks/bench_train_step.py --device cuda --full --forward --backward --out-dir "$R" $Q | tail -40
pack
stage "train step at P = 1024, width 1 (issue 29's GPU sizes: P = 300 above)"
timeout 100 "$PY" benchmarks/bench_train_step.py --device cuda --full --points 1024 --models VN-PointNet --no-memory \
  --out-dir "$R" $Q | tail -12
pack
stage "train step compiled (CUDA graphs) beside eager, VN-PointNet at the paper's size (issue 12's GPU targets)"
timeout 150 "$PY" benchmarks/bench_train_step.py --device cuda --full --models VN-PointNet --compile --no-memory \
  --out-dir "$R" $Q | tail -12
pack
stage "relaxed_linear op on the GPU"
timeout 90 "$PY" benchmarks/bench_relaxed_linear.py --device cuda --budget 0.5 --min-repeats 20 --warmup 3 \
  --sizes 7200x21,144000x21,7200x341 --providers fused,triton,reference,compiled,paper,plain,floor \
  --out-dir "$R" $Q | tail -45
pack
stage "relaxed_conv2d op on the GPU"
timeout 40 "$PY" benchmarks/bench_relaxed_conv2d.py --device cuda --budget 0.5 --out-dir "$R" $Q | tail -25
"$PY" -m relaxeq_fast.bench --summarize --device cuda --out-dir "$R" $Q > /dev/null
pack
stage "VN block on the GPU"
timeout 45 "$PY" benchmarks/bench_vn_layers.py --device cuda --budget 0.5 --providers fused,triton,reference,paper,plain \
  --out-dir "$R" $Q | tail -12
if [ "${PROFILE:-1}" = 1 ]; then
  stage "profile of one train step on the GPU (paper sizes)"
  timeout 60 "$PY" benchmarks/bench_train_step.py --device cuda --full --profile --models VN-PointNet,VN-DGCNN \
    > "$R/train_step_profile_cuda.txt" 2>&1
  grep "top-level" "$R/train_step_profile_cuda.txt"
  pack
fi
stage "summary"
"$PY" -m relaxeq_fast.bench --summarize --device cuda --out-dir "$R" $Q | tail -45
pack
stage "done"
