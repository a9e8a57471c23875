"""Helpers for testing attention code: which kernels ran, which tensors were formed.

``OpRecorder`` is a ``TorchDispatchMode`` that records every aten op dispatched inside it with the
shapes of its outputs, so a test (yours or ours) can show that the fused attention kernel ran and
that no N x N tensor was formed::

    with OpRecorder() as rec:
        module(x)
    assert rec.ran("_scaled_dot_product_flash_attention_for_cpu")
    assert not rec.formed(lambda numel: numel >= n * n)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpRecorder"]


class OpRecorder(TorchDispatchMode):
    """Records ``(op name, [output shapes])`` for every aten op dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        self.calls.append((str(func), [tuple(t.shape) for t in outs if isinstance(t, torch.Tensor)]))
        return out

    def names(self) -> list[str]:
        """The op names, in dispatch order (``aten.bmm.default`` ...)."""
        return [name for name, _ in self.calls]

    @property
    def sizes(self) -> list[tuple[str, list[int]]]:
        """``(op name, [numel of each output])`` for every call."""
        return [(name, [torch.Size(s).numel() for s in shapes]) for name, shapes in self.calls]

    def ran(self, op: str) -> bool:
        """Whether an op whose name contains ``op`` was dispatched."""
        return any(op in name for name in self.names())

    def formed(self, predicate: Callable[[int], bool]) -> list[tuple[str, list[int]]]:
        """The calls with an output whose numel satisfies ``predicate`` (e.g. ``>= N * N``)."""
        return [(name, sizes) for name, sizes in self.sizes if any(predicate(n) for n in sizes)]
