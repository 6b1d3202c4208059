"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture
def one_torch_thread(monkeypatch):
    """One torch thread here and in the scripts a test starts (OMP_NUM_THREADS is inherited): the networks and
    batches in the tests are tiny, and on the test machine's few shared cores more threads contend and run several
    times slower. A test file opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
