"""Whether code runs eagerly, where paths that graphs cannot express may be taken.

Several kernels have an eager-only path (a hand-written backward, a buffer overwritten in place,
a Python loop whose bounds come from shapes): traced, compiled and exported graphs must see the
plain operators instead. This is the one test for it.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.autograd import forward_ad


def _not_exporting() -> bool:
    return False


# torch.compiler.is_exporting is newer than the oldest torch we support
_is_exporting = getattr(torch.compiler, "is_exporting", _not_exporting)
# whether a torch.func transform (vmap, grad, jvp, jacrev, ...) is running; private, so looked up
# with a fallback: where it is missing, transforms meet the eager paths (which may not compose)
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", _not_exporting)


def forward_ad_active() -> bool:
    """Whether a forward-mode AD level is open: inside ``torch.autograd.forward_ad.dual_level()``,
    ``torch.func.jvp``, ``jacfwd`` or ``hessian`` (whose outermost level opens one).

    The fused attention kernels, ``grid_sample`` and hand-written autograd Functions without a
    ``jvp`` have no forward derivative (torch raises "Trying to use forward AD with ... that does
    not support it"); where a level is open the plain operators run instead, which all have one.
    """
    return forward_ad._current_level >= 0


def _grad_transform_count() -> int:
    """How many reverse-mode torch.func transforms (grad, vjp, jacrev) are running, nested."""
    # private, so looked up with a fallback: where it is missing, none is counted
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:
        return 0
    return sum(1 for level in retrieve_all_functorch_interpreters() if level.key() == TransformType.Grad)


def differentiates_twice() -> bool:
    """Whether the forward runs under a second derivative that no kernel sees coming: a
    forward-mode AD level (``jvp``, ``jacfwd``, ``hessian``'s outer level) or two nested
    reverse-mode torch.func transforms (``grad(grad(f))``, ``jacrev(jacrev(f))``, MAML's inner
    step inside its outer one). The fused attention kernels have neither a forward derivative
    nor a double backward; these calls take the plain operators, which have both. (Plain
    autograd's ``create_graph=True`` is seen in the backward itself, where the kernels' own
    Function handles it.)"""
    if torch.compiler.is_compiling() or _is_exporting():
        return False  # a graph records what it traces (and the tests below would break it)
    if forward_ad._current_level >= 0:
        return True
    return bool(_functorch_active()) and _grad_transform_count() >= 2


def is_eager(*tensors: object) -> bool:
    """False under ``torch.compile``, ``torch.export``, ``torch.jit.trace``, fx symbolic tracing
    (any of ``tensors`` an ``fx.Proxy``), torch.func's transforms and forward-mode AD (a dual
    level open: the hand-written backwards have no forward derivative); True in plain eager
    execution.

    The eager paths write into preallocated buffers (``out=``, in place) and run hand-written
    backwards; vmap has no rule for an ``out=`` product into a slice (criss_cross's half-precision
    weights), so under a transform the plain operators run, as they do in graphs.

    Called on every forward of the small-call paths, so written as plain tests (~1 us)."""
    if torch.compiler.is_compiling() or _is_exporting() or torch.jit.is_tracing() or _functorch_active():
        return False
    if forward_ad._current_level >= 0:  # forward_ad_active(), inline: one call less per forward
        return False
    for t in tensors:
        if isinstance(t, fx.Proxy):
            return False
    return True
