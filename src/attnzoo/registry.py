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

from attnzoo._checks import check_scalar_arguments

__all__ = [
    "FAMILIES",
    "MAP_KINDS",
    "PLACEMENTS",
    "ModuleSpec",
    "Padding",
    "Paper",
    "Sample",
    "Sizes",
    "attn_mask_sample",
    "causal",
    "create",
    "cross_inputs",
    "example_image",
    "example_sequence",
    "get_spec",
    "image_input",
    "key_mask_sample",
    "list_modules",
    "padding_mask",
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
class Padding:
    """Which entries of a sample's inputs are padding, for the masking properties of the suite.

    Attributes:
        inputs: input index -> bool tensor broadcastable to that input, True at padded entries
            (positions the sample's mask hides from every query).
        real: bool tensor broadcastable to the output, True at the outputs that must not depend on
            padded entries (the real positions); None: every output.
        empty_batch: batch items whose every key is padded (fully masked rows): their outputs
            must stay finite, their maps zero, and no gradient may reach their padded entries.
    """

    inputs: Mapping[int, torch.Tensor]
    real: torch.Tensor | None = None
    empty_batch: tuple[int, ...] = ()


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
        padding: ``(Sizes, inputs, forward_kwargs) -> Padding`` for a sample whose mask hides
            positions from every query (key padding): the suite stores NaN and Inf there and checks
            that the real outputs do not change. None: no padded positions.
        thorough: also run the expensive properties (dtypes, compile, export, ONNX) on this
            sample; they always run on the default one.
        skips: property name -> why it does not apply to this sample.
        description: one line for test ids and reports.
    """

    name: str
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    inputs: Callable[[Sizes], tuple[torch.Tensor, ...]] | None = None
    forward_kwargs: Callable[[Sizes, tuple[torch.Tensor, ...]], dict[str, Any]] | None = None
    reference: Callable[..., torch.Tensor] | None = None
    padding: Callable[[Sizes, tuple[torch.Tensor, ...], dict[str, Any]], Padding] | None = None
    thorough: bool = False
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
        linear_memory: without ``return_attn`` no buffer grows with N_q x N_k (the fused kernel,
            or a design that never pairs positions); the suite checks it with
            :class:`attnzoo.testing.OpRecorder`.
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
    linear_memory: bool = False

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
        # a size of the wrong type is one clear TypeError, before the constructor uses it
        cls.__init__ = check_scalar_arguments(cls.__init__)  # type: ignore[method-assign]
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


def padding_mask(x: torch.Tensor, *, empty: bool = True) -> torch.Tensor:
    """A (B, N) bool key mask for the (B, N, ...) sequence ``x``, True at real positions.

    Item 0 has its last third padded; with ``empty`` (and B > 1) every position of item 1 is
    padding (fully masked rows); later items are all real.
    """
    batch, length = x.shape[0], x.shape[1]
    mask = torch.ones(batch, length, dtype=torch.bool, device=x.device)
    mask[0, length - max(1, length // 3) :] = False
    if empty and batch > 1:
        mask[1] = False
    return mask


def key_mask_sample(
    name: str = "key_mask",
    *,
    key_input: int = 0,
    self_attention: bool = True,
    argument: str = "key_mask",
    empty: bool = True,
    description: str = "padded keys: item 0 partly, item 1 wholly (fully masked rows)",
    **fields: Any,
) -> Sample:
    """A sample that pads keys with :func:`padding_mask` of input ``key_input``, passed as
    ``argument``; declares the padding, so the suite checks that padded positions never reach real
    outputs (with ``self_attention`` the padded queries' outputs are not compared) and that fully
    masked rows give zero maps and no gradient to their keys."""

    def forward_kwargs(sizes: Sizes, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        return {argument: padding_mask(inputs[key_input], empty=empty)}

    def padding(sizes: Sizes, inputs: tuple[torch.Tensor, ...], kwargs: dict[str, Any]) -> Padding:
        real = kwargs[argument]  # (B, N_k)
        padded = ~real.view(*real.shape, *[1] * (inputs[key_input].dim() - 2))  # broadcast over features
        empty_batch = tuple(b for b in range(real.shape[0]) if not real[b].any())
        return Padding(
            inputs={key_input: padded},
            real=real.unsqueeze(-1) if self_attention else None,  # (B, N, 1): the real queries' outputs
            empty_batch=empty_batch,
        )

    return Sample(name, forward_kwargs=forward_kwargs, padding=padding, description=description, **fields)


def attn_mask_sample(
    name: str = "attn_mask",
    *,
    query_input: int = 0,
    key_input: int = 0,
    heads: int | None = None,
    argument: str = "attn_mask",
    description: str = "",
    **fields: Any,
) -> Sample:
    """A sample with a deterministic bool ``(B, N_q, N_k)`` attention mask (``(B, heads, N_q,
    N_k)`` with ``heads``) that keeps at least one key per query (the diagonal band)."""

    def forward_kwargs(sizes: Sizes, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        query, key = inputs[query_input], inputs[key_input]
        batch, n_q, n_k = query.shape[0], query.shape[1], key.shape[1]
        lead = (batch,) if heads is None else (batch, heads)
        generator = torch.Generator().manual_seed(7)
        mask = torch.rand((*lead, n_q, n_k), generator=generator) > 0.5
        mask |= torch.eye(n_q, n_k, dtype=torch.bool)  # every query keeps a key
        return {argument: mask.to(query.device)}

    text = description or f"a {3 if heads is None else 4}-D bool attention mask"
    skips = {"linear_memory": "the (N_q, N_k) mask itself is quadratic", **fields.pop("skips", {})}
    return Sample(name, forward_kwargs=forward_kwargs, description=text, skips=skips, **fields)


def cross_inputs(sizes: Sizes) -> tuple[torch.Tensor, ...]:
    """``make_inputs`` for cross-attention samples: queries (B, N, D) and a longer memory
    (B, N + 3, D)."""
    return example_sequence(sizes), example_sequence(sizes, length=sizes.extent + 3, seed=1)


def causal(sizes: Sizes, inputs: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """``forward_kwargs`` of a causal self-attention sample."""
    return {"causal": True}
