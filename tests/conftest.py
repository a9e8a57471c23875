"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist every worker is a process: with torch's default of one thread per core
    # each, N workers on N cores oversubscribe the CPU and small ops slow down many times over.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test (restored after it: the setting is global and
    would otherwise leak into every test that runs later in the same process)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
