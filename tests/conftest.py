"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test (restored after it: the setting is global and
    would otherwise leak into every test that runs later in the same process)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
