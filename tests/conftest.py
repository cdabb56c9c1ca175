import os

import pytest
import torch

# read before any test can change it
MACHINE_THREADS = torch.get_num_threads()

# Triton kernels run through the interpreter on machines without a GPU. triton.jit reads this at
# decoration time, so it must be set before any test imports relaxeq_fast.triton_kernels.
if "TRITON_INTERPRET" not in os.environ:
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

# se3-transformer-pytorch keeps its kernel bases in ~/.cache.equivariant_attention, shared by every process that
# ever ran it; each basis is an SVD null vector whose sign depends on the process that computed it, so a model's
# function would depend on that directory's history. Tests compute the bases in their own process (read at import).
os.environ.setdefault("CLEAR_CACHE", "1")


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """Every test starts at the machine's thread count, whatever an earlier test (or a module-scoped
    fixture: relaxeq-train sets its --threads) set: the native kernels take different paths with 1 and
    with several threads, and both must run in a full run."""
    torch.set_num_threads(MACHINE_THREADS)
    yield
    torch.set_num_threads(MACHINE_THREADS)


@pytest.fixture
def single_thread():
    """One intra-op thread for this test (or module, via pytestmark): small float64 ops that spend more
    time forking than computing. Restored afterwards by _restore_thread_count."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def smoke_cache(tmp_path_factory):
    """A cache directory holding the "tiny" smoke-plume set (simulated once per session, ~15 s with PhiFlow);
    skips the test when PhiFlow is not installed."""
    pytest.importorskip("phi", reason="the smoke plumes are simulated with PhiFlow: pip install 'relaxeq_fast[flow]'")
    from relaxeq_fast.data.smoke import load_smoke
    cache = str(tmp_path_factory.mktemp("smoke_cache"))
    load_smoke("tiny", cache_dir=cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """testing.TINY + FULL run once per session (test_train.py and test_train_checkpoint.py read it; the resume
    test compares an interrupted run against it): its run directory and summary."""
    from testing import FULL, TINY, train_run as _run
    run_dir = str(tmp_path_factory.mktemp("full") / "run")
    summary = _run(TINY + FULL + ["--run-dir", run_dir])
    return run_dir, summary
