"""Insert an attention mechanism into an existing network without editing its code.

    model = MyResNet()
    model.load_state_dict(pretrained)          # load weights first: attaching renames wrapped modules
    attnzoo.attach(model, "cbam")              # after the last norm of every residual branch
    attnzoo.attach(model, "se", where=["layer4.1.bn2"])
    attnzoo.attach(model, "eca", where=lambda name, m: isinstance(m, nn.BatchNorm2d) and "layer3" in name)

Each chosen module ``m`` is replaced by ``Attached(m, attention)``, whose forward is
``attention(m(x))``; the attention's channel count is read from ``m`` (a norm's features, a conv's
output channels, a linear layer's output features).
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn

from attnzoo.registry import get_spec

__all__ = ["Attached", "attach", "residual_branch_ends", "symbolic_trace"]

NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
)
#: Layers that may sit between a branch's last norm and the addition without changing the answer.
PASS_THROUGH: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout2d)
ADD_TARGETS = {operator.add, operator.iadd, torch.add}


class Attached(nn.Module):
    """``attention(module(x))``: a module followed by an attention mechanism."""

    def __init__(self, module: nn.Module, attention: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.attention = attention

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.attention(self.module(*args, **kwargs))


def infer_channels(module: nn.Module) -> int:
    """The channel count a module outputs, read from its attributes.

    Raises:
        ValueError: the module's type carries no channel count.
    """
    for attribute in ("num_features", "num_channels", "out_channels", "out_features"):
        value = getattr(module, attribute, None)
        if isinstance(value, int):
            return value
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[0])
    if isinstance(module, Attached):
        return infer_channels(module.module)
    raise ValueError(
        f"where: cannot infer the channel count of {type(module).__name__}; expected a norm, conv or "
        "linear layer (pass channels= to attach)"
    )


class _MechanismLeafTracer(fx.Tracer):
    """A ``torch.fx`` tracer that records every attnzoo mechanism as one call (a leaf module).

    Mechanisms branch on shapes and dtypes (head splits, half-precision paths), which symbolic
    tracing cannot follow; their input checks step aside for proxies, so the model around them
    traces as usual. Anything that is not a registered mechanism is traced through.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return hasattr(type(m), "registry_name") or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(model: nn.Module, concrete_args: dict[str, Any] | None = None) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` for models that hold attnzoo mechanisms: each mechanism inside
    ``model`` is one ``call_module`` node (the root itself is always traced through).

    A ``return_attn`` argument of ``model.forward`` is traced as False unless ``concrete_args``
    says otherwise (a flag that chooses the return type cannot be a graph input).
    """
    concrete = dict(concrete_args or {})
    if "return_attn" in inspect.signature(model.forward).parameters:
        concrete.setdefault("return_attn", False)
    tracer = _MechanismLeafTracer()
    graph = tracer.trace(model, concrete_args=concrete or None)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in ADD_TARGETS:
        return True
    return node.op == "call_method" and node.target in ("add", "add_")


def residual_branch_ends(model: nn.Module) -> list[str]:
    """Qualified names of the norm layers that end a residual branch.

    Traces ``model`` with ``torch.fx``; at every addition of two computed tensors, the operand with
    the longer path from the input is the residual branch (the other is the identity or the
    projection shortcut), and its source, looking through identity/dropout layers, must be a norm.

    Raises:
        ValueError: the model cannot be traced symbolically.
    """
    try:
        graph = symbolic_trace(model).graph
    except Exception as error:  # fx raises many types for untraceable code
        raise ValueError(
            f"model: cannot trace {type(model).__name__} with torch.fx to find its residual branches "
            f"({type(error).__name__}: {error}); pass where= a list of module names or a predicate"
        ) from None
    modules = dict(model.named_modules())
    depth: dict[fx.Node, int] = {}
    for node in graph.nodes:  # topological order: longest path from any input
        parents = [p for p in node.all_input_nodes]
        depth[node] = 1 + max((depth[p] for p in parents), default=0)

    def outermost_attached(name: str) -> str:
        # a norm attached to before is reached inside its wrapper(s): attach after the outermost
        while name.endswith(".module") and isinstance(modules.get(name[: -len(".module")]), Attached):
            name = name[: -len(".module")]
        return name

    def source_norm(node: fx.Node) -> str | None:
        while node.op == "call_module":
            module = modules[str(node.target)]
            if isinstance(module, NORM_TYPES):
                return outermost_attached(str(node.target))
            attached_before = hasattr(type(module), "registry_name")  # a mechanism attached earlier
            if not (isinstance(module, PASS_THROUGH) or attached_before) or not node.all_input_nodes:
                return None
            node = node.all_input_nodes[0]
        return None

    ends: list[str] = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
        if len(operands) != 2:
            continue
        branch = max(operands, key=lambda n: depth[n])
        norm = source_norm(branch)
        if norm is not None and norm not in ends:
            ends.append(norm)
    return ends


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def attach(
    model: nn.Module,
    name: str,
    where: str | Sequence[str] | Callable[[str, nn.Module], bool] = "residual",
    **attention_kwargs: Any,
) -> nn.Module:
    """Insert the registered mechanism ``name`` into ``model`` (in place) and return the model.

    Args:
        model: any network.
        name: a registered shape-preserving mechanism taking the channel count first (``"se"``,
            ``"cbam"``, ``"eca"``, ``"gc"`` ...).
        where: ``"residual"`` (after the last normalisation of each residual branch, found by
            tracing), a list of module names, or a predicate ``(name, module) -> bool``; the
            mechanism goes right after each chosen module.
        **attention_kwargs: passed to the mechanism's constructor (``channels=`` overrides the
            inferred channel count).

    Raises:
        ValueError: an unknown module name, a mechanism that changes the shape, no place found, or
            a channel count that cannot be inferred.
    """
    spec = get_spec(name)
    if not spec.shape_preserving:
        raise ValueError(f"name: {name!r} changes the shape of its input and cannot be attached")
    modules = dict(model.named_modules())
    if where == "residual":
        targets = residual_branch_ends(model)
    elif isinstance(where, str):
        raise ValueError(f"where: expected 'residual', a list of module names or a predicate, got {where!r}")
    elif callable(where):
        targets = [n for n, m in modules.items() if n and where(n, m)]
    else:
        targets = list(where)
        unknown = [t for t in targets if t not in modules or not t]
        if unknown:
            raise ValueError(f"where: no module named {unknown} in {type(model).__name__}")
    if not targets:
        raise ValueError(f"where: found no place to attach {name!r} in {type(model).__name__}")
    channels = attention_kwargs.pop("channels", None)
    for target in targets:
        module = modules[target]
        reference = next(module.parameters(), None)
        factory = {} if reference is None else {"device": reference.device, "dtype": reference.dtype}
        attention = spec.cls(channels or infer_channels(module), **attention_kwargs, **factory)
        _set_module(model, target, Attached(module, attention))
    return model
