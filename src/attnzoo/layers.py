"""Small building blocks shared by the mechanisms: width rounding, injectable layers
(activations and gates by name or class, normalisation layers by class or factory), and calling
a sub-layer without the cost of a module call where that computes the same."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attnzoo._checks import check_positive
from attnzoo._tracing import forward_ad_active

__all__ = [
    "HardSigmoid",
    "LayerSpec",
    "NormLayer",
    "call_layer",
    "create_layer",
    "create_norm",
    "linear_parameters",
    "make_divisible",
    "norm_input",
    "plain_layer",
    "reduced_width",
]

#: An activation or gate given by name (``"relu"``), by class (``nn.ReLU``) or as a factory.
LayerSpec = str | type[nn.Module] | Callable[[], nn.Module] | None

#: A normalisation layer: a class or factory called as ``norm_layer(channels, device=..., dtype=...)``
#: (``nn.BatchNorm2d``, the default wherever a paper normalises; ``functools.partial(nn.GroupNorm,
#: 32)``; ``nn.Identity``), or None for no normalisation.
NormLayer = Callable[..., nn.Module] | None


class HardSigmoid(nn.Hardsigmoid):
    """``nn.Hardsigmoid`` (``relu6(x + 3) / 6``) whose gradient is differentiable again.

    torch's hardsigmoid kernel has no double backward ("derivative for aten::hardsigmoid_backward
    is not implemented"), so a gradient penalty or a Hessian-vector product through MobileNetV3's
    or eSE's gate raises. Where autograd records, this computes the same values with ``relu6``,
    whose backward differentiates; elsewhere it is the one-kernel ``F.hardsigmoid``."""

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.relu6(x + 3.0) / 6.0
        return F.hardsigmoid(x)


_LAYERS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "mish": nn.Mish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "hard_sigmoid": HardSigmoid,
    "hard_swish": nn.Hardswish,
    "identity": nn.Identity,
}


def create_layer(spec: LayerSpec, *, argument: str = "layer") -> nn.Module:
    """Instantiate an activation/gate from a name, a class or a zero-argument factory.

    None gives ``nn.Identity``.

    Raises:
        ValueError: unknown name (the known ones are listed).
    """
    if spec is None:
        return nn.Identity()
    if isinstance(spec, str):
        key = spec.lower()
        if key not in _LAYERS:
            raise ValueError(f"{argument}: unknown layer {spec!r}; expected one of {sorted(_LAYERS)}")
        return _LAYERS[key]()
    layer = spec()
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{argument}: the factory returned {type(layer).__name__}, not an nn.Module")
    return layer


def create_norm(
    norm_layer: NormLayer,
    num_features: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    argument: str = "norm_layer",
) -> nn.Module:
    """``norm_layer(num_features, device=device, dtype=dtype)``; None gives ``nn.Identity``.

    Example:
        >>> create_norm(nn.BatchNorm2d, 64).num_features, create_norm(None, 64)
        (64, Identity())

    Raises:
        TypeError: ``norm_layer`` is not callable, or does not return an ``nn.Module``.
    """
    if norm_layer is None:
        return nn.Identity()
    if not callable(norm_layer):
        raise TypeError(
            f"{argument}: expected a callable (num_features) -> nn.Module or None, got {norm_layer!r}"
        )
    layer = norm_layer(num_features, device=device, dtype=dtype)
    if not isinstance(layer, nn.Module):
        raise TypeError(f"{argument}: the factory returned {type(layer).__name__}, not an nn.Module")
    return layer


def norm_input(x: Tensor) -> Tensor:
    """``x`` for a user-chosen norm layer: contiguous where a forward-mode AD level is open.

    torch 2.13's forward derivative of ``group_norm`` views its input and raises ("view size is
    not compatible with input tensor's size and stride") on channels-last maps, which a module's
    own re-layouts produce (tokens viewed back as a map). Elsewhere ``x`` itself: no copy.
    """
    return x.contiguous() if forward_ad_active() else x


def make_divisible(
    value: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9
) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never below ``min_value``.

    As in timm and the MobileNet reference code: rounding never removes more than
    ``1 - round_limit`` of the value (it goes one divisor up instead).
    """
    min_value = min_value or divisor
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def reduced_width(
    channels: int,
    rd_ratio: float,
    rd_channels: int | None = None,
    rd_divisor: int = 1,
) -> int:
    """The bottleneck width of a reduction MLP: ``rd_channels`` if given, else rounded ``C*rd_ratio``.

    Never returns 0: a 4-channel input with ``rd_ratio=1/16`` gets a width-1 bottleneck, where a
    bare ``channels // 16`` would build a layer with no units.
    """
    check_positive(rd_divisor=rd_divisor)
    if rd_channels is not None:
        check_positive(rd_channels=rd_channels)
        return rd_channels
    if not 0 < rd_ratio <= 1:
        raise ValueError(f"rd_ratio: expected a ratio in (0, 1], got {rd_ratio}")
    if rd_divisor == 1:
        # floor, as the papers' code does (``channels // reduction``); the epsilon absorbs
        # float error such as 100 * 0.29 = 28.999999999999996
        return max(1, int(channels * rd_ratio + 1e-6))
    return make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


