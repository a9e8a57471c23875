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
    "MAP_KINDS",
    "PLACEMENTS",
    "ModuleSpec",
    "Paper",
    "Sample",
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

#: Where an image mechanism goes in a ResNet (read by ``models.resnet``, ``attach``, ``compare``):
#: ``"residual"`` on the residual branch before the addition (SE, CBAM, ...), ``"stage"`` between
#: stages (BAM, standalone blocks with their own residual connection: non-local, DANet, ...),
#: ``"conv"`` replacing the 3x3 convolution (SK, split attention, SASA, ...), ``"head"`` on the
#: last stage of a segmentation network (PSA, APCNet, ...); None for non-image mechanisms.
PLACEMENTS = ("residual", "stage", "conv", "head")

#: What ``forward(..., return_attn=True)`` returns as maps (read by ``show``, ``compare``, ``viz``):
#: ``pairwise`` (B, [h,] N_q, N_k) over positions, ``spatial`` (B, [k,] H, W) gates or pooling
#: weights, ``channel`` (B, C, 1, 1) gates, ``criss_cross`` (B, H, W, H + W - 1), ``local``
#: (B, [h,] H, W, k*k) window weights, ``alignment`` (B, N_out, N_in) seq2seq weights,
#: ``edges`` (E,) or (E, h) per-edge weights, ``mixed`` a dict of several kinds; None: no maps.
MAP_KINDS = ("pairwise", "spatial", "channel", "criss_cross", "local", "alignment", "edges", "mixed")


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
class Sample:
    """One configuration of a mechanism in the test database (the model: torch's ModuleInput).

    Every registered spec has a ``"default"`` sample (its ``make_kwargs`` and ``make_inputs``);
    ``samples=`` adds one per variant, input form and mask kind. The conformance suite runs every
    sample through every property.

    Attributes:
        name: short id, unique within the spec (``"key_mask"``, ``"causal"``, ``"variant=official"``).
        kwargs: constructor kwargs merged over ``make_kwargs(sizes)`` (a value may also be a
            callable ``Sizes -> value`` for size-dependent options).
        inputs: ``Sizes -> positional inputs``; None uses the spec's ``make_inputs``.
        forward_kwargs: ``(Sizes, inputs) -> forward kwargs`` (masks built for those inputs), or
            None. A bool mask must keep at least one key per query unless the sample is about
            fully masked rows.
        reference: ``(module, inputs, forward_kwargs) -> expected output``, an independent float64
            computation, or None.
        skips: property name -> why it does not apply to this sample.
        description: one line for test ids and reports.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: Callable[[Sizes], tuple[torch.Tensor, ...]] | None = None
    forward_kwargs: Callable[[Sizes, tuple[torch.Tensor, ...]], dict[str, Any]] | None = None
    reference: Callable[..., torch.Tensor] | None = None
    skips: Mapping[str, str] = field(default_factory=dict)
    description: str = ""


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
        samples: extra :class:`Sample` configurations beyond the default one.
        placement: one of :data:`PLACEMENTS` for image mechanisms, None otherwise.
        map_kind: one of :data:`MAP_KINDS` (None when ``returns_attn`` is False).
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
    samples: tuple[Sample, ...] = ()
    placement: str | None = None
    map_kind: str | None = None

    def all_samples(self) -> tuple[Sample, ...]:
        """The default sample followed by the declared ones."""
        return (Sample("default"), *self.samples)

    def sample(self, name: str) -> Sample:
        """The sample called ``name``."""
        for sample in self.all_samples():
            if sample.name == name:
                return sample
        raise KeyError(f"{self.name}: no sample {name!r}; have {[s.name for s in self.all_samples()]}")

    def sample_kwargs(self, sample: Sample, sizes: Sizes | None = None) -> dict[str, Any]:
        """Constructor kwargs of ``sample`` at ``sizes`` (callable values resolved)."""
        sizes = sizes or self.default_sizes
        extra = {k: (v(sizes) if callable(v) else v) for k, v in sample.kwargs.items()}
        return {**self.make_kwargs(sizes), **extra}

    def build_sample(self, sample: Sample, sizes: Sizes | None = None) -> nn.Module:
        """Construct the module of ``sample`` at ``sizes``."""
        sizes = sizes or self.default_sizes
        return self.cls(**self.sample_kwargs(sample, sizes), device=sizes.device, dtype=sizes.dtype)

    def sample_inputs(
        self, sample: Sample, sizes: Sizes | None = None
    ) -> tuple[tuple[torch.Tensor, ...], dict[str, Any]]:
        """Positional inputs and forward kwargs of ``sample`` at ``sizes``."""
        sizes = sizes or self.default_sizes
        inputs = (sample.inputs or self.make_inputs)(sizes)
        kwargs = sample.forward_kwargs(sizes, inputs) if sample.forward_kwargs else {}
        return inputs, kwargs

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
    if flags.get("placement") not in (None, *PLACEMENTS):
        raise ValueError(f"placement must be one of {PLACEMENTS} or None, got {flags['placement']!r}")
    if flags.get("map_kind") not in (None, *MAP_KINDS):
        raise ValueError(f"map_kind must be one of {MAP_KINDS} or None, got {flags['map_kind']!r}")
    sample_names = [s.name for s in flags.get("samples", ())]
    if "default" in sample_names or len(set(sample_names)) != len(sample_names):
        raise ValueError(f"{name}: sample names must be unique and not 'default', got {sample_names}")

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
