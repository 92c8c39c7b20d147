"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small tensors on one thread: faster than two, and far faster when the machine is
    shared with other jobs (idle OpenMP threads spin). Use with pytestmark = pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