def _plain(module: nn.Module) -> bool:
    """No hooks and no forward patched onto the instance: calling it runs its class's forward."""
    return not (module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__)


def plain_layer(module: nn.Module, kind: type[nn.Module]) -> bool:
    """Whether ``module`` is exactly a ``kind`` (not a subclass) without hooks or a forward patched
    onto the instance: then a product of one's own on its weights computes what calling it does.
    Where this is False, call the module (its hooks must run: pruning, adapters, feature taps)."""
    return type(module) is kind and _plain(module)


def linear_parameters(modules: tuple[nn.Module, ...]) -> tuple[list[Tensor], list[Tensor | None]] | None:
    """The weights and biases of ``modules`` when each is a plain ``nn.Linear`` (the class itself,
    no hooks, no patched forward) and either all or none have a bias, so that ``F.linear`` on
    them computes what calling them does; None otherwise.

    Plain loops and the registration dicts, not ``all()`` over generators and
    ``Module.__getattr__``: this runs on every self-attention call, where a small call's cost is
    its Python."""
    weights, biases, unbiased = [], [], 0
    for module in modules:
        if not plain_layer(module, nn.Linear):
            return None
        params = module._parameters
        weights.append(params["weight"])
        biases.append(params["bias"])
        unbiased += params["bias"] is None  # not list.count(None): that calls Tensor.__eq__ (~100 us)
    if unbiased not in (0, len(modules)):
        return None
    return weights, biases


_CONVOLUTIONS: dict[type[nn.Module], Callable[..., Tensor]] = {
    nn.Conv1d: F.conv1d,
    nn.Conv2d: F.conv2d,
    nn.Conv3d: F.conv3d,
}


#: The input ranks each BatchNorm class accepts.
_BATCH_NORM_RANKS: dict[type[nn.Module], tuple[int, ...]] = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


def call_layer(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)``, without the module call where the module is a plain ``nn.Linear``,
    zero-padded ``nn.Conv1d/2d/3d``, ``nn.BatchNorm1d/2d/3d`` in eval mode with running
    statistics, ``nn.LayerNorm``, ``nn.ReLU``, ``nn.Sigmoid`` or ``nn.Identity``: the same
    function on its parameters (and buffers).

    A module call costs 1-2 us for an activation, ~5 us for a Linear and ~20 us for a Conv2d
    (profiled on a CPU), more than the arithmetic of a small call (SE on a (2, 16) descriptor,
    mha on 4 tokens), and on a GPU such calls are launch-bound. Any other module, one with hooks
    or a patched forward, and every call under fx symbolic tracing (which keeps the call_module
    nodes that quantization and graph rewrites look for) go through ``module(x)``.
    """
    kind = type(module)
    if isinstance(x, fx.Proxy) or not _plain(module):
        return module(x)
    if kind is nn.Linear:
        params = module._parameters  # the registration dict: no Module.__getattr__
        return F.linear(x, params["weight"], params["bias"])
    convolution = _CONVOLUTIONS.get(kind)
    if convolution is not None and module.padding_mode == "zeros":
        params = module._parameters
        return convolution(
            x, params["weight"], params["bias"], module.stride, module.padding, module.dilation, module.groups
        )
    if kind in _BATCH_NORM_RANKS and not module.training and module.running_mean is not None:
        if x.dim() in _BATCH_NORM_RANKS[kind]:  # else the module's own error
            params, buffers = module._parameters, module._buffers
            mean, var = buffers["running_mean"], buffers["running_var"]
            return F.batch_norm(
                x, mean, var, params["weight"], params["bias"], training=False, eps=module.eps
            )
    if kind is nn.LayerNorm:
        params = module._parameters
        return F.layer_norm(x, module.normalized_shape, params["weight"], params["bias"], module.eps)
    if kind is nn.Identity:
        return x
    if kind is nn.ReLU:
        return torch.relu_(x) if module.inplace else torch.relu(x)
    if kind is nn.Sigmoid:
        return torch.sigmoid(x)
    return module(x)
