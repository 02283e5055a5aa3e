"""Fixtures for every evaluation test."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest single-threaded; two OpenMP threads on a busy 2-core box
    spin-wait and turn a 50 ms forward into seconds. The previous setting is restored."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
