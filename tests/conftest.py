"""Test-session settings: the ``cuda`` marker, skipped where no CUDA GPU is present."""

import os

import pytest
import torch

# cuBLAS reads its workspace setting when it first starts, and deterministic CUDA runs
# (tests/test_cuda.py) need it fixed; no test that runs earlier in the session may start cuBLAS
# without it. It changes nothing on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """Small float64 tensors: intra-op threads only add barrier waits on shared cores. A test file
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
