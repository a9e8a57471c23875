"""The registry: one `ModuleSpec` per mechanism, the spine that tests, CLI, docs and benchmarks read.

A mechanism registers itself with ``@register(...)`` on its class. The spec records what every
generic consumer needs: the paper, how to build the module for a given size, how to make example
inputs for that size, and capability flags. The conformance suite (``tests/conformance``) runs every
registered spec through the same properties, so a new mechanism gets them by registering.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "ModuleSpec",
    "Paper",
    "Sizes",
    "create",
    "example_image",
    "example_sequence",
    "get_spec",
    "image_input",
    "list_modules",
    "register",
    "sequence_input",
]

#: The families a spec may belong to (the catalog's sections).
FAMILIES = ("sequence", "gating", "non_local", "conv_attention", "graph")


@dataclass(frozen=True)
class Paper:
    """Where a mechanism comes from."""

    title: str
    arxiv: str | None = None
    venue: str | None = None

    @property
    def url(self) -> str | None:
        return f"https://arxiv.org/abs/{self.arxiv}" if self.arxiv else None

    def cite(self) -> str:
        """A one-line reference: ``title (arXiv:id)`` or ``title (venue)``."""
        where = f"arXiv:{self.arxiv}" if self.arxiv else (self.venue or "")
        return f"{self.title} ({where})" if where else self.title


@dataclass(frozen=True)
class Sizes:
    """The sizes an example is built at.

    ``width`` is the channel count (images) or embedding width (sequences, graph nodes);
    ``extent`` is the sequence length or the spatial side (H = W = extent) or the node count.
    """

    batch: int = 2
    width: int = 32
    extent: int = 8
    dtype: torch.dtype = torch.float32
    device: str | torch.device = "cpu"


@dataclass(frozen=True)
class ModuleSpec:
    """Everything generic code needs to know about one registered mechanism.

    Attributes:
        name: registry name (the catalog's contract).
        cls: the ``nn.Module`` class.
        family: one of :data:`FAMILIES`.
        paper: the source paper.
        equation: the defining computation in one or two lines of plain text.
        make_kwargs: ``Sizes -> constructor kwargs`` (the paper defaults at that width).
        make_inputs: ``Sizes -> tuple of positional input tensors``.
        default_sizes: the sizes used when none are given.
        returns_attn: ``forward(..., return_attn=True)`` returns ``(out, attn)``.
        supports_mask: ``forward`` accepts boolean masks (True = may attend).
        shape_preserving: the output has the shape of the first input.
        channel_dim: the dimension of the first input that holds the width (1 for images,
            -1 for sequences), used by the generic bad-input tests.
        batch_dim: the batch dimension of every input (0), or None when the inputs have none
            (a graph's node features): then no empty-batch or dynamic-batch checks apply.
        cost: asymptotic time and memory, for ``attnzoo info`` and the docs.
        exportable: ``torch.export`` / ONNX are expected to work (False needs a reason in
            ``notes``).
        notes: deviations and official-code options worth knowing.
    """

    name: str
    cls: type[nn.Module]
    family: str
    paper: Paper
    equation: str
    make_kwargs: Callable[[Sizes], dict[str, Any]]
    make_inputs: Callable[[Sizes], tuple[torch.Tensor, ...]]
    default_sizes: Sizes = field(default_factory=Sizes)
    returns_attn: bool = True
    supports_mask: bool = False
    shape_preserving: bool = True
    channel_dim: int = 1
    batch_dim: int | None = 0
    cost: str = ""
    exportable: bool = True
    notes: str = ""

    @property
    def num_inputs(self) -> int:
        """How many positional tensors ``forward`` takes (from the example factory)."""
        return len(self.make_inputs(replace(self.default_sizes, batch=1)))

    @property
    def defaults(self) -> dict[str, Any]:
        """Constructor kwargs at the default sizes."""
        return self.make_kwargs(self.default_sizes)

    def sizes(self, **overrides: Any) -> Sizes:
        """The default sizes with some fields replaced."""
        return replace(self.default_sizes, **overrides)

    def build(self, sizes: Sizes | None = None, **kwargs: Any) -> nn.Module:
        """Construct the module for ``sizes`` (default sizes if None); ``kwargs`` override."""
        sizes = sizes or self.default_sizes
        merged = {**self.make_kwargs(sizes), **kwargs}
        return self.cls(**merged, device=sizes.device, dtype=sizes.dtype)

    def example_inputs(self, sizes: Sizes | None = None) -> tuple[torch.Tensor, ...]:
        """Example positional inputs for ``sizes`` (default sizes if None)."""
        return self.make_inputs(sizes or self.default_sizes)


_REGISTRY: dict[str, ModuleSpec] = {}


def register(
    name: str,
    *,
    family: str,
    paper: Paper,
    equation: str,
    make_kwargs: Callable[[Sizes], dict[str, Any]],
    make_inputs: Callable[[Sizes], tuple[torch.Tensor, ...]],
    **flags: Any,
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator that registers a mechanism under ``name``.

    Raises:
        ValueError: if ``name`` is already registered or ``family`` is unknown.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r} for {name!r}")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _REGISTRY:
            other = _REGISTRY[name].cls
            raise ValueError(
                f"duplicate registry name {name!r}: already registered by "
                f"{other.__module__}.{other.__qualname__}, now by {cls.__module__}.{cls.__qualname__}"
            )
        _REGISTRY[name] = ModuleSpec(
            name=name,
            cls=cls,
            family=family,
            paper=paper,
            equation=equation,
            make_kwargs=make_kwargs,
            make_inputs=make_inputs,
            **flags,
        )
        cls.registry_name = name  # type: ignore[attr-defined]
        return cls

    return decorator


def _unknown(name: str) -> KeyError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return KeyError(f"unknown attention module {name!r}{hint} (attnzoo.list_modules() lists all)")


def get_spec(name: str) -> ModuleSpec:
    """The spec registered under ``name``.

    Raises:
        KeyError: for an unknown name, with the closest registered names suggested.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise _unknown(name) from None


def list_modules(pattern: str = "*", family: str | None = None) -> list[str]:
    """Registered names matching a shell-style ``pattern`` (and ``family``), sorted."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return sorted(
        name
        for name, spec in _REGISTRY.items()
        if fnmatch.fnmatchcase(name, pattern) and (family is None or spec.family == family)
    )


def create(name: str, *args: Any, **kwargs: Any) -> nn.Module:
    """Build the mechanism registered under ``name`` with the given constructor arguments.

    Example:
        >>> import attnzoo
        >>> se = attnzoo.create("se", 64)
    """
    return get_spec(name).cls(*args, **kwargs)


def specs() -> Mapping[str, ModuleSpec]:
    """A read-only view of every spec, by name."""
    return dict(_REGISTRY)


def _randn(shape: tuple[int, ...], sizes: Sizes, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(sizes.device, sizes.dtype)


def example_sequence(
    sizes: Sizes, *, length: int | None = None, width: int | None = None, seed: int = 0
) -> torch.Tensor:
    """A deterministic (B, N, D) example; N and D default to ``sizes.extent`` and ``sizes.width``."""
    shape = (sizes.batch, length or sizes.extent, width or sizes.width)
    return _randn(shape, sizes, seed)


def example_image(
    sizes: Sizes, *, channels: int | None = None, side: int | None = None, seed: int = 0
) -> torch.Tensor:
    """A deterministic (B, C, H, W) example with H = W = ``side`` (default ``sizes.extent``)."""
    side = side or sizes.extent
    return _randn((sizes.batch, channels or sizes.width, side, side), sizes, seed)


def image_input(sizes: Sizes) -> tuple[torch.Tensor, ...]:
    """``make_inputs`` for modules that take one (B, C, H, W) map."""
    return (example_image(sizes),)


def sequence_input(sizes: Sizes) -> tuple[torch.Tensor, ...]:
    """``make_inputs`` for modules that take one (B, N, D) sequence."""
    return (example_sequence(sizes),)
