"""Input validation with messages that name the argument, what was expected and what came."""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import fx, nn

__all__ = [
    "SPATIAL_LAYOUTS",
    "check_device",
    "check_dtype",
    "check_dtypes",
    "check_input",
    "check_mask",
    "check_pair",
    "check_positive",
    "check_scalar_arguments",
    "check_variant",
    "parameter_dtype",
]

#: Feature maps with 1, 2 or 3 spatial dims: sequences of features, images, videos (T, H, W).
SPATIAL_LAYOUTS = ("B C L", "B C H W", "B C T H W")


def _describe(layout: str) -> str:
    dims = layout.split()
    return f"{len(dims)}-D tensor ({', '.join(dims)})"


def _parse_layout(layout: str | tuple[str, ...]) -> dict[int, tuple[str, ...]]:
    by_rank: dict[int, tuple[str, ...]] = {}
    for alternative in (layout,) if isinstance(layout, str) else layout:
        dims = tuple(alternative.split())
        by_rank.setdefault(len(dims), dims)
    return by_rank


_PARSED_LAYOUTS: dict[str | tuple[str, ...], dict[int, tuple[str, ...]]] = {}


def _dims_by_rank(layout: str | tuple[str, ...]) -> dict[int, tuple[str, ...]]:
    """``{rank: dim names}`` of one layout or several alternatives (the first of a rank wins).

    Parsed once per layout in eager mode, as every forward checks its inputs. Not cached while
    compiling: dynamo would guard on the cache's contents (and warns about ``lru_cache``)."""
    if torch.compiler.is_compiling():
        return _parse_layout(layout)
    parsed = _PARSED_LAYOUTS.get(layout)
    if parsed is None:
        parsed = _PARSED_LAYOUTS[layout] = _parse_layout(layout)
    return parsed


def _traced(x: object) -> bool:
    """Whether ``x`` is a ``torch.fx`` proxy: checks then step aside (they need concrete values),
    so that symbolic tracing sees through them; dynamo and export trace real (fake) tensors and
    keep every check."""
    return isinstance(x, fx.Proxy)


def parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating parameter (None without one), for
    ``check_input(..., dtype=parameter_dtype(self))``.

    The first in ``module.parameters()``'s order (the module's own, then each child's, depth
    first), read from the registration dicts: ``parameters()`` walks every submodule through
    generators and a memo set, which cost ~25 us a call, more than a small module's arithmetic
    (cbam, B 1, C 16, 4x4, calls it three times a forward)."""
    for p in module._parameters.values():
        if p is not None and p.is_floating_point():
            return p.dtype
    for child in module._modules.values():
        if child is not None:
            dtype = parameter_dtype(child)
            if dtype is not None:
                return dtype
    return None


def autocast_enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type; False on the meta device, which autocast does
    not know (``torch.is_autocast_enabled`` raises there; shape inference runs modules there).

    Not ``torch.amp.is_autocast_available``: torch 2.11's dynamo cannot trace it, and every
    compiled call through attend broke its graph there (seen on an H200).
    """
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def check_dtype(
    x: torch.Tensor, name: str, dtype: torch.dtype | None, source: str = "the module's parameters"
) -> None:
    """Check that ``x`` has ``dtype`` (that of ``source``), naming both dtypes; None skips.

    Skipped under ``torch.autocast``, where inputs legitimately differ from the parameters and from
    each other (autocast casts them per op).

    Raises:
        TypeError: another floating dtype.
    """
    if dtype is None or _traced(x) or x.dtype == dtype:
        return
    if autocast_enabled(x.device):
        return
    raise TypeError(
        f"{name}: expected {dtype} (the dtype of {source}), got {x.dtype}; cast the input "
        f"(x.to({dtype})) or the module (module.to({x.dtype})), or run under torch.autocast"
    )


def check_dtypes(module: nn.Module, **inputs: torch.Tensor) -> None:
    """Check the dtypes of several inputs at once: the first against ``module``'s parameters,
    the others against the first (see :func:`check_dtype`)::

        check_dtypes(self, query=query, key=key, value=value)
    """
    (first_name, first), *others = inputs.items()
    check_dtype(first, first_name, parameter_dtype(module))
    for name, t in others:
        if t is not first:
            check_dtype(t, name, first.dtype, first_name)


def check_input(
    x: object,
    name: str,
    layout: str | Sequence[str],
    *,
    dtype: torch.dtype | None = None,
    dtype_source: str = "the module's parameters",
    **expected: int | None,
) -> None:
    """Check that ``x`` is a floating tensor laid out as ``layout`` with the ``expected`` sizes.

    Args:
        x: the argument to check.
        name: its name in the caller's signature, used in messages.
        layout: space-separated dimension names such as ``"B C H W"``, or several alternatives
            (``("B C L", "B C H W")``); the one whose rank matches is used. ``B`` is the batch:
            it may be empty (a batch of zero items passes through, as elsewhere in PyTorch);
            every other dimension must be non-empty.
        dtype: the floating dtype ``x`` must have (that of ``dtype_source``: the module's
            parameters by default, or another input); None skips. See :func:`check_dtype`.
        dtype_source: what ``dtype`` comes from, for the message.
        **expected: required sizes by dimension name, e.g. ``C=64``; None skips the check.

    Under ``torch.fx`` symbolic tracing (a Proxy for ``x``) nothing is checked.

    Raises:
        TypeError: ``x`` is not a tensor, not floating point, or of another dtype than ``dtype``.
        ValueError: wrong rank, an empty non-batch dimension, or a size other than expected.
    """
    if _traced(x):
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}"
        )
    dims = _dims_by_rank(layout if isinstance(layout, str) else tuple(layout)).get(x.dim())
    if dims is None:
        layouts = [layout] if isinstance(layout, str) else list(layout)
        wanted = " or ".join(_describe(lay) for lay in layouts)
        raise ValueError(f"{name}: expected a {wanted}, got shape {tuple(x.shape)}")
    shape = x.shape
    for i, dim in enumerate(dims):
        size = shape[i]
        if dim != "B" and size == 0:
            raise ValueError(f"{name}: dimension {dim} (dim {i}) is empty, shape {tuple(shape)}")
        want = expected.get(dim)
        if want is not None and size != want:
            raise ValueError(
                f"{name}: expected {dim}={want} at dim {i} of {' '.join(dims)!r}, got {size} "
                f"(shape {tuple(shape)})"
            )
    check_dtype(x, name, dtype, dtype_source)


