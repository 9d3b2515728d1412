import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """The weather tests run many tiny ops, where a second OpenMP thread only adds synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
