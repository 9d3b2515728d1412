import gzip
import struct

import numpy as np
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


@pytest.fixture
def write_idx():
    """Writes a gzipped IDX file as in the Fashion-MNIST distribution: ``write_idx(path, uint8 array, labels=False)``."""

    def write(path, array, labels=False):
        with gzip.open(path, "wb") as f:
            if labels:
                f.write(struct.pack(">II", 2049, len(array)) + array.astype(np.uint8).tobytes())
            else:
                f.write(struct.pack(">IIII", 2051, len(array), 28, 28) + array.astype(np.uint8).tobytes())

    return write
