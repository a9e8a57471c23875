"""Record the attention maps of every attnzoo module inside any model, without changing its code.

    with attnzoo.inspect.capture(model) as maps:
        model(images)
    maps["layer2.0.cbam"]          # the maps of the last call of that module
    maps.calls["layer2.0.cbam"]    # every call's maps, in order

Inside the context, each attnzoo module that can return maps is called with ``return_attn=True``
(through a forward pre-hook), and its maps are recorded and removed from its output (through a
forward hook), so the surrounding model sees exactly the output it sees without the context. The
hooks are removed when the context exits: outside it nothing is recorded and nothing is added to
any call.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from attnzoo.registry import get_spec

__all__ = ["CapturedMaps", "attention_modules", "capture"]


def _detach(maps: Any, to_cpu: bool) -> Any:
    """Detach every tensor in a (nested) maps structure, optionally moving it to the CPU."""
    if isinstance(maps, Tensor):
        maps = maps.detach()
        return maps.cpu() if to_cpu else maps
    if isinstance(maps, Mapping):
        return {key: _detach(value, to_cpu) for key, value in maps.items()}
    if isinstance(maps, (tuple, list)):
        return type(maps)(_detach(value, to_cpu) for value in maps)
    return maps


class CapturedMaps(Mapping[str, Any]):
    """Maps recorded by :func:`capture`, by qualified module name.

    Indexing gives the maps of the module's LAST call; :attr:`calls` keeps every call (a module
    used at every decoder step, or a recurrent criss-cross, is called several times).
    """

    def __init__(self) -> None:
        self.calls: dict[str, list[Any]] = {}

    def __getitem__(self, name: str) -> Any:
        return self.calls[name][-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.calls)

    def __len__(self) -> int:
        return len(self.calls)

    def clear(self) -> None:
        self.calls.clear()

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}: {len(calls)} call(s)" for name, calls in self.calls.items())
        return f"CapturedMaps({counts})"


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attnzoo modules in ``model`` that can return maps, by qualified name.

    Only the outermost attnzoo module of a nest is listed: a CBAM's maps include its channel and
    spatial parts, which are not called through their own ``forward``.
    """
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        registry_name = getattr(type(module), "registry_name", None)
        if registry_name is None or not get_spec(registry_name).returns_attn:
            continue
        if any(name.startswith(f"{outer}.") or outer == "" for outer in found):
            continue
        found[name] = module
    return found


@contextmanager
def capture(model: nn.Module, *, detach: bool = True, to_cpu: bool = True) -> Iterator[CapturedMaps]:
    """Record the attention maps of every attnzoo module in ``model`` while the context is open.

    Args:
        model: any ``nn.Module``; the attnzoo modules inside it are found by type.
        detach: record detached maps (default); False keeps them in the autograd graph, e.g. for
            an attention regulariser such as show-attend-tell's doubly stochastic penalty.
        to_cpu: move recorded maps to the CPU (default), so GPU memory is not held by them.

    Yields:
        A :class:`CapturedMaps` filled as the model runs.
    """
    recorded = CapturedMaps()
    handles = []
    for name, module in attention_modules(model).items():
        key = name or type(module).__name__
        requested_by_caller: list[bool] = []

        def pre_hook(
            mod: nn.Module, args: tuple, kwargs: dict, requested: list = requested_by_caller
        ) -> tuple:
            requested.append(bool(kwargs.get("return_attn", False)))
            return args, {**kwargs, "return_attn": True}

        def post_hook(
            mod: nn.Module,
            args: tuple,
            kwargs: dict,
            output: Any,
            key: str = key,
            requested: list = requested_by_caller,
        ) -> Any:
            caller_wanted_maps = requested.pop() if requested else False
            out, maps = output
            keep_graph = not detach and torch.is_grad_enabled()
            recorded.calls.setdefault(key, []).append(maps if keep_graph else _detach(maps, to_cpu))
            return output if caller_wanted_maps else out

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook, with_kwargs=True))
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