def check_device(t: torch.Tensor, name: str, device: torch.device | None) -> None:
    """Check that ``t`` lives on ``device`` (the input's), or raise naming both; None skips."""
    if device is not None and not _traced(t) and t.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the input's device), got one on {t.device}")


def check_mask(mask: object, name: str, target: Sequence[int], device: torch.device | None = None) -> None:
    """Check that ``mask`` is boolean (True = may attend) or floating (additive), broadcasts to
    ``target`` and, when ``device`` is given, lives on that device.

    Raises:
        TypeError: ``mask`` is not a tensor, or neither bool nor floating.
        ValueError: ``mask`` does not broadcast to ``target``, or is on another device.
    """
    if _traced(mask):
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(mask).__name__}")
    check_device(mask, name, device)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"{name}: expected a bool mask (True = may attend) or a floating additive mask, got {mask.dtype}"
        )
    target = tuple(target)
    ok = mask.dim() <= len(target) and all(
        m in (1, t) for m, t in zip(reversed(mask.shape), reversed(target))
    )
    if not ok:
        raise ValueError(f"{name}: shape {tuple(mask.shape)} does not broadcast to {target}")


def check_variant(variant: object, name: str = "variant") -> None:
    """Check a ``variant`` argument: ``"paper"`` (the default everywhere) or ``"official"``.

    Raises:
        ValueError: any other value, naming the argument.
    """
    if variant not in ("paper", "official"):
        raise ValueError(f"{name}: expected 'paper' or 'official', got {variant!r}")


def check_positive(**sizes: int | None) -> None:
    """Check size arguments, given by name: each must be a positive integer (None skips one).

    Example:
        >>> check_positive(channels=64, key_channels=None)
        >>> check_positive(num_heads=0)
        Traceback (most recent call last):
        ...
        ValueError: num_heads: expected a positive integer, got 0

    Raises:
        ValueError: a size that is not a positive integer (0, negative, a float, a bool),
            naming the argument.
    """
    for name, value in sizes.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")


def check_pair(name: str, value: object, hint: str = "(H, W)") -> tuple[int, int]:
    """A size given as one positive integer (square) or a pair of them, as ``(a, b)``.

    Example:
        >>> check_pair("mask_size", 5), check_pair("mask_size", [3, 5])
        ((5, 5), (3, 5))

    Raises:
        ValueError: anything else (a string, a float, 0, three sizes), naming the argument.
    """
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if (
        isinstance(pair, (str, bytes))
        or not isinstance(pair, Sequence)
        or len(pair) != 2
        or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in pair)
    ):
        raise ValueError(f"{name}: expected a positive integer or a pair {hint} of them, got {value!r}")
    return int(pair[0]), int(pair[1])


#: scalar annotations of constructor arguments -> (the number type, whether None is allowed)
_SCALAR_ANNOTATIONS: dict[object, tuple[type, bool]] = {
    "int": (numbers.Integral, False),
    "int | None": (numbers.Integral, True),
    "float": (numbers.Real, False),
    "float | None": (numbers.Real, True),
    int: (numbers.Integral, False),
    float: (numbers.Real, False),
}

_Init = TypeVar("_Init", bound=Callable[..., None])


def check_scalar_arguments(init: _Init) -> _Init:
    """``init`` with the type of every argument annotated ``int`` or ``float`` (or ``| None``)
    checked first: ``TypeError`` naming the argument, what was expected and what came.

    Sizes such as ``channels=None``, ``embed_dim="64"`` or ``num_heads=2.5`` would otherwise fail
    deep inside the constructor with Python's or torch's message about an operator ("unsupported
    operand type(s) for *: 'NoneType' and 'float'"), or, for some, be accepted. bool is not a
    number here (``channels=True``). The values' ranges (positive sizes, probabilities) stay with
    each module, which knows them. The registry applies it to every registered class.

    Example:
        >>> class Block:
        ...     @check_scalar_arguments
        ...     def __init__(self, channels: int, p: float = 0.0) -> None: ...
        >>> Block(None)
        Traceback (most recent call last):
        ...
        TypeError: channels: expected an integer, got None
    """
    signature = inspect.signature(init)
    checked = {
        name: _SCALAR_ANNOTATIONS[parameter.annotation]
        for name, parameter in signature.parameters.items()
        if _hashable(parameter.annotation) and parameter.annotation in _SCALAR_ANNOTATIONS
    }
    if not checked:
        return init

    @functools.wraps(init)
    def checked_init(*args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return init(*args, **kwargs)  # Python's own message for a missing or unknown argument
        for name, value in bound.arguments.items():
            expected = checked.get(name)
            if expected is None:
                continue
            kind, optional = expected
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, kind):
                noun = "an integer" if kind is numbers.Integral else "a number"
                suffix = " or None" if optional else ""
                raise TypeError(f"{name}: expected {noun}{suffix}, got {value!r}")
        return init(*args, **kwargs)

    return checked_init  # type: ignore[return-value]


def _hashable(annotation: object) -> bool:
    try:
        hash(annotation)
    except TypeError:
        return False
    return True
