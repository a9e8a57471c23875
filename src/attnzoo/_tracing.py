"""Whether code runs eagerly, where paths that graphs cannot express may be taken.

Several kernels have an eager-only path (a hand-written backward, a buffer overwritten in place,
a Python loop whose bounds come from shapes): traced, compiled and exported graphs must see the
plain operators instead. This is the one test for it.
"""

from __future__ import annotations

import torch
from torch import fx


def is_eager(*tensors: object) -> bool:
    """False under ``torch.compile``, ``torch.export``, ``torch.jit.trace`` and fx symbolic
    tracing (any of ``tensors`` an ``fx.Proxy``); True in plain eager execution."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)()
    if torch.compiler.is_compiling() or exporting or torch.jit.is_tracing():
        return False
    return not any(isinstance(t, fx.Proxy) for t in tensors)
