"""The counterfactual tests run tiny networks, where a second thread only adds
synchronisation (and, on shared cores, waiting for the other): one thread each."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
