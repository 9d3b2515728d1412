import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread_and_private_cache(tmp_path_factory, monkeypatch):
    """Tiny models run faster on one thread; generated data go to a private ZOO_CACHE."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path_factory.getbasetemp() / "zoo_cache"))
    yield
    torch.set_num_threads(threads)
