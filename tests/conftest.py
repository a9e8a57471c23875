"""Shared fixtures."""

from __future__ import annotations

import os

import pytest
import torch

# cuBLAS is bitwise repeatable only with a fixed workspace; torch.use_deterministic_algorithms
# (the determinism properties) raises without it. Read when CUDA starts, so set before any test.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_configure(config: pytest.Config) -> None:
    # Under pytest-xdist every worker is a process: with torch's default of one thread per core
    # each, N workers on N cores oversubscribe the CPU and small ops slow down many times over.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
    # float32 is float32 on CUDA too: cuDNN's convolutions use TF32 by default (10-bit mantissa),
    # which moved results by 1e-3 and failed every float32-against-float64 comparison there
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def float64_default():
    """float64 as the default dtype for one test (restored after it: the setting is global and
    would otherwise leak into every test that runs later in the same process)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
