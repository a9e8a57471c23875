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
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["OpRecorder", "randomize_"]


class OpRecorder(TorchDispatchMode):
    """Records ``(op name, [output shapes])`` for every aten op dispatched inside the context."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[int, ...]]]] = []
        #: elements of the largest storage any op's output lives in: unlike output shapes, this
        #: sees a large buffer behind a small view and ignores a broadcast (expanded) one
        self.largest_storage = 0
        #: elements of the storage behind every output, in dispatch order (views repeat their base's)
        self.storage_sizes: list[int] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.calls.append((str(func), [tuple(t.shape) for t in tensors]))
        for t in tensors:
            if t.device.type != "meta":
                self.storage_sizes.append(t.untyped_storage().nbytes() // t.element_size())
                self.largest_storage = max(self.largest_storage, self.storage_sizes[-1])
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


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def randomize_(
    module: nn.Module,
    *,
    seed: int = 0,
    scale: float = 0.5,
    shift: bool = False,
    norm_statistics: bool = False,
) -> nn.Module:
    """Move every parameter of ``module`` off its initialisation, deterministically; in place.

    Initial values hide mistakes from a test against the paper's equations: a zero-initialised gate
    or last projection passes the input through, ``v_a = 0`` gives uniform weights, a LayerNorm at
    (1, 0) drops its affine map. Each parameter becomes ``scale * N(0, 1)`` (with ``shift``:
    gets it added, keeping the initialisation's scale); the weights of normalisation layers become
    ``1 + scale * N(0, 1)``, keeping their sign. With ``norm_statistics``, BatchNorm running means
    become ``0.2 * N(0, 1)`` and running variances ``U(0.5, 1.5)``, so eval-mode normalisation is
    not the identity either. Returns ``module``.
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(t: torch.Tensor) -> torch.Tensor:
        # drawn on the CPU (the same values on every device), then moved to the tensor's device
        return torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype)

    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, _NORMS) and m.weight is not None}
    with torch.no_grad():
        for p in module.parameters():
            if shift:
                p.add_(scale * noise(p))
            else:
                p.copy_((1.0 if id(p) in norm_weights else 0.0) + scale * noise(p))
        if norm_statistics:
            for name, buffer in module.named_buffers():
                if name.endswith("running_mean"):
                    buffer.copy_(0.2 * noise(buffer))
                elif name.endswith("running_var"):
                    uniform = torch.rand(buffer.shape, generator=generator, dtype=torch.float64)
                    buffer.copy_(0.5 + uniform.to(buffer.device, buffer.dtype))
    return module
