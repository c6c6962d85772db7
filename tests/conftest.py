"""Test-session settings: the ``cuda`` marker, skipped where no CUDA GPU is present, and the
``slow`` marker: ``pytest`` runs the quick suite, ``pytest --runslow`` every test."""

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

# cuBLAS reads its workspace setting when it first starts, and deterministic CUDA runs
# (tests/test_cuda.py) need it fixed; no test that runs earlier in the session may start cuBLAS
# without it. It changes nothing on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Under pytest-xdist the workers share the cores: one torch thread each, and in the processes
# they start, or intra-op barriers wait on descheduled threads (up to 20× slower on 2 busy cores).
# And a worker starts with SIGINT ignored (execnet's doing), which every process it starts would
# inherit: the tests of Ctrl-C need it as a terminal gives it.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.default_int_handler)

# The plain-PyTorch twin of the ResNets (benchmarks/native.py) serves the benchmarks and the tests
# from outside the library: the tests import it as ``benchmarks.native``.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False,
                     help="run the slow tests too (training to convergence, several processes, kills and "
                          "resumes, torch.compile, real data): the whole suite, as .ci/run does")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores; "
                                       "run only with --runslow")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_WorkersSay(), "neurosim-workers-say")


class _WorkersSay:
    """Under pytest-xdist the workers collect: each hands the count of slow tests it left out to
    the controller, which says it once."""

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node, error):
        left_out = getattr(node, "workeroutput", {}).get("slow_left_out", 0)
        if left_out:
            node.config.stash[_SLOW_LEFT_OUT] = left_out


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--runslow"):
        slow = [item for item in items if "slow" in item.keywords]
        if slow:
            config.hook.pytest_deselected(items=slow)
            items[:] = [item for item in items if "slow" not in item.keywords]
            config.stash[_SLOW_LEFT_OUT] = len(slow)
            if hasattr(config, "workeroutput"):  # an xdist worker: for the controller's summary
                config.workeroutput["slow_left_out"] = len(slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


_SLOW_LEFT_OUT = pytest.StashKey[int]()


def pytest_terminal_summary(terminalreporter, config):
    left_out = config.stash.get(_SLOW_LEFT_OUT, 0)
    if left_out:
        terminalreporter.write_line(f"{left_out} slow tests not run (deselected); pytest --runslow runs every test")


@pytest.fixture
def one_thread():
    """Small float64 tensors: intra-op threads only add barrier waits on shared cores. A test file
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
