"""Whether code runs eagerly, where paths that graphs cannot express may be taken.

Several kernels have an eager-only path (a hand-written backward, a buffer overwritten in place,
a Python loop whose bounds come from shapes): traced, compiled and exported graphs must see the
plain operators instead. This is the one test for it.
"""

from __future__ import annotations

import torch
from torch import fx


def _not_exporting() -> bool:
    return False


# torch.compiler.is_exporting is newer than the oldest torch we support
_is_exporting = getattr(torch.compiler, "is_exporting", _not_exporting)
# whether a torch.func transform (vmap, grad, jvp, jacrev, ...) is running; private, so looked up
# with a fallback: where it is missing, transforms meet the eager paths (which may not compose)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", _not_exporting)


def is_eager(*tensors: object) -> bool:
    """False under ``torch.compile``, ``torch.export``, ``torch.jit.trace``, fx symbolic tracing
    (any of ``tensors`` an ``fx.Proxy``) and torch.func's transforms; True in plain eager
    execution.

    The eager paths write into preallocated buffers (``out=``, in place) and run hand-written
    backwards; vmap has no rule for an ``out=`` product into a slice (criss_cross's half-precision
    weights), so under a transform the plain operators run, as they do in graphs.

    Called on every forward of the small-call paths, so written as plain tests (~1 us)."""
    if torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing() or _functorch_active():
        return False
    for t in tensors:
        if isinstance(t, fx.Proxy):
            return False
    return True
