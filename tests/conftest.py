"""Fixtures shared by the test files."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """One torch thread in every test and in the scripts a test starts (OMP_NUM_THREADS is inherited): the networks
    and batches in the tests are tiny, and on a machine's few shared cores more threads contend and run several times
    slower (CI runs two tests at once on two cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
